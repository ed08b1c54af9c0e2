"""The one registry of pipeline stages: notebook, output folder, and the library function that trains.

``python -m screener_nb run`` executes the stages' notebooks in :data:`STAGE_ORDER`;
``python -m screener_nb train <stage> --run runs/x`` calls :func:`train_stage`, also under
``torchrun`` (the training loop joins the process group itself). A stage's parameters are
``config.STAGES[name]["params"]``; where its outputs and ``DONE`` marker live is
:attr:`Stage.folder`, read through :class:`screener_nb.rundir.RunDir`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from . import config
from .errors import ConfigError


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    Attributes:
        name: what users type (``--stages density``).
        notebook: its notebook's stem in ``notebooks/``.
        folder: its folder in the run directory (outputs and ``DONE``); None when it keeps nothing.
        trainer: ``"module:function"`` of the library function that trains it, or None.
    """

    name: str
    notebook: str
    folder: str | None
    trainer: str | None = None

    @property
    def number(self) -> str:
        """The notebook's two-digit number (``--stages 02-04``)."""
        return self.notebook[:2]


_FOLDERS = {"environment": None, "data": "data", "descriptor": "descriptor", "condition": "condition",
            "density": "density", "distill": "distill", "evaluate": "eval", "explore": None}
_TRAINERS = {"descriptor": "screener_nb.ssl.task:train_encoder", "condition": "screener_nb.ssl.task:train_encoder",
             "density": "screener_nb.density_fit:fit_densities", "distill": "screener_nb.distill:distill_student"}

#: stage name -> :class:`Stage`, in pipeline order
REGISTRY: dict[str, Stage] = {name: Stage(name, spec["notebook"], _FOLDERS[name], _TRAINERS.get(name))
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


def train_stage(stage: str, cfg: Any, **kwargs):
    """Train one stage from its resolved config (``config.resolve(stage, ...)``)."""
    spec = get(stage)
    if spec.trainer is None:
        trainers = ", ".join(s.name for s in REGISTRY.values() if s.trainer)
        raise ConfigError(f"stage {stage!r} does not train; expected one of {trainers}")
    trainer = spec.trainer
    if stage == "condition" and getattr(cfg, "condition_model", "masked_unet") == "context":
        trainer = "screener_nb.ssl.context_task:train_context"  # the CPU profiles' condition
    return _function(trainer)(cfg, **kwargs)
