"""Training the descriptor and condition encoders (notebooks 02 and 03).

Both encoders are the same recipe (docs/method.md): a full-resolution 3D UNet,
positive voxel pairs from two overlapping augmented crops, a dense SSL loss.
The condition encoder additionally sees block-masked views (two input
channels: image with hidden blocks zeroed, and the mask) and must produce the
same embedding for hidden voxels, so it can only encode context.

Artifacts in ``runs/<run>/<stage>/``: ``model.json`` (architecture),
``checkpoint.pt`` (encoder + SSL head + optimiser state), ``train_log.csv``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .. import files
from ..errors import ConfigError, InputError
from ..train import TrainResult, TrainSettings, fit, load_checkpoint
from .losses import DenseSSLHead
from .augment import ColorAugment
from .masking import BlockMasking
from .pairs import PairSampler

ENCODER_STAGES = ("descriptor", "condition")


class SSLModel(nn.Module):
    """Encoder + SSL head; ``forward`` returns the loss so DDP can wrap it."""

    def __init__(self, encoder: nn.Module, head: DenseSSLHead):
        super().__init__()
        self.encoder, self.head = encoder, head
        self.config = {"encoder": getattr(encoder, "config", None), "head": head.kind}

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, idx1: torch.Tensor, idx2: torch.Tensor,
                valid: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """x1, x2 (B, C, X, Y, Z) views; idx (B, N, 3); valid (B, N) -> (loss, logs)."""
        f = self.encoder(torch.cat([x1, x2]))  # one pass for both views
        f1, f2 = f.float().chunk(2)
        return self.head(f1, f2, idx1, idx2, valid)


class PairTask:
    """:class:`screener_nb.train.TrainTask` drawing one crop pair per sample."""

    def __init__(self, sampler: PairSampler):
        self.sampler = sampler

    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        b = self.sampler.sample_batch(rng, 1)
        return {"x1": b.input1[0], "x2": b.input2[0], "idx1": b.idx1[0], "idx2": b.idx2[0], "valid": b.valid[0]}

    def loss(self, model: nn.Module, batch: dict[str, Any]):
        loss, logs = model(batch["x1"], batch["x2"], batch["idx1"], batch["idx2"], batch["valid"])
        return loss, {k: float(v) for k, v in logs.items() if k != "loss"}


def encoder_spec(cfg: Any) -> dict:
    """Architecture of a stage's encoder (saved as model.json, used to rebuild it)."""
    if cfg.stage not in ENCODER_STAGES:
        raise ConfigError(f"stage {cfg.stage!r} has no encoder; expected one of {ENCODER_STAGES}")
    return {"size": cfg.model_size, "in_channels": 2 if cfg.stage == "condition" else 1,
            "out_channels": cfg.embed_dim, "seed": cfg.seed}


def build_encoder(spec: dict) -> nn.Module:
    from ..models.unet import build_unet

    return build_unet(spec["size"], in_channels=spec["in_channels"], out_channels=spec["out_channels"])


def color_augment(name: str) -> ColorAugment:
    """The views' colour augmentations: ``paper`` (docs/method.md) or ``no_intensity`` (blur/sharpen and
    noise only, so the features are not taught to ignore a region's absolute intensity)."""
    if name == "paper":
        return ColorAugment()
    if name == "no_intensity":
        return ColorAugment(brightness_p=0.0, contrast_p=0.0, gamma_p=0.0)
    raise ConfigError(f"color_augment: expected paper or no_intensity, found {name!r}")


def make_sampler(cfg: Any, cases: list) -> PairSampler:
    masking = None
    if cfg.stage == "condition":
        masking = BlockMasking(grid=tuple(cfg.mask_grid), ratio=cfg.mask_ratio, p=cfg.mask_prob)
    return PairSampler(cases, patch=tuple(cfg.patch), n_pairs=cfg.n_pairs, masking=masking,
                       augment=color_augment(getattr(cfg, "color_augment", "paper")))


def make_model(cfg: Any) -> SSLModel:
    torch.manual_seed(cfg.seed)
    encoder = build_encoder(encoder_spec(cfg))
    out = None if cfg.loss == "vicreg" else 128
    head = DenseSSLHead(cfg.loss, dim=cfg.embed_dim, hidden=cfg.expander_width,
                        out=cfg.expander_width if cfg.loss == "vicreg" else out)
    return SSLModel(encoder, head)


def train_encoder(cfg: Any, *, callback: Callable[[dict], None] | None = None,
                  stop_after: int | None = None) -> TrainResult:
    """Train the ``cfg.stage`` encoder on the run's training cases (resumes if interrupted)."""
    from ..data.cohort import load_cohort

    files.require_stage(cfg.run_dir, "data")
    cases = load_cohort(cfg.run_dir, role="train")
    if not cases:
        raise InputError(Path(cfg.run_dir) / "data", "at least one training case", "none")
    out = files.stage_dir(cfg.run_dir, cfg.stage)
    files.write_json(out / "model.json", encoder_spec(cfg))
    model = make_model(cfg)
    return fit(model, PairTask(make_sampler(cfg, cases)), TrainSettings.from_config(cfg), out,
               callback=callback, desc=cfg.stage, stop_after=stop_after)


def load_encoder(run_dir: str | Path, stage: str, *, trained: bool = True, device: str | torch.device = "cpu") -> nn.Module:
    """The frozen encoder of a finished (or running) SSL stage, in eval mode.

    ``trained=False`` returns the same architecture at its random initialisation
    (the baseline of the quality figures): the weights training started from
    (:func:`make_model` seeds with the stage's seed before building the encoder).
    """
    folder = Path(run_dir) / stage
    spec = files.read_json(folder / "model.json")
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        torch.manual_seed(int(spec.get("seed", 0)))
        encoder = build_encoder(spec)
    if trained:
        ckpt = load_checkpoint(folder)
        state = {k[len("encoder."):]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
        try:
            encoder.load_state_dict(state)
        except RuntimeError as e:
            raise InputError(folder / "checkpoint.pt", f"encoder weights for {spec}", f"mismatched weights ({e})") from e
    encoder.eval().requires_grad_(False)
    encoder.spec = spec
    return encoder.to(device)


def encode(encoder: nn.Module, image: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Feature maps of an encoder for (B, 1, X, Y, Z) images in [0, 1].

    The condition encoder takes two channels (image with hidden voxels zeroed,
    mask); at inference nothing is hidden, so its mask channel is zero. A
    one-channel encoder given a mask just sees the zeroed image.
    """
    if mask is None:
        mask = torch.zeros_like(image)
    x = image * (1 - mask)
    in_channels = getattr(encoder, "spec", {}).get("in_channels", 1)
    if in_channels == 2:
        x = torch.cat([x, mask], dim=1)
    return encoder(x)
