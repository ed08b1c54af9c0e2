"""Headless runs: execute the numbered notebooks in order with papermill.

``python -m screener_nb run --profile quick --out runs/q`` reads each
``notebooks/NN_*.py`` (py:percent, through jupytext: papermill cannot read it
directly), injects the stage's parameters and executes it; the executed
``.ipynb`` goes to ``runs/q/notebooks/``. The run directory is the unit of
work:

* ``params.yaml``   what the run was asked for (profile + overrides); a later
  call with different values on the same directory is refused rather than
  mixing two configurations silently (``--force`` a stage to redo it);
* ``run.json``      environment (package versions, device), stage timings;
* ``<stage>/DONE``  written when the stage's work is complete, by the library's
  stage function (:func:`screener_nb.stages.run_stage`, which the notebook calls);
  completed stages are skipped when the run is started again, an interrupted
  stage is re-run and its training resumes from the last checkpoint.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

from . import config, files
from .errors import ConfigError, ScreenerError
from .progress import PROGRESS_ENV, Relay
from .runtime import HEADLESS_ENV

from .rundir import RunDir
from .stages import DEFAULT_STAGES, REGISTRY, STAGE_ORDER

# Stage -> folder in the run directory holding its DONE marker (None: always run); from the registry
STAGE_DIRS = {name: stage.folder for name, stage in REGISTRY.items()}


class StageFailed(ScreenerError):
    """A notebook raised; the message holds the failing cell's error."""


def notebooks_dir() -> Path:
    env = os.environ.get("SCREENER_NOTEBOOKS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "notebooks"


def notebook_path(stage: str) -> Path:
    path = notebooks_dir() / f"{REGISTRY[stage].notebook}.py"
    if not path.exists():
        raise ConfigError(f"stage {stage!r}: notebook {path} not found")
    return path


def parse_stages(text: str | Iterable[str] | None) -> list[str]:
    """``"01,02"``, ``"data,descriptor"`` or ``"01-04"`` -> stage names in pipeline order."""
    if text is None:
        return list(DEFAULT_STAGES)
    items = config.split_list(text) if isinstance(text, str) else list(text)
    by_number = {stage.number: name for name, stage in REGISTRY.items()}
    chosen: set[str] = set()
    for item in items:
        if "-" in item and all(p.isdigit() for p in item.split("-")):
            lo, hi = (int(p) for p in item.split("-"))
            chosen |= {by_number[f"{i:02d}"] for i in range(lo, hi + 1) if f"{i:02d}" in by_number}
        elif item in by_number:
            chosen.add(by_number[item])
        elif item in REGISTRY:
            chosen.add(item)
        else:
            known = ", ".join(f"{n} ({stage.number})" for n, stage in REGISTRY.items())
            raise ConfigError(f"unknown stage {item!r}; known: {known}")
    return [s for s in STAGE_ORDER if s in chosen]


def stage_done(run_dir: Path, stage: str) -> bool:
    return RunDir(run_dir).done(stage)


def _check_run_params(run_dir: Path, requested: dict[str, Any]) -> None:
    """Refuse to continue a run with other parameters than it was started with."""
    path = run_dir / "params.yaml"
    if not path.exists():
        return
    import yaml

    saved = yaml.safe_load(path.read_text()) or {}
    diff = {k: (saved.get(k), v) for k, v in requested.items() if saved.get(k) != v}
    diff.update({k: (v, None) for k, v in saved.items() if k not in requested})
    if diff:
        detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ConfigError(
            f"{run_dir} was started with other parameters ({detail}). Use a new --out, "
            "or pass --force with the stages to redo (their old outputs are kept in .replaced/)"
        )


def _retire(run_dir: Path, stage: str) -> None:
    """Move a forced stage's outputs aside (never delete results silently)."""
    folder = REGISTRY[stage].folder
    if folder and (run_dir / folder).exists():
        dest = run_dir / ".replaced" / f"{folder}-{time.strftime('%Y%m%d-%H%M%S')}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(run_dir / folder), str(dest))
        print(f"[run] --force {stage}: previous outputs moved to {dest}", flush=True)


def ipc_kernel_manager_class():
    """A jupyter_client kernel manager whose kernel talks over local IPC sockets instead of TCP.

    The sockets are files in a private temporary folder (mode 0700), so no port is open and
    the kernel has no reason to warn that it is "running over TCP without encryption".
    """
    import tempfile

    from jupyter_client.manager import AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.transport = "ipc"
            self.ip = str(Path(tempfile.mkdtemp(prefix="screener-kernel-")) / "kernel")

        async def _async_cleanup_resources(self, restart: bool = False) -> None:
            await super()._async_cleanup_resources(restart=restart)  # removes the socket files
            if not restart:
                shutil.rmtree(Path(self.ip).parent, ignore_errors=True)

        cleanup_resources = _async_cleanup_resources

    return IPCKernelManager


def execute_stage(stage: str, run_dir: Path, params: dict[str, Any], *, timeout: int | None = None,
                  progress_bar: bool = False) -> Path:
    """Execute one notebook with papermill; return the executed notebook's path.

    The library's progress lines (training steps with loss and time left, case i/n of the
    maps) are relayed to this terminal while the notebook runs, indented under the stage's
    line; ``progress_bar`` adds papermill's bar over the notebook's cells.
    """
    import jupytext
    import papermill as pm

    src = notebook_path(stage)
    nb = jupytext.read(src)
    nb.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    out = run_dir / "notebooks" / f"{src.stem}.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    # the kernel inherits both (no viewer widgets; progress lines go to the file this process
    # relays to its terminal); this process gets its old values back
    progress_file = out.with_suffix(".progress.log")
    previous = {k: os.environ.get(k) for k in (HEADLESS_ENV, PROGRESS_ENV, "OMP_WAIT_POLICY")}
    os.environ[HEADLESS_ENV] = "1"
    os.environ[PROGRESS_ENV] = str(progress_file)
    # OpenMP threads that spin while they wait take a busy machine's last core from the thread that
    # has work: passive waiting costs a quiet machine little and keeps a loaded one from stalling
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        with Relay(progress_file, emit=lambda line: print(f"  {line}", flush=True)):
            pm.execute_notebook(
                nb, str(out), parameters=params, kernel_name="python3", cwd=str(src.parent),
                progress_bar=progress_bar, log_output=False, execution_timeout=timeout,
                kernel_manager_class=ipc_kernel_manager_class(),
            )
    except pm.PapermillExecutionError as e:
        raise StageFailed(
            f"stage {stage} ({src.name}) failed in cell {e.exec_count}: {e.ename}: {e.evalue}\n"
            f"  executed notebook with the full traceback: {out}"
        ) from None
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out


def run(
    out: str | Path,
    profile: str = "quick",
    params: dict[str, Any] | None = None,
    stages: str | Iterable[str] | None = None,
    force: str | Iterable[str] | None = None,
    param_file: str | Path | None = None,
    progress_bar: bool = False,
    cell_timeout: int | None = None,
) -> Path:
    """Run the pipeline's notebooks into run directory ``out``; see module docstring.

    ``cell_timeout``: seconds any one notebook cell may run (papermill's execution timeout;
    None: no limit)."""
    t_run = time.perf_counter()
    import yaml

    run_dir = Path(out).resolve()
    given: dict[str, Any] = {}
    if param_file:
        text = Path(param_file).read_text()
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{param_file}: expected a mapping of parameter names to values, found {type(loaded).__name__}")
        given.update(loaded)
    given.update(params or {})
    for reserved in ("run_dir",):
        if reserved in given:
            raise ConfigError(f"parameter {reserved!r} is set by --out, not by -p")
    given["profile"] = given.get("profile", profile)
    given = config.validate(None, given)  # unknown names and bad types fail here, before any work
    chosen = parse_stages(stages)
    forced = parse_stages(force) if force else []

    run_dir.mkdir(parents=True, exist_ok=True)
    requested = {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(given.items())}
    if not forced:
        _check_run_params(run_dir, requested)
    for stage in forced:
        _retire(run_dir, stage)
    files.write_text(run_dir / "params.yaml", yaml.safe_dump(requested, sort_keys=True))
    if param_file:
        files.write_text(run_dir / "params.from_file.yaml", Path(param_file).read_text())

    from .runtime import environment_report

    record = files.read_json(run_dir / "run.json") if (run_dir / "run.json").exists() else {"stages": {}}
    record["environment"] = environment_report()
    record["profile"] = given["profile"]
    for stage in chosen:
        if stage_done(run_dir, stage):
            print(f"[run] {stage}: done already, skipped (use --force {stage} to redo)", flush=True)
            continue
        stage_names = config.stage_params(stage)
        stage_values = {k: v for k, v in given.items() if k in stage_names}
        stage_values = {k: list(v) if isinstance(v, tuple) else v for k, v in stage_values.items()}
        stage_values["run_dir"] = str(run_dir)
        print(f"[run] {stage}: executing {REGISTRY[stage].notebook}.py ...", flush=True)
        t0 = time.perf_counter()
        record["stages"][stage] = {"status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        files.write_json(run_dir / "run.json", record)
        try:
            nb_out = execute_stage(stage, run_dir, stage_values, timeout=cell_timeout, progress_bar=progress_bar)
        except StageFailed:
            record["stages"][stage]["status"] = "failed"
            files.write_json(run_dir / "run.json", record)
            raise
        seconds = time.perf_counter() - t0
        record["stages"][stage] = {"status": "done", "seconds": round(seconds, 1), "notebook": str(nb_out)}
        files.write_json(run_dir / "run.json", record)
        print(f"[run] {stage}: done in {seconds:.0f} s", flush=True)
    print_summary(run_dir, time.perf_counter() - t_run)
    return run_dir


def print_summary(run_dir: Path, seconds: float) -> None:
    """The run's closing lines: the main method's pooled metrics per dataset beside the best
    other method (:func:`~screener_nb.results.run_summary`), the run time and the report."""
    from .results import load_results, main_method, run_summary

    eval_dir = RunDir(run_dir).stage_dir("evaluate", create=False)
    if (eval_dir / "metrics.nc").exists():
        import pandas as pd

        ds = load_results(run_dir)
        main = main_method(ds)
        if len(ds.model) > 1:
            table = run_summary(ds, main=main)
            # one flat header line: the main method's metrics, then the best other method's
            table.columns = [a if b in (main, "") else f"{a} (other)" for a, b in table.columns]
            table = table.apply(lambda col: col.round(3) if col.dtype.kind == "f" else col)
            with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 3):
                print(f"[run] pooled results, main method {main}, best other method beside it:\n"
                      f"{table}", flush=True)
    print(f"[run] finished in {seconds / 60:.1f} min", flush=True)
    report = eval_dir / "report.html"
    if report.exists():
        print(f"[run] report: {report}", flush=True)
