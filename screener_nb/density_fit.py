"""The density stage (notebook 04): fit q(y | c) on frozen encoders.

For every requested condition (``none``, ``sincos``, ``learned``) and density
(``gaussian``, ``flow``) a model is trained through the shared loop on random
crops of the training cases: descriptor and condition maps are average-pooled
with stride (3, 3, 2), N(0, 0.1^2) noise is added to both during training
only, and the loss is the mean NLL over all grid positions (METHOD.md).

Artifacts: ``runs/<run>/density/<condition>-<density>/{model.json, checkpoint.pt, train_log.csv}``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import files
from .config import split_list
from .errors import InputError
from .inference import FeatureExtractor, check_method, method_name
from .train import TrainSettings, fit, load_checkpoint


def random_crop(image: np.ndarray, body: np.ndarray, patch, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A ``patch``-sized crop (zero-padded where the scan is smaller) centred
    near a random body voxel. Returns (crop (X, Y, Z) float32, start voxel (3,))."""
    patch = np.asarray(patch)
    shape = np.asarray(image.shape)
    step = max(1, body.size // 200_000)  # a strided subset of body voxels is plenty to pick a centre
    body_idx = np.flatnonzero(np.asarray(body).ravel()[::step])
    centre = np.array(np.unravel_index(int(rng.choice(body_idx)) * step, body.shape))
    start = np.clip(centre - patch // 2 + rng.integers(-(patch // 4), patch // 4 + 1), 0, np.maximum(shape - patch, 0))
    crop = np.zeros(tuple(patch), np.float32)
    sl = tuple(slice(s, min(s + p, n)) for s, p, n in zip(start, patch, shape))
    region = np.asarray(image[sl], dtype=np.float32)
    crop[tuple(slice(0, r) for r in region.shape)] = region
    return crop, start


class DensityTask:
    """:class:`screener_nb.train.TrainTask` for a density model on frozen features."""

    def __init__(self, cases: list, extractor: FeatureExtractor, patch, noise_std: float = 0.1):
        self.cases, self.extractor, self.patch, self.noise_std = cases, extractor, tuple(patch), noise_std

    def sample(self, rng: np.random.Generator) -> dict:
        case = self.cases[int(rng.integers(len(self.cases)))]
        crop, start = random_crop(case.image, case.body, self.patch, rng)
        origin = start * np.asarray(case.spacing, dtype=np.float64)
        return {"x": crop[None], "origin": origin}

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        x = batch["x"]
        self.extractor.to(x.device)
        with torch.no_grad():
            y, c = self.extractor(x.float(), batch["origin"])
            y = y + self.noise_std * torch.randn_like(y)
            if c is not None:
                c = c + self.noise_std * torch.randn_like(c)
        nll = -model(y.float(), None if c is None else c.float()).mean()
        return nll, {"nll_per_dim": nll.item() / y.shape[1]}


class _LogProb(nn.Module):
    """Wrap a density so DDP sees ``forward(y, c) = log_prob(y, c)``."""

    def __init__(self, density: nn.Module):
        super().__init__()
        self.density = density
        self.config = getattr(density, "config", None)

    def forward(self, y, c):
        return self.density.log_prob(y, c)


def build_density_model(spec: dict) -> nn.Module:
    from .models.density import build_density

    kind = spec["density"]
    if kind == "gaussian" and spec["cond_dim"] == 0:
        kind = "unconditional_gaussian"
    kw = {"depth": spec["flow_depth"], "hidden": spec["flow_hidden"]} if kind == "flow" else {}
    return build_density(kind, dim=spec["dim"], cond_dim=spec["cond_dim"], **kw)


def _extractor(run_dir: Path, condition: str, spacing, pool_stride, sincos_dim, device="cpu") -> FeatureExtractor:
    from .ssl.task import load_encoder

    files.require_stage(run_dir, "descriptor")
    descriptor = load_encoder(run_dir, "descriptor", device=device)
    cond_enc = None
    if condition == "learned":
        files.require_stage(run_dir, "condition")
        cond_enc = load_encoder(run_dir, "condition", device=device)
    return FeatureExtractor(descriptor, condition, cond_enc, spacing, pool_stride, sincos_dim).to(device).eval()


def fit_densities(cfg: Any, *, callback: Callable[[str, dict], None] | None = None) -> dict[str, Path]:
    """Train every (condition, density) pair the config asks for; return their folders."""
    from .data.cohort import load_cohort, read_index

    run_dir = Path(cfg.run_dir)
    cases = load_cohort(run_dir, role="train")
    if not cases:
        raise InputError(run_dir / "data", "at least one training case", "none")
    spacing = tuple(read_index(run_dir)["preprocess"]["spacing"])
    out = {}
    for condition in split_list(cfg.conditions):
        extractor = _extractor(run_dir, condition, spacing, cfg.pool_stride, cfg.sincos_dim)
        for density in split_list(cfg.densities):
            check_method(condition, density)
            name = method_name(condition, density)
            folder = files.stage_dir(run_dir, "density") / name
            spec = {"condition": condition, "density": density, "dim": extractor.dim, "cond_dim": extractor.cond_dim,
                    "flow_depth": cfg.flow_depth, "flow_hidden": cfg.flow_hidden, "patch": list(cfg.patch),
                    "pool_stride": list(cfg.pool_stride), "sincos_dim": cfg.sincos_dim, "spacing": list(spacing)}
            files.write_json(folder / "model.json", spec)
            torch.manual_seed(cfg.seed)
            model = _LogProb(build_density_model(spec))
            cb = (lambda row, name=name: callback(name, row)) if callback else None
            fit(model, DensityTask(cases, extractor, cfg.patch, cfg.noise_std), TrainSettings.from_config(cfg),
                folder, callback=cb, desc=f"density {name}")
            out[name] = folder
    return out


def load_density(run_dir: str | Path, condition: str, density: str, device: str | torch.device = "cpu"):
    """(FeatureExtractor, density model, patch) of a fitted method, frozen, on ``device``."""
    run_dir = Path(run_dir)
    check_method(condition, density)
    folder = run_dir / "density" / method_name(condition, density)
    if not (folder / "model.json").exists():
        fitted = sorted(p.name for p in (run_dir / "density").glob("*-*") if (p / "model.json").exists())
        raise InputError(run_dir / "density", f"a fitted '{method_name(condition, density)}' density model",
                         f"only {', '.join(fitted) or 'none'} (fit it in notebook 04 / -p conditions=... densities=...)")
    spec = files.read_json(folder / "model.json")
    extractor = _extractor(run_dir, condition, spec["spacing"], spec["pool_stride"], spec["sincos_dim"], device)
    if extractor.dim != spec["dim"] or extractor.cond_dim != spec["cond_dim"]:
        raise InputError(folder / "model.json", f"dimensions matching the run's encoders (d={extractor.dim}, "
                         f"c={extractor.cond_dim})", f"d={spec['dim']}, c={spec['cond_dim']}")
    wrapped = _LogProb(build_density_model(spec))
    load_checkpoint(folder, wrapped)
    model = wrapped.density.to(device).eval().requires_grad_(False)
    return extractor, model, tuple(spec["patch"])
