"""The stage registry and the run-directory object: one source for notebooks, folders and trainers."""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from screener_nb import config, stages
from screener_nb.errors import ConfigError, InputError
from screener_nb.rundir import RunDir
from screener_nb.runner import parse_stages

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def test_registry_lists_every_configured_stage_with_its_notebook_in_order():
    assert list(stages.REGISTRY) == ["environment", "data", "descriptor", "condition", "density", "distill",
                                     "evaluate", "explore"]  # the pipeline order, written out
    assert list(stages.REGISTRY) == list(config.STAGES)
    for name, stage in stages.REGISTRY.items():
        assert (NOTEBOOKS / f"{stage.notebook}.py").is_file(), name
    assert [s.number for s in stages.REGISTRY.values()] == [f"{i:02d}" for i in range(8)]
    assert stages.DEFAULT_STAGES == list(stages.REGISTRY)[:-1]


def test_stage_functions_resolve_to_the_library_functions():
    from screener_nb.data.build import prepare_data
    from screener_nb.density_fit import fit_densities
    from screener_nb.distill import distill_student
    from screener_nb.evaluate import run_evaluation
    from screener_nb.ssl.context_task import train_context
    from screener_nb.ssl.task import train_encoder

    expected = {"data": prepare_data, "descriptor": train_encoder, "condition": train_encoder,
                "density": fit_densities, "distill": distill_student, "evaluate": run_evaluation}
    got = {n: stages.stage_function(n) for n, s in stages.REGISTRY.items() if s.function}
    assert got == expected
    assert stages.stage_function("condition", SimpleNamespace(condition_model="context")) is train_context
    assert [n for n, s in stages.REGISTRY.items() if s.trains] == ["descriptor", "condition", "density", "distill"]
    with pytest.raises(ConfigError, match="does not train; expected one of descriptor, condition, density, distill"):
        stages.train_stage("evaluate", None)
    with pytest.raises(ConfigError, match="keeps no outputs, so it has no stage function"):
        stages.run_stage("explore", None)
    with pytest.raises(ConfigError, match=r"unknown stage 'densty'.*density \(04\)"):
        stages.get("densty")


def _fake_trainer(monkeypatch, steps_done):
    """The descriptor stage's function replaced by one that 'trains' to ``steps_done`` steps."""
    calls = []

    def trainer(cfg, **kwargs):
        calls.append(kwargs)
        return SimpleNamespace(steps_done=steps_done)

    monkeypatch.setattr(stages, "stage_function", lambda stage, cfg=None: trainer)
    return calls


def test_run_stage_marks_a_finished_stage_done_with_its_summary(tmp_path, monkeypatch):
    calls = _fake_trainer(monkeypatch, steps_done=30)
    cfg = SimpleNamespace(run_dir=str(tmp_path / "run"), steps=30)
    result = stages.run_stage("descriptor", cfg, callback=print)
    assert result.steps_done == 30 and calls == [{"callback": print}]
    assert json.loads((tmp_path / "run" / "descriptor" / "DONE").read_text()) == {"steps": 30}


def test_run_stage_leaves_an_interrupted_stage_unfinished(tmp_path, monkeypatch):
    """Stopped at step 12 of 30 (``stop_after``): no marker, so the runner re-runs the stage and it resumes."""
    _fake_trainer(monkeypatch, steps_done=12)
    stages.run_stage("descriptor", SimpleNamespace(run_dir=str(tmp_path / "run"), steps=30), stop_after=12)
    assert not RunDir(tmp_path / "run").done("descriptor")


def test_run_stage_keeps_the_marker_of_a_stage_already_done(tmp_path, monkeypatch):
    """Caches built on a stage are stamped with its marker's time: running a done stage again keeps it."""
    _fake_trainer(monkeypatch, steps_done=30)
    run = RunDir(tmp_path / "run")
    marker = run.mark_done("descriptor", {"steps": 30, "note": "first"})
    before = marker.stat().st_mtime_ns
    stages.run_stage("descriptor", SimpleNamespace(run_dir=str(run.path), steps=30))
    assert marker.stat().st_mtime_ns == before and json.loads(marker.read_text())["note"] == "first"


def test_run_stage_writes_the_marker_on_rank_0_only(tmp_path, monkeypatch):
    _fake_trainer(monkeypatch, steps_done=30)
    monkeypatch.setenv("RANK", "1")
    stages.run_stage("descriptor", SimpleNamespace(run_dir=str(tmp_path / "run"), steps=30))
    assert not RunDir(tmp_path / "run").done("descriptor")


def test_the_data_stage_summary_counts_cases_and_datasets():
    index = {"cases": [{"id": "a", "dataset": "phantoms"}, {"id": "b", "dataset": "lidc"},
                       {"id": "c", "dataset": "phantoms"}]}
    assert stages.stage_summary("data", SimpleNamespace(), index) == {"cases": 3, "datasets": ["lidc", "phantoms"]}


def test_parse_stages_by_name_number_and_range():
    assert parse_stages("02-04") == ["descriptor", "condition", "density"]
    assert parse_stages("evaluate,01") == ["data", "evaluate"]


def test_run_dir_owns_the_stage_folders_and_done_markers(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.stage_dir("evaluate", create=False) == tmp_path / "run" / "eval"
    assert os.fspath(run) == str(tmp_path / "run") and run / "data" == tmp_path / "run" / "data"
    assert not run.done("evaluate")
    with pytest.raises(InputError, match="eval/DONE"):
        run.require("evaluate")
    run.mark_done("evaluate", {"best": "learned-residual"})
    marker = tmp_path / "run" / "eval" / "DONE"
    assert json.loads(marker.read_text()) == {"best": "learned-residual"}
    assert run.done("evaluate") and run.require("evaluate") == tmp_path / "run" / "eval"
    assert not run.done("environment")  # keeps nothing: never done, always run
    with pytest.raises(InputError, match="keeps none"):
        run.stage_dir("explore")


def test_a_notebooks_checks_are_kept_beside_the_marker(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(InputError, match="condition notebook's summary.*no such file"):
        run.summary("condition")
    run.write_summary("condition", {"quality": {"R^2": 0.5}})
    assert json.loads((tmp_path / "run" / "condition" / "summary.json").read_text()) == {"quality": {"R^2": 0.5}}
    assert run.summary("condition") == {"quality": {"R^2": 0.5}} and not run.done("condition")
