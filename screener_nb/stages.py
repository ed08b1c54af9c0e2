"""The library function behind each training stage (shared by notebooks and the CLI).

``python -m screener_nb train <stage> --run runs/x`` calls :func:`train_stage`,
also under ``torchrun`` (the training loop joins the process group itself).
"""
from __future__ import annotations

from typing import Any

from .errors import ConfigError


def train_stage(stage: str, cfg: Any, **kwargs):
    if stage == "condition" and getattr(cfg, "condition_model", "masked_unet") == "context":
        from .ssl.context_task import train_context

        return train_context(cfg, **kwargs)
    if stage in ("descriptor", "condition"):
        from .ssl.task import train_encoder

        return train_encoder(cfg, **kwargs)
    if stage == "density":
        from .density_fit import fit_densities

        return fit_densities(cfg, **kwargs)
    if stage == "distill":
        from .distill import distill_student

        return distill_student(cfg, **kwargs)
    raise ConfigError(f"stage {stage!r} does not train; expected descriptor, condition, density or distill")
