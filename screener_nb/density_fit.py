"""The density stage (notebook 04): fit q(y | c) on frozen encoders.

For every requested condition (``none``, ``sincos``, ``learned``) and density
(``gaussian``, ``flow``) a model is trained on random crops of the training
cases: descriptor and condition maps are average-pooled with stride (3, 3, 2),
N(0, 0.1^2) noise is added to both during training only, and the loss is the
mean NLL over all grid positions (docs/method.md). All models train side by side
through the shared loop (:class:`DensityEnsemble`): one encoder pass per step
serves them all.

Artifacts: ``runs/<run>/density/<condition>-<density>/{model.json, checkpoint.pt, train_log.csv}``
and ``density/joint_fit/`` (the ensemble's checkpoint and log, for resuming).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import files
from .config import split_list
from .data.crops import random_crop
from .errors import ConfigError, InputError
from .features import FeatureExtractor, body_cells
from .methods import check_method, method_name
from .progress import report
from .train import CHECKPOINT, LOG, TrainSettings, read_log_rows, write_log_rows, fit, load_checkpoint, model_signature


class SharedFeatures(nn.Module):
    """One pass of the frozen encoders -> pooled descriptor y and every requested condition.

    ``forward(x (B,1,X,Y,Z), origin_mm (B,3)) -> (y (B,D,x,y,z), {condition: c (B,C,x,y,z) | None})``.
    The descriptor runs once whatever the number of conditions; the condition
    encoder runs once when ``learned`` is requested; ``sincos`` codes cost nothing.
    """

    def __init__(self, run_dir: Path, conditions, spacing, pool_stride, sincos_dim, device="cpu",
                 descriptor_map: str = "windows"):
        super().__init__()
        self.conditions = list(conditions)
        self.base = _extractor(run_dir, "learned" if "learned" in self.conditions else "none", spacing,
                               pool_stride, sincos_dim, device, descriptor_map)
        # per-condition views sharing the base's encoders (no copies): their dims go in model.json
        self.views = {c: FeatureExtractor(self.base.descriptor, c, self.base.condition_encoder, spacing,
                                          pool_stride, sincos_dim) for c in self.conditions}

    def forward(self, x: torch.Tensor, origin_mm: torch.Tensor) -> tuple[torch.Tensor, dict]:
        y, learned = self.base(x, origin_mm)
        conds = {"none": None, "learned": learned}
        if "sincos" in self.conditions:
            conds["sincos"] = self.base.sincos(origin_mm, tuple(y.shape[2:])).to(y.device, y.dtype)
        return y, {c: conds[c] for c in self.conditions}


class DensityEnsemble(nn.Module):
    """The density models of a run, fitted side by side on the same crops.

    Why together: every model of the ablation sits on the same frozen
    descriptor (and the ``learned`` ones on the same condition encoder);
    fitted one after the other, six models would run the encoders six times
    per step. Here one encoder pass serves all of them, while each model keeps
    its own parameters, AdamW state, training noise and gradient clipping
    (:meth:`clip_groups`), so its updates are those of a separate fit on the
    same crops (tested).

    ``forward(ys {name: (B,D,x,y,z)}, cs {name: (B,C,x,y,z) | None}) -> {name: log q (B,x,y,z)}``.
    """

    def __init__(self, densities: dict, conditions: dict):
        super().__init__()
        self.densities = nn.ModuleDict(densities)
        self.conditions = dict(conditions)
        self.config = {name: getattr(d, "config", None) for name, d in densities.items()}

    def clip_groups(self) -> list[list[nn.Parameter]]:
        return [list(d.parameters()) for d in self.densities.values()]

    def forward(self, ys: dict, cs: dict) -> dict:
        return {name: d.log_prob(ys[name], cs[name]) for name, d in self.densities.items()}


class DensityTask:
    """:class:`screener_nb.train.TrainTask` for a :class:`DensityEnsemble` on frozen features.

    The loss is the sum over models of each one's mean NLL (their parameters
    are disjoint, so each model's gradient is that of its own loss).
    """

    def __init__(self, cases: list, features: SharedFeatures, conditions: dict, patch, noise_std: float = 0.1):
        self.cases, self.features, self.patch, self.noise_std = cases, features, tuple(patch), noise_std
        self.conditions = dict(conditions)  # model name -> condition kind

    def sample(self, rng: np.random.Generator) -> dict:
        case = self.cases[int(rng.integers(len(self.cases)))]
        crop, start = random_crop(case.image, case.body, self.patch, rng)
        origin = start * np.asarray(case.spacing, dtype=np.float64)
        return {"x": crop[None], "origin": origin}

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        x = batch["x"]
        self.features.to(x.device)
        with torch.no_grad():
            y, conds = self.features(x.float(), batch["origin"])
            ys, cs = {}, {}
            for name, kind in self.conditions.items():  # independent noise per model, as in a separate fit
                ys[name] = (y + self.noise_std * torch.randn_like(y)).float()
                c = conds[kind]
                cs[name] = None if c is None else (c + self.noise_std * torch.randn_like(c)).float()
        nll = {name: -lp.mean() for name, lp in model(ys, cs).items()}
        logs = {}
        for name, v in nll.items():
            logs[f"nll_{name}"] = v.item()
            logs[f"nll_per_dim_{name}"] = v.item() / y.shape[1]
        return sum(nll.values()), logs


class ScanDensityTask:
    """:class:`screener_nb.train.TrainTask` for a :class:`DensityEnsemble` on cached scan grids.

    The frozen encoders ran once per training scan (:func:`scan_grids`); a sample is a
    window of ``cells`` grid cells of one scan (zero-padded past its end), sin-cos codes
    are made for the window's position on the fly. The loss of each model is its mean NLL
    over the window's body cells (air outside the body would only teach the density air).
    """

    def __init__(self, grids: list[dict], features: "SharedFeatures", conditions: dict, cells, noise_std: float = 0.1):
        if not grids:
            raise InputError("density training", "at least one training scan", "none")
        self.grids, self.features, self.cells = grids, features, tuple(int(c) for c in cells)
        self.conditions, self.noise_std = dict(conditions), noise_std

    def sample(self, rng: np.random.Generator) -> dict:
        from .ssl.context_task import _crop

        g = self.grids[int(rng.integers(len(self.grids)))]
        shape = g["body"].shape
        start = [int(rng.integers(0, max(1, n - s + 1))) for n, s in zip(shape, self.cells)]
        out = {"y": _crop(g["y"], start, self.cells), "body": _crop(g["body"][None], start, self.cells)[0],
               "cell_start": np.asarray(start, np.float64)}
        if g.get("learned") is not None:
            out["learned"] = _crop(g["learned"], start, self.cells)
        out["spacing"] = np.asarray(g["spacing"], np.float64)
        return out

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        y, body = batch["y"], batch["body"]
        stride = torch.tensor(self.features.base.pool_stride, dtype=torch.float64)
        kinds = set(self.conditions.values())
        conds = {"none": None, "learned": batch.get("learned")}
        if "sincos" in kinds:
            view = self.features.views["sincos"]
            origin = batch["cell_start"].double().cpu() * stride * batch["spacing"].double().cpu()
            conds["sincos"] = view.sincos(origin, tuple(y.shape[2:])).to(y.device, y.dtype)
        ys, cs = {}, {}
        for name, kind in self.conditions.items():  # independent noise per model, as in a separate fit
            ys[name] = y + self.noise_std * torch.randn_like(y)
            c = conds[kind]
            cs[name] = None if c is None else c + self.noise_std * torch.randn_like(c)
        n = body.sum().clamp_min(1.0)
        nll = {name: -(lp * body).sum() / n for name, lp in model(ys, cs).items()}
        logs = {}
        for name, v in nll.items():
            logs[f"nll_{name}"] = v.item()
            logs[f"nll_per_dim_{name}"] = v.item() / y.shape[1]
        return sum(nll.values()), logs


def scan_grids(cases: list, features: "SharedFeatures", patch, overlap: float = 0.25,
               progress: Callable[[str], None] | None = None) -> list[dict]:
    """Each training scan's pooled descriptor ``y`` (D, x, y, z) and learned condition (float16),
    body cells and spacing: what :class:`ScanDensityTask` crops from."""
    import time

    base = features.base
    out = []
    for i, case in enumerate(cases):
        t0 = time.perf_counter()
        x = torch.from_numpy(np.array(case.image, dtype=np.float32))[None, None]
        y, c = base.scan_features(x, patch, overlap)
        body = torch.from_numpy(body_cells(case.body, base.pool_stride))
        out.append({"y": y[0].cpu().half(), "learned": None if c is None else c[0].cpu().half(), "body": body,
                    "spacing": tuple(case.spacing)})
        if progress:
            progress(f"[density] features of {case.id} ({i + 1}/{len(cases)}) in {time.perf_counter() - t0:.1f} s")
    return out


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


def _extractor(run_dir: Path, condition: str, spacing, pool_stride, sincos_dim, device="cpu",
               descriptor_map: str = "windows") -> FeatureExtractor:
    from .ssl.task import load_encoder

    files.require_stage(run_dir, "descriptor")
    descriptor = load_encoder(run_dir, "descriptor", device=device)
    cond_enc = None
    if condition == "learned":
        from .ssl.context_task import is_context, load_context

        files.require_stage(run_dir, "condition")
        cond_enc = (load_context(run_dir, device=device) if is_context(run_dir)
                    else load_encoder(run_dir, "condition", device=device))
    return FeatureExtractor(descriptor, condition, cond_enc, spacing, pool_stride, sincos_dim,
                            descriptor_map).to(device).eval()


JOINT_DIR = "joint_fit"  # checkpoint + log of the ensemble (resume); each model is exported to <condition>-<density>/


def fit_densities(cfg: Any, *, callback: Callable[[str, dict], None] | None = None,
                  progress: Callable[[str], None] | None = report) -> dict[str, Path]:
    """Fit every (condition, density) pair the config asks for, side by side; return their folders.

    The ensemble trains through the shared loop in ``density/joint_fit/``
    (checkpointed, resumable); when it is done each model is written to its own
    folder (``model.json``, ``checkpoint.pt``, ``train_log.csv`` with ``loss`` and
    ``nll_per_dim`` of that model), which :func:`load_density` reads.
    ``callback(name, row)`` receives every model's log rows as they come.
    """
    from .data.cohort import load_cohort, read_index

    run_dir = Path(cfg.run_dir)
    cases = load_cohort(run_dir, role="train")
    if not cases:
        raise InputError(run_dir / "data", "at least one training case", "none")
    spacing = tuple(read_index(run_dir)["preprocess"]["spacing"])
    methods, residual = {}, None
    for condition in split_list(cfg.conditions):
        for density in split_list(cfg.densities):
            if density == "residual":  # the learned condition's own prediction: no other condition has one
                if condition == "learned":
                    residual = method_name(condition, density)
                continue
            check_method(condition, density)
            methods[method_name(condition, density)] = (condition, density)
    if not methods and residual is None:
        raise InputError("density parameters", "at least one condition and one density", f"conditions={cfg.conditions!r}, densities={cfg.densities!r}")
    needed = dict.fromkeys([c for c, _ in methods.values()] + (["learned"] if residual else []))
    features = SharedFeatures(run_dir, needed, spacing, cfg.pool_stride, cfg.sincos_dim,
                              descriptor_map=cfg.descriptor_map)
    stage = files.stage_dir(run_dir, "density")
    specs, densities = {}, {}
    for name, (condition, density) in methods.items():
        view = features.views[condition]
        specs[name] = {"condition": condition, "density": density, "dim": view.dim, "cond_dim": view.cond_dim,
                       "flow_depth": cfg.flow_depth, "flow_hidden": cfg.flow_hidden, "patch": list(cfg.patch),
                       "pool_stride": list(cfg.pool_stride), "sincos_dim": cfg.sincos_dim, "spacing": list(spacing),
                       "descriptor_map": cfg.descriptor_map}
        torch.manual_seed(cfg.seed)  # each model starts as it would in a fit of its own
        densities[name] = build_density_model(specs[name])
    ensemble = DensityEnsemble(densities, {n: c for n, (c, _) in methods.items()})

    def split_row(row: dict) -> None:
        for name in methods:
            callback(name, _model_row(row, name))

    settings = TrainSettings.from_config(cfg)
    from .ssl.context_task import is_context

    if residual and not is_context(run_dir):
        # the masked UNet predicts no intensities: there is no residual to score
        if progress:
            progress(f"[density] {residual} skipped: it needs the context condition (condition_model=context "
                     f"in stage 03), and {run_dir / 'condition'} holds the masked UNet")
        residual = None
    if cfg.descriptor_map != "windows" and not is_context(run_dir):
        raise ConfigError(f"density parameter descriptor_map={cfg.descriptor_map!r}: a whole-scan descriptor map "
                          f"needs the context condition (condition_model=context in stage 03), whose densities are "
                          f"fitted on whole scans; {run_dir / 'condition'} holds the masked UNet (use 'windows')")
    out = {}
    if is_context(run_dir):  # the context condition needs whole scans: encode each once, fit on its grid
        made = files.read_json(run_dir / "condition" / "model.json")
        if tuple(made["pool_stride"]) != tuple(cfg.pool_stride):
            raise InputError(run_dir / "condition" / "model.json", f"a context condition on this stage's grid "
                             f"(pool_stride {tuple(cfg.pool_stride)})", f"pool_stride {tuple(made['pool_stride'])} "
                             "(give both stages the same pool_stride)")
        grids = scan_grids(cases, features, cfg.patch, cfg.overlap, progress=progress)
        if residual:
            out[residual] = fit_residual(cfg, run_dir, cases, grids, features, spacing, stage / residual)
            if progress:
                progress(f"[density] {residual} fitted on {len(cases)} scans")
        cells = [p // s for p, s in zip(cfg.patch, cfg.pool_stride)]
        task = ScanDensityTask(grids, features, ensemble.conditions, cells, cfg.noise_std)
    else:
        task = DensityTask(cases, features, ensemble.conditions, cfg.patch, cfg.noise_std)
    if not methods:
        return out
    fit(ensemble, task, settings, stage / JOINT_DIR, callback=split_row if callback else None, desc="density")
    joint = load_checkpoint(stage / JOINT_DIR)
    rows = read_log_rows(stage / JOINT_DIR / LOG)
    for name, density in ensemble.densities.items():
        folder = stage / name
        wrapped = _LogProb(density)
        files.write_json(folder / "model.json", specs[name])
        files.torch_save({"model": wrapped.state_dict(), "signature": model_signature(wrapped),
                          "step": joint["step"], "settings": joint["settings"], "fitted_with": sorted(methods)},
                         folder / CHECKPOINT)
        write_log_rows(folder / LOG, [_model_row(r, name) for r in rows])
        out[name] = folder
    return out


def fit_residual(cfg: Any, run_dir: Path, cases: list, grids: list[dict], features: "SharedFeatures", spacing,
                 folder: Path) -> Path:
    """Fit and write the residual density (:mod:`screener_nb.models.residual`) of the context condition
    on the training scans' grids (their learned condition, from :func:`scan_grids`); returns its folder."""
    from .models.context import coarse_image
    from .models.residual import ResidualDensity

    net = features.base.condition_encoder
    spec = net.spec
    if spec.get("target", "descriptor") != "intensity":
        raise ConfigError(f"density 'residual' scores the cell intensities the context predicts: expected a context "
                          f"condition trained with context_target=intensity, found {spec.get('target', 'descriptor')!r} "
                          f"({run_dir / 'condition' / 'model.json'})")
    model = ResidualDensity(net.dim, cfg.residual_sigma, net.heteroscedastic, spec["y_mean"], spec["y_std"])

    def scans():
        for case, g in zip(cases, grids):
            x = torch.from_numpy(np.array(case.image, dtype=np.float32))[None, None]
            yield coarse_image(x, tuple(cfg.pool_stride))[0], g["learned"].float(), g["body"].numpy()

    model.fit(scans())
    files.write_json(folder / "model.json", {
        "condition": "learned", "density": "residual", "dim": features.base.dim, "cond_dim": model.cond_dim,
        "target_dim": model.dim, "sigma_cells": model.sigma_cells, "heteroscedastic": model.heteroscedastic,
        "scale": model.scale.tolist(), "patch": list(cfg.patch), "pool_stride": list(cfg.pool_stride),
        "sincos_dim": cfg.sincos_dim, "spacing": list(spacing), "fitted_on": [str(c.id) for c in cases]})
    files.torch_save({"model": model.state_dict(), "signature": model_signature(model), "step": 0}, folder / CHECKPOINT)
    return folder


def _model_row(row: dict, name: str) -> dict:
    """One model's view of an ensemble log row: its own NLL as ``loss`` and ``nll_per_dim``."""
    shared = {k: v for k, v in row.items() if k not in ("step", "loss") and not k.startswith("nll_")}
    return {"step": row["step"], "loss": row[f"nll_{name}"], "nll_per_dim": row[f"nll_per_dim_{name}"], **shared}


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
    # runs fitted before the descriptor could be encoded in one pass used the sliding windows
    extractor = _extractor(run_dir, condition, spec["spacing"], spec["pool_stride"], spec["sincos_dim"], device,
                           spec.get("descriptor_map", "windows"))
    if extractor.dim != spec["dim"] or extractor.cond_dim != spec["cond_dim"]:
        raise InputError(folder / "model.json", f"dimensions matching the run's encoders (d={extractor.dim}, "
                         f"c={extractor.cond_dim})", f"d={spec['dim']}, c={spec['cond_dim']}")
    if density == "residual":
        from .models.residual import ResidualDensity

        if not extractor.context:
            raise InputError(run_dir / "condition", "the context condition the residual density was fitted on",
                             "another condition model")
        model = ResidualDensity(spec["target_dim"], spec["sigma_cells"], spec["heteroscedastic"])
        load_checkpoint(folder, model)
        return extractor, model.eval(), tuple(spec["patch"])
    wrapped = _LogProb(build_density_model(spec))
    load_checkpoint(folder, wrapped)
    model = wrapped.density.to(device).eval().requires_grad_(False)
    return extractor, model, tuple(spec["patch"])
