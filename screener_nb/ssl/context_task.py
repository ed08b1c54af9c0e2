"""Training the context condition (notebook 03 in the quick and demo profiles).

The context condition (:mod:`screener_nb.models.context`) learns, from
unlabeled scans only, to predict the frozen descriptor's pooled features of
hidden blocks of cells from the visible cells around them. Training data are
the training cases' whole-scan grids, computed once with the descriptor
(:func:`scan_grids`): the pooled descriptor y, the coarse image (cell mean and
std) and the body cells. A step draws ``batch`` windows of ``window`` cells,
hides blocks (:func:`~screener_nb.models.context.training_mask`) and regresses
the standardised y at hidden body cells (mean squared error).

Artifacts in ``runs/<run>/condition/``: ``model.json`` (``kind: context``,
architecture and the standardisation of y), ``checkpoint.pt``, ``train_log.csv``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .. import files
from ..errors import ConfigError, InputError
from ..train import CHECKPOINT, TrainResult, TrainSettings, fit, load_checkpoint


def scan_grids(case: Any, descriptor: nn.Module | None, patch, stride, overlap: float = 0.25, sw_batch: int = 2) -> dict:
    """Whole-scan grids of one preprocessed case: ``y`` (D, x, y, z) pooled descriptor (only with a
    ``descriptor``: a context regressing the intensities needs none), ``coarse`` (2, x, y, z) cell
    mean / std of the image, ``body`` (x, y, z) bool (cells at least half inside the body)."""
    from ..features import body_cells, pooled_map
    from ..models.context import coarse_image

    x = torch.from_numpy(np.array(case.image, dtype=np.float32))[None, None]
    out = {"coarse": coarse_image(x, stride)[0], "body": torch.from_numpy(body_cells(case.body, stride))}
    if descriptor is not None:
        out["y"] = pooled_map(descriptor, x, patch, stride, overlap, sw_batch)[0]
    return out


def _crop(t: torch.Tensor, start: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """A (..., *size) window of t starting at ``start``, zero-padded past the scan's end."""
    out = torch.zeros(*t.shape[:-3], *size, dtype=torch.float32)
    v = t[(...,) + tuple(slice(s, s + n) for s, n in zip(start, size))].float()
    out[(...,) + tuple(slice(0, n) for n in v.shape[-3:])] = v
    return out


class ContextTask:
    """:class:`screener_nb.train.TrainTask` of the context condition on cached scan grids."""

    def __init__(self, grids: list[dict], window: int, block: int, ratio: float = 0.6, phase_prob: float = 0.5):
        if not grids:
            raise InputError("context training", "at least one training scan", "none")
        self.grids, self.size = grids, (int(window),) * 3
        self.block, self.ratio, self.phase_prob = int(block), float(ratio), float(phase_prob)

    def sample(self, rng: np.random.Generator) -> dict:
        from ..models.context import training_mask

        g = self.grids[int(rng.integers(len(self.grids)))]
        shape = g["body"].shape
        start = [int(rng.integers(0, max(1, n - s + 1))) for n, s in zip(shape, self.size)]
        mask = training_mask(self.size, self.block, rng, ratio=self.ratio, phase_prob=self.phase_prob)
        return {"coarse": _crop(g["coarse"], start, self.size), "y": _crop(g["y"], start, self.size),
                "body": _crop(g["body"][None], start, self.size), "mask": torch.from_numpy(mask)[None]}

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        net = getattr(model, "module", model)  # DDP wraps the network
        pred = model(batch["coarse"], batch["mask"])
        weight = batch["mask"] * batch["body"]
        loss = (net.loss(pred, batch["y"]) * weight).sum() / weight.sum().clamp_min(1.0)
        return loss, {"hidden_cells": float(weight.sum())}


def context_target(grids: dict, target: str) -> torch.Tensor:
    """What the context regresses, from :func:`scan_grids`' output: ``"descriptor"`` -> ``y``
    (D, x, y, z); ``"intensity"`` -> ``coarse`` (2, x, y, z), the cell mean and std: then the
    condition says what tissue the surroundings expect, and q(y | c) learns the descriptor's
    distribution in that tissue."""
    if target == "descriptor":
        return grids["y"]
    if target == "intensity":
        return grids["coarse"]
    raise ConfigError(f"context_target: expected 'descriptor' or 'intensity', found {target!r}")


def context_spec(cfg: Any, dim: int, mean: torch.Tensor, std: torch.Tensor) -> dict:
    return {"kind": "context", "size": cfg.model_size, "dim": int(dim), "block": int(cfg.context_block),
            "heteroscedastic": bool(cfg.context_heteroscedastic),
            "target": str(cfg.context_target), "centred": bool(cfg.context_centred),
            "norm": str(cfg.context_norm),
            "window": int(cfg.context_window), "pool_stride": list(cfg.pool_stride),
            "descriptor_patch": list(cfg.descriptor_patch), "y_mean": mean.tolist(), "y_std": std.tolist()}


def train_context(cfg: Any, *, callback: Callable[[dict], None] | None = None,
                  stop_after: int | None = None) -> TrainResult:
    """Train the context condition on the run's training cases (resumes if interrupted)."""
    from ..data.cohort import load_cohort
    from ..models.context import ContextNet
    from .task import load_encoder

    files.require_stage(cfg.run_dir, "descriptor")
    cases = load_cohort(cfg.run_dir, role="train")
    if not cases:
        raise InputError(Path(cfg.run_dir) / "data", "at least one training case", "none")
    # the descriptor's grids only when the context regresses them
    descriptor = load_encoder(cfg.run_dir, "descriptor") if cfg.context_target == "descriptor" else None
    stride = tuple(cfg.pool_stride)
    grids = [scan_grids(c, descriptor, tuple(cfg.descriptor_patch), stride) for c in cases]
    for g in grids:  # the target: the descriptor, or the cell intensities the network also sees
        g["y"] = context_target(g, cfg.context_target)
    ys = torch.cat([g["y"][:, g["body"]] for g in grids], 1)
    mean, std = ys.mean(1), ys.std(1).clamp_min(1e-4)
    for g in grids:  # standardised on the training cases' body cells
        g["y"] = (g["y"] - mean[:, None, None, None]) / std[:, None, None, None]
    out = files.stage_dir(cfg.run_dir, "condition")
    spec = context_spec(cfg, ys.shape[0], mean, std)
    files.write_json(out / "model.json", spec)
    torch.manual_seed(cfg.seed)
    model = ContextNet(spec["dim"], size=spec["size"], block=spec["block"], heteroscedastic=spec["heteroscedastic"],
                       norm=spec["norm"])
    task = ContextTask(grids, spec["window"], spec["block"], ratio=cfg.mask_ratio, phase_prob=cfg.context_phase_prob)
    return fit(model, task, TrainSettings.from_config(cfg), out, callback=callback, desc="condition",
               stop_after=stop_after)


def load_context(run_dir: str | Path, *, trained: bool = True, device: str | torch.device = "cpu") -> nn.Module:
    """The frozen context condition of a run (``condition/model.json`` of kind ``context``)."""
    from ..models.context import ContextNet

    folder = Path(run_dir) / "condition"
    spec = files.read_json(folder / "model.json")
    norm = spec.get("norm", "instance")  # runs made before the option: instance norm
    model = ContextNet(spec["dim"], size=spec["size"], block=spec["block"],
                       heteroscedastic=spec.get("heteroscedastic", False), norm=norm)
    if trained:
        load_checkpoint(folder, model)
        # the trained network's scan maps are memoised for the run's later stages (keyed by the weights' file)
        ckpt = folder / CHECKPOINT
        model.map_cache = (folder / "map_cache", f"{ckpt.stat().st_mtime_ns}-{ckpt.stat().st_size}")
    model.spec = {**spec, "out_channels": model.out_channels}
    # frozen batch statistics make the network window-independent: one pass over the whole grid
    model.window = None if norm == "batch" else (int(spec["window"]),) * 3
    model.centred = bool(spec.get("centred", False))
    return model.eval().requires_grad_(False).to(device)


def is_context(run_dir: str | Path) -> bool:
    """Whether the run's condition model is the context condition (else the paper's masked UNet)."""
    path = Path(run_dir) / "condition" / "model.json"
    return path.exists() and files.read_json(path).get("kind") == "context"


def context_maps(run_dir: str | Path, case: Any, *, trained: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(standardised target y, context condition c), each (D, x, y, z) float32, of one
    preprocessed case: what the condition predicts next to what is there (the target is the
    pooled descriptor, or with ``context_target="intensity"`` the cell mean and std, D = 2)."""
    from .task import load_encoder

    net = load_context(run_dir, trained=trained)
    spec = net.spec
    target = spec.get("target", "descriptor")
    descriptor = load_encoder(run_dir, "descriptor") if target == "descriptor" else None
    mean, std = torch.tensor(spec["y_mean"]), torch.tensor(spec["y_std"])
    g = scan_grids(case, descriptor, tuple(spec["descriptor_patch"]), tuple(spec["pool_stride"]))
    y = (context_target(g, target) - mean[:, None, None, None]) / std[:, None, None, None]
    c = net.scan_condition(g["coarse"][None])[0, :net.dim]  # not its variance
    return y.numpy(), c.numpy()


def context_quality(run_dir: str | Path, cases: Sequence[Any], *, trained: bool = True) -> dict[str, float]:
    """How well each case's surroundings predict its descriptor: R^2 of the context condition's
    masked-inference output against the standardised pooled descriptor, over body cells
    (0 = no better than the case's own mean, 1 = perfect). ``trained=False``: the same network
    at its random initialisation (the baseline)."""
    out = {}
    for case in cases:
        y, c = context_maps(run_dir, case, trained=trained)
        stride = tuple(files.read_json(Path(run_dir) / "condition" / "model.json")["pool_stride"])
        from ..features import body_cells

        body = body_cells(case.body, stride)
        err = np.square(c - y)[:, body].mean()
        out[str(case.id)] = float(1 - err / y[:, body].var(1).mean())
    return out
