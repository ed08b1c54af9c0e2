"""The one registry of pipeline stages: notebook, output folder, and the library function that does it.

``python -m screener_nb run`` executes the stages' notebooks in :data:`STAGE_ORDER`; each
notebook does its stage's work with :func:`run_stage`, which calls the stage's library function
and, once that has finished, writes the stage's ``DONE`` marker (with a summary of what was
done). The notebook's own checks and figures are kept beside it in ``summary.json``
(:meth:`screener_nb.rundir.RunDir.write_summary`), so a notebook never decides whether its stage
is complete. ``python -m screener_nb train <stage> --run runs/x`` calls :func:`train_stage`, also
under ``torchrun`` (the training loop joins the process group itself; rank 0 writes ``DONE``).
A stage's parameters are ``config.STAGES[name]["params"]``; where its outputs and ``DONE``
marker live is :attr:`Stage.folder`, read through :class:`screener_nb.rundir.RunDir`.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import config, files
from .errors import ConfigError


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    Attributes:
        name: what users type (``--stages density``).
        notebook: its notebook's stem in ``notebooks/``.
        folder: its folder in the run directory (outputs and ``DONE``); None when it keeps nothing.
        function: ``"module:function"`` of the library function that does its work, or None
            (the environment check and the viewer keep nothing).
        trains: whether that function trains a model (``python -m screener_nb train``).
    """

    name: str
    notebook: str
    folder: str | None
    function: str | None = None
    trains: bool = False

    @property
    def number(self) -> str:
        """The notebook's two-digit number (``--stages 02-04``)."""
        return self.notebook[:2]


_FOLDERS = {"environment": None, "data": "data", "descriptor": "descriptor", "condition": "condition",
            "density": "density", "distill": "distill", "evaluate": "eval", "explore": None}
_TRAINERS = {"descriptor": "screener_nb.ssl.task:train_encoder", "condition": "screener_nb.ssl.task:train_encoder",
             "density": "screener_nb.density_fit:fit_densities", "distill": "screener_nb.distill:distill_student"}
_FUNCTIONS = {"data": "screener_nb.data.build:prepare_data", **_TRAINERS,
              "evaluate": "screener_nb.evaluate:run_evaluation"}

#: stage name -> :class:`Stage`, in pipeline order
REGISTRY: dict[str, Stage] = {name: Stage(name, spec["notebook"], _FOLDERS[name], _FUNCTIONS.get(name),
                                          name in _TRAINERS)
                              for name, spec in config.STAGES.items()}
STAGE_ORDER = list(REGISTRY)
#: what ``python -m screener_nb run`` executes without ``--stages``
DEFAULT_STAGES = [s for s in STAGE_ORDER if s != "explore"]


def get(name: str) -> Stage:
    """The stage called ``name``; a clear error listing the known ones otherwise."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown stage {name!r}; known: {', '.join(f'{s.name} ({s.number})' for s in REGISTRY.values())}")
    return REGISTRY[name]


def _function(path: str):
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def stage_function(stage: str, cfg: Any = None):
    """The library function that does ``stage``'s work (for ``cfg``: the CPU profiles' context
    condition has its own trainer)."""
    spec = get(stage)
    if spec.function is None:
        doers = ", ".join(s.name for s in REGISTRY.values() if s.function)
        raise ConfigError(f"stage {stage!r} keeps no outputs, so it has no stage function; expected one of {doers}")
    path = spec.function
    if stage == "condition" and getattr(cfg, "condition_model", "masked_unet") == "context":
        path = "screener_nb.ssl.context_task:train_context"
    return _function(path)


def run_stage(stage: str, cfg: Any, **kwargs):
    """Do ``stage``'s work from its resolved config (``config.resolve(stage, ...)``) and return what
    its function returns; when the work is complete, write the stage's ``DONE`` marker (rank 0).

    A training loop stopped before ``cfg.steps`` (``stop_after``) leaves the stage unfinished, so
    the next call resumes it. The marker holds :func:`stage_summary` of the result; a stage that
    is already done keeps the marker it has."""
    result = stage_function(stage, cfg)(cfg, **kwargs)
    info = stage_summary(stage, cfg, result)
    done = Path(cfg.run_dir) / get(stage).folder / files.DONE
    # a stage already done keeps its marker: its time stamps the caches built on it
    if info is not None and int(os.environ.get("RANK", "0")) == 0 and not done.exists():
        files.mark_done(cfg.run_dir, get(stage).folder, info)
    return result


def train_stage(stage: str, cfg: Any, **kwargs):
    """:func:`run_stage` for the stages that train (``python -m screener_nb train``)."""
    if not get(stage).trains:
        trainers = ", ".join(s.name for s in REGISTRY.values() if s.trains)
        raise ConfigError(f"stage {stage!r} does not train; expected one of {trainers}")
    return run_stage(stage, cfg, **kwargs)


def stage_summary(stage: str, cfg: Any, result: Any) -> dict | None:
    """What the ``DONE`` marker of ``stage`` records about ``result``; None while it is unfinished."""
    steps = getattr(result, "steps_done", None)
    if steps is not None and steps < int(cfg.steps):
        return None
    if stage == "data":
        cases = result["cases"]
        return {"cases": len(cases), "datasets": sorted({str(c.get("dataset", "")) for c in cases})}
    if stage in ("descriptor", "condition"):
        return {"steps": steps, **({"model": cfg.condition_model} if stage == "condition" else {})}
    if stage == "density":
        return {"methods": list(result)}
    if stage == "distill":
        return {"steps": steps, "teacher": result.teacher}
    if stage == "evaluate":
        return {"methods": [str(m) for m in result.model.values], "max_fpr": float(cfg.max_fpr)}
    raise ConfigError(f"stage {stage!r} has no summary")
