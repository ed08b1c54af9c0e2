"""The papermill runner, on small stand-in notebooks (real papermill, real kernels).

The stand-ins live in a temporary notebooks folder (SCREENER_NOTEBOOKS_DIR) and
do what the real ones do at their edges: resolve parameters through
screener_nb.config, write a file, mark their stage done.
"""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import yaml

from screener_nb import config, files
from screener_nb.errors import ConfigError
from screener_nb.runner import StageFailed, parse_stages, run

HEADER = textwrap.dedent('''\
    # ---
    # jupyter:
    #   kernelspec:
    #     display_name: Python 3
    #     language: python
    #     name: python3
    # ---
    ''')


def stand_in(stage: str, folder: str | None, fail_if: str = "False") -> str:
    names = "\n".join(f"{k} = None" for k in config.stage_params(stage) if k not in ("profile", "run_dir"))
    mark = f'files.mark_done(cfg.run_dir, "{folder}")' if folder else ""
    return HEADER + textwrap.dedent('''
        # %% tags=["parameters"]
        profile = "quick"
        run_dir = "runs/x"
        ''') + names + textwrap.dedent(f'''

        # %%
        import os
        from pathlib import Path
        from screener_nb import config, files
        cfg = config.resolve("{stage}", globals())
        if {fail_if}:
            raise RuntimeError("stand-in failure of {stage}")
        count = Path(cfg.run_dir) / "{stage}.count"
        count.write_text(str(int(count.read_text()) + 1 if count.exists() else 1))
        (Path(cfg.run_dir) / "{stage}.seen").write_text(repr(sorted((k, str(v)) for k, v in vars(cfg).items())))
        {mark}
        ''')


@pytest.fixture
def nbdir(tmp_path, monkeypatch):
    d = tmp_path / "notebooks"
    d.mkdir()
    for stage, folder in (("environment", None), ("data", "data"), ("descriptor", "descriptor")):
        (d / f"{config.NOTEBOOKS[stage]}.py").write_text(stand_in(stage, folder))
    monkeypatch.setenv("SCREENER_NOTEBOOKS_DIR", str(d))
    return d


def counts(run_dir: Path) -> dict:
    return {p.stem: int(p.read_text()) for p in run_dir.glob("*.count")}


def test_parse_stages():
    assert parse_stages("01,02") == ["data", "descriptor"]
    assert parse_stages("02-04") == ["descriptor", "condition", "density"]
    assert parse_stages("evaluate,data") == ["data", "evaluate"]
    with pytest.raises(ConfigError, match="unknown stage 'training'"):
        parse_stages("training")


def test_run_injects_validated_parameters_and_skips_done_stages(nbdir, tmp_path):
    out = tmp_path / "run"
    run(out, "quick", params={"steps": 3, "seed": 5}, stages="00-02")
    assert counts(out) == {"environment": 1, "data": 1, "descriptor": 1}
    seen = (out / "descriptor.seen").read_text()
    assert "('steps', '3')" in seen and "('seed', '5')" in seen and f"('run_dir', '{out}')" in seen
    assert (out / "notebooks" / "02_descriptor_ssl.ipynb").exists()
    assert yaml.safe_load((out / "params.yaml").read_text()) == {"profile": "quick", "seed": 5, "steps": 3}
    assert files.read_json(out / "run.json")["stages"]["descriptor"]["status"] == "done"
    # again: completed stages are skipped, the environment check always runs
    run(out, "quick", params={"steps": 3, "seed": 5}, stages="00-02")
    assert counts(out) == {"environment": 2, "data": 1, "descriptor": 1}


def test_other_parameters_on_an_existing_run_are_refused_and_force_keeps_old_outputs(nbdir, tmp_path):
    out = tmp_path / "run"
    run(out, "quick", params={"steps": 3}, stages="01,02")
    with pytest.raises(ConfigError, match=r"other parameters \(steps: 3 -> 4\)"):
        run(out, "quick", params={"steps": 4}, stages="01,02")
    run(out, "quick", params={"steps": 4}, stages="01,02", force="02")
    assert counts(out) == {"data": 1, "descriptor": 2}
    kept = list((out / ".replaced").glob("descriptor-*"))
    assert len(kept) == 1 and (kept[0] / "DONE").exists()


def test_unknown_parameter_fails_before_any_work(nbdir, tmp_path):
    with pytest.raises(ConfigError, match="unknown parameter 'stepz'"):
        run(tmp_path / "run", "quick", params={"stepz": 3}, stages="01")
    assert not (tmp_path / "run").exists()


def test_param_file_is_used_and_stored(nbdir, tmp_path):
    pf = tmp_path / "p.yaml"
    pf.write_text("steps: 9\nbatch: 2\n")
    out = tmp_path / "run"
    run(out, "quick", params={"batch": 4}, stages="02", param_file=pf)  # -p wins over the file
    seen = (out / "descriptor.seen").read_text()
    assert "('steps', '9')" in seen and "('batch', '4')" in seen
    assert (out / "params.from_file.yaml").read_text() == pf.read_text()


def test_a_failing_stage_reports_its_cell_error_and_a_rerun_resumes(nbdir, tmp_path):
    (nbdir / "02_descriptor_ssl.py").write_text(stand_in("descriptor", "descriptor", fail_if="not os.environ.get('SCREENER_OK')"))
    out = tmp_path / "run"
    with pytest.raises(StageFailed, match="stage descriptor .*RuntimeError: stand-in failure of descriptor"):
        run(out, "quick", stages="01,02")
    assert files.read_json(out / "run.json")["stages"]["descriptor"]["status"] == "failed"
    os.environ["SCREENER_OK"] = "1"
    try:
        run(out, "quick", stages="01,02")
    finally:
        del os.environ["SCREENER_OK"]
    assert counts(out) == {"data": 1, "descriptor": 1}


def test_cli_reports_bad_input_without_traceback(nbdir, tmp_path, capsys):
    from screener_nb.__main__ import main

    assert main(["run", "--out", str(tmp_path / "r"), "-p", "steps=lots", "--stages", "02"]) == 2
    assert "error: parameter 'steps': expected an integer, found 'lots'" in capsys.readouterr().err


def test_stage_kernels_use_ipc_sockets_and_leave_nothing_behind(nbdir, tmp_path, capfd, monkeypatch):
    """The kernel of a stage talks over IPC socket files, so it prints no TCP-encryption warning,
    and its private socket folder is gone once the stage is done."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    run(tmp_path / "run", "quick", stages="00")
    err = capfd.readouterr().err
    assert "without encryption" not in err
    assert "Kernel is running over TCP" not in err
    assert list((tmp_path / "tmp").glob("screener-kernel-*")) == []


def test_progress_lines_of_a_stage_reach_the_runner_terminal(nbdir, tmp_path, capfd):
    """What the library reports inside the kernel (training steps, case i/n) is relayed to the
    runner's own output, indented under the stage, before the stage's closing line."""
    text = stand_in("data", "data").replace(
        "count = Path", "from screener_nb.progress import report\n"
        "import time\nfor i in range(3):\n    report(f'[data] case {i + 1}/3'); time.sleep(0.2)\ncount = Path")
    (nbdir / f"{config.NOTEBOOKS['data']}.py").write_text(text)
    run(tmp_path / "run", "quick", stages="01")
    out = capfd.readouterr().out.splitlines()
    start = out.index(next(ln for ln in out if ln.startswith("[run] data: executing")))
    end = out.index(next(ln for ln in out if ln.startswith("[run] data: done in")))
    assert out[start + 1:end] == ["  [data] case 1/3", "  [data] case 2/3", "  [data] case 3/3"]
    assert "SCREENER_PROGRESS_FILE" not in os.environ and "SCREENER_HEADLESS" not in os.environ
