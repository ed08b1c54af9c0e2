"""The distilled student: its network, its target transform, and loading it from a run.

The student (:func:`build_student`) is a UNet with one output channel and no activation,
either at full resolution (``student_grid="voxels"``, the paper's) or on the teacher's own
cell grid (``"cells"``, :class:`CellStudent`). It regresses a monotone transform of the
teacher's map (:class:`TargetTransform`); :func:`load_student` wraps it so that its output
is back on the teacher's scale (:class:`ScaledStudent`), which is what
``Screener.from_run(run, student=True)`` serves. Training it is :mod:`screener_nb.distill`.

Artifacts read here (``runs/<run>/distill/``): ``model.json`` (architecture, patch,
teacher, target transform) and ``checkpoint.pt``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import files
from .errors import ConfigError, InputError
from .runtime import resolve_device
from .train import load_checkpoint

STAGE = "distill"


#: the regression targets :class:`TargetTransform` knows
TARGETS = ("quantile", "standard")


class TargetTransform:
    """A monotone map from the teacher's scores to the student's regression target, and back.

    ``standard``: ``(s - mean) / std``. ``quantile``: the score's rank among the
    pooled training body voxels, Gaussianised, ``Phi^-1(F(s))`` with ``F`` the
    empirical CDF interpolated between ``n_quantiles`` quantiles (what sklearn's
    ``QuantileTransformer(output_distribution="normal")`` computes). Why quantile
    by default: a flow's -log q is heavy-tailed (a few voxels hundreds of nats
    above the rest), so with ``standard`` the squared error is dominated by those
    few voxels and the student learns the tail, not the ranking that every metric
    reads. The quantile target is bounded (+-5.2) and, being strictly monotone,
    keeps the teacher's ranking, hence its AUROC, exactly.

    :meth:`inverse` (torch, differentiable, any device) brings the student's
    output back to the teacher's scale; it is hand-written because neither torch
    nor sklearn has a torch-side inverse of a quantile table.
    """

    BOUND = 1e-7  # probabilities clipped as sklearn does: Phi^-1 stays within +-5.2

    def __init__(self, kind: str, **state):
        if kind not in TARGETS:
            raise ConfigError(f"parameter 'target': expected one of {list(TARGETS)}, found {kind!r}")
        self.kind = kind
        self.mean, self.std = float(state.get("mean", 0.0)), float(state.get("std", 1.0))
        self.quantiles = np.asarray(state.get("quantiles", []), dtype=np.float64)  # (K,) increasing scores
        self.probs = np.asarray(state.get("probs", []), dtype=np.float64)  # (K,) increasing CDF values

    @classmethod
    def fit(cls, kind: str, scores: np.ndarray, n_quantiles: int = 1000) -> "TargetTransform":
        """Fitted on the pooled body scores (N,) of the training cases."""
        scores = np.asarray(scores, dtype=np.float64).ravel()
        mean, std = float(scores.mean()), float(scores.std())
        std = std if std > 1e-12 else 1.0
        if kind != "quantile":
            return cls(kind, mean=mean, std=std)
        probs = np.linspace(0.0, 1.0, max(2, min(int(n_quantiles), scores.size)))
        quantiles = np.quantile(scores, probs)
        # ties (a constant region) would make the CDF a step: keep one probability per distinct score
        quantiles, first, counts = np.unique(quantiles, return_index=True, return_counts=True)
        probs = np.array([probs[i:i + n].mean() for i, n in zip(first, counts)])
        if quantiles.size < 2:  # a constant teacher: any monotone map is as good
            quantiles, probs = np.array([quantiles[0] - 1.0, quantiles[0] + 1.0]), np.array([0.0, 1.0])
        return cls(kind, mean=mean, std=std, quantiles=quantiles, probs=probs)

    def forward(self, scores: np.ndarray) -> np.ndarray:
        """Teacher scores (any shape) -> targets, float32."""
        s = np.asarray(scores, dtype=np.float64)
        if self.kind == "standard":
            return ((s - self.mean) / self.std).astype(np.float32)
        from scipy.special import ndtri

        p = np.clip(np.interp(s, self.quantiles, self.probs), self.BOUND, 1 - self.BOUND)
        return ndtri(p).astype(np.float32)

    def inverse(self, target: torch.Tensor) -> torch.Tensor:
        """Student outputs (any shape) -> the teacher's scale, piecewise linear in the CDF."""
        if self.kind == "standard":
            return target * self.std + self.mean
        p = torch.special.ndtr(target.double())
        probs = torch.as_tensor(self.probs, device=target.device)
        quantiles = torch.as_tensor(self.quantiles, device=target.device)
        hi = torch.searchsorted(probs, p.contiguous()).clamp(1, probs.numel() - 1)
        p0, p1, q0, q1 = probs[hi - 1], probs[hi], quantiles[hi - 1], quantiles[hi]
        frac = ((p - p0) / (p1 - p0)).clamp(0.0, 1.0)
        return (q0 + frac * (q1 - q0)).to(target.dtype)

    def state(self) -> dict:
        """JSON-ready description (``model.json``), read back by ``TargetTransform(**state)``."""
        out = {"kind": self.kind, "mean": self.mean, "std": self.std}
        if self.kind == "quantile":
            out.update(quantiles=self.quantiles.tolist(), probs=self.probs.tolist())
        return out


# ============================================================================ the student


class ScaledStudent(nn.Module):
    """``forward(x (B,1,X,Y,Z)) -> (B,1,X,Y,Z)`` scores on the teacher's scale (target transform inverted)."""

    def __init__(self, unet: nn.Module, transform: TargetTransform):
        super().__init__()
        self.unet, self.transform = unet, transform
        self.config = {"student": getattr(unet, "config", None), "target": transform.kind}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform.inverse(self.unet(x).float())


#: where the student predicts: ``voxels`` (a full-resolution UNet, the paper's) or ``cells``
#: (:class:`CellStudent`, on the teacher's cell grid)
STUDENT_GRIDS = ("voxels", "cells")


class CellStudent(nn.Module):
    """A student on the teacher's cell grid: ``forward(x (B,1,X,Y,Z)) -> (B,1,X,Y,Z)``.

    A strided stem (kernel = stride = the density grid's pooling ``stride``) turns the CT into
    cells of ``stem_channels`` features, a UNet of ``size`` with one level fewer (the cells
    already are a coarser grid, and a 48 x 48 x 32 crop is 16^3 cells) predicts one value per cell, and
    trilinear upsampling (``align_corners=False``, as the teacher's cell scores are upsampled)
    brings it to the voxels. Every level of the UNet works on ``prod(stride)`` times fewer
    positions than a full-resolution student: the teacher's map carries no finer detail.
    Input sides must be multiples of ``self.multiple`` (the stride times the UNet's multiple).
    """

    def __init__(self, size: str, stride=(3, 3, 2), stem_channels: int = 16):
        super().__init__()
        from .models.unet import UNET_SIZES, build_unet

        self.stride = tuple(int(s) for s in stride)
        self.stem = nn.Conv3d(1, int(stem_channels), kernel_size=self.stride, stride=self.stride)
        features = tuple(UNET_SIZES[size]["features"])[:-1] if size in UNET_SIZES else None
        self.unet = build_unet(size, in_channels=int(stem_channels), out_channels=1, features=features)
        self.multiple = tuple(s * int(self.unet.multiple) for s in self.stride)
        self.config = {"grid": "cells", "size": size, "stride": list(self.stride), "stem_channels": int(stem_channels),
                       "unet": self.unet.config}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        cells = self.unet(F.leaky_relu(self.stem(x), 0.01))
        return F.interpolate(cells, size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)


def build_student(size: str, grid: str = "voxels", stride=(3, 3, 2)) -> nn.Module:
    """The student architecture, 1 input channel, 1 output channel, no activation: a full-resolution
    UNet of ``size`` (``grid="voxels"``) or a :class:`CellStudent` on cells of ``stride`` voxels."""
    from .models.unet import build_unet

    if grid == "voxels":
        return build_unet(size, in_channels=1, out_channels=1)
    if grid == "cells":
        return CellStudent(size, stride)
    raise ConfigError(f"student grid: expected one of {', '.join(STUDENT_GRIDS)}, found {grid!r}")


def check_patch(net: nn.Module, patch, name: str = "patch") -> tuple[int, int, int]:
    """The crop / window size as ints, refused early when the network cannot take it."""
    patch = tuple(int(p) for p in patch)
    multiple = getattr(net, "multiple", 1)
    multiples = tuple(int(m) for m in multiple) if isinstance(multiple, (tuple, list)) else (int(multiple),) * 3
    bad = [f"{'XYZ'[i]}={p}" for i, p in enumerate(patch) if i < 3 and p % multiples[i]]
    if len(patch) != 3 or bad:
        what = ("" if multiples[0] == multiples[1] == multiples[2] else " (X, Y, Z)")
        shown = multiples[0] if not what else multiples
        raise ConfigError(f"parameter {name!r}: expected 3 sizes that are multiples of {shown}{what} (what the "
                          f"{getattr(net, 'config', {}).get('size', '')} student's downsampling needs), found {patch}")
    return patch


def student_spec(run_dir: Path) -> dict:
    folder = run_dir / STAGE
    path = folder / "model.json"
    if not path.exists():
        raise InputError(run_dir, f"a distilled student ({path})",
                         "none: run notebook 05 (python -m screener_nb run --stages distill)")
    spec = files.read_json(path)
    need = ("size", "patch", "target")
    missing = [k for k in need if k not in spec]
    if missing:
        raise InputError(path, f"a student description with keys {list(need)}", f"keys {sorted(spec)} (missing {missing})")
    return spec


def student_transform(spec: dict) -> TargetTransform:
    """The target transform a student was trained with (from its ``model.json``)."""
    return TargetTransform(**spec["target"])


def load_student_unet(run_dir: str | Path, *, trained: bool = True, seed: int = 0,
                      device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The raw student UNet (output in target units, see :class:`TargetTransform`) and its ``model.json``.

    ``trained=False``: the same architecture at the initialisation distillation
    started from (``torch.manual_seed(seed)``), the baseline of the held-out MSE.
    """
    run_dir = Path(run_dir)
    spec = student_spec(run_dir)
    torch.manual_seed(seed)
    unet = build_student(spec["size"], spec.get("grid", "voxels"), spec.get("stride", (3, 3, 2)))
    if trained:
        ckpt_path = run_dir / STAGE / "checkpoint.pt"
        if not ckpt_path.exists():
            raise InputError(run_dir / STAGE, f"the student's weights ({ckpt_path})",
                             "no checkpoint: distillation has not run (or not reached its first checkpoint)")
        load_checkpoint(run_dir / STAGE, unet)  # InputError when the architecture does not match model.json
    return unet.to(resolve_device(device)).eval().requires_grad_(False), spec


def load_student(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, tuple[int, int, int]]:
    """``(model, patch)``: the frozen student, ``model(x (B,1,X,Y,Z)) -> (B,1,X,Y,Z)`` scores on
    the teacher's scale (target transform inverted), and its sliding-window size (X, Y, Z)."""
    unet, spec = load_student_unet(run_dir, device=device)
    model = ScaledStudent(unet, student_transform(spec))
    return model.to(resolve_device(device)).eval().requires_grad_(False), tuple(int(p) for p in spec["patch"])
