"""Typed parameters of every pipeline stage, and the three profiles.

Each numbered notebook has a ``parameters`` cell (papermill) with the names
listed here. Values left at ``None`` take the profile's default, so
``-p profile=demo`` changes every size at once; papermill itself never
recomputes parameters derived from others, which is why the notebook passes
its namespace through :func:`resolve` right after the parameters cell.

Profiles:
    quick  what the tests run: every notebook in under ~2 minutes on 2 CPU cores.
    demo   what ``make demo`` runs: features that work downstream, 00-06 in < 30 min on CPU.
    full   the paper's schedule (docs/method.md) for a GPU; no edits needed.

Unknown names, wrong types and impossible values are :class:`ConfigError`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping

from .errors import ConfigError, InputError

PROFILES = ("quick", "demo", "full")

#: the paper's cohort (docs/method.md): trained on NLST + AMOS + AbdomenAtlas, tested on
#: LIDC-IDRI, MIDRC-RICORD-1a, KiTS21 and LiTS; read through data_manifests/ from $SCREENER_DATA_DIR
PAPER_DATASETS = "nlst+amos+abdomenatlas+lidc_idri+midrc_ricord_1a+kits21+lits"


@dataclass(frozen=True)
class Param:
    """One parameter: its type, default (one value, or one per profile) and meaning."""

    type: type | tuple
    default: Any
    doc: str
    choices: tuple | None = None

    def default_for(self, profile: str) -> Any:
        if isinstance(self.default, dict):
            return self.default[profile]
        return self.default


def _p(type_, default, doc, choices=None) -> Param:
    return Param(type_, default, doc, choices)


def _prof(quick, demo, full) -> dict:
    return {"quick": quick, "demo": demo, "full": full}


COMMON = {
    "profile": _p(str, "quick", "size of everything: quick | demo | full", PROFILES),
    "run_dir": _p(str, None, "run directory shared by all stages (None: $SCREENER_RUN_DIR, else runs/<profile>)"),
    "device": _p(str, "auto", "auto | cpu | cuda | cuda:N"),
    "seed": _p(int, 0, "random seed (CPU runs are deterministic given it)"),
}

# Training-loop parameters shared by every stage that trains a network.
_TRAIN = {
    "steps": _p(int, None, "optimiser steps"),
    "batch": _p(int, None, "samples per step (crop pairs for SSL, crops for density)"),
    "lr": _p(float, _prof(1e-3, 1e-3, 3e-4), "peak learning rate (AdamW)"),
    "warmup": _p(int, None, "linear warm-up steps before the cosine decay"),
    "weight_decay": _p(float, 1e-6, "AdamW weight decay"),
    "grad_clip": _p(float, 1.0, "gradient-norm clip"),
    "checkpoint_every": _p(int, _prof(50, 100, 2000), "steps between atomic checkpoints"),
    "log_every": _p(int, _prof(5, 10, 100), "steps between log rows"),
    "num_workers": _p(int, _prof(0, 0, 8), "DataLoader worker processes producing batches"),
}

_SSL = {
    **_TRAIN,
    "steps": _p(int, _prof(30, 250, 300_000), "optimiser steps"),
    "batch": _p(int, _prof(2, 4, 8), "crop pairs per step"),
    # a short CPU schedule needs a larger step than the paper's 300k-step one (3e-3 vs 1e-3
    # doubled the demo's correspondence retrieval after 150 steps; see the README's notes)
    "lr": _p(float, _prof(1e-3, 3e-3, 3e-4), "peak learning rate (AdamW)"),
    "warmup": _p(int, _prof(5, 30, 10_000), "linear warm-up steps"),
    "model_size": _p(str, _prof("tiny", "tiny", "paper"), "UNet size: tiny | small | paper", ("tiny", "small", "paper")),
    "embed_dim": _p(int, 32, "descriptor channels d"),
    "loss": _p(str, "vicreg", "dense SSL loss", ("vicreg", "infonce")),
    "patch": _p(tuple, _prof((48, 48, 32), (32, 32, 32), (96, 96, 64)), "crop size (X, Y, Z) voxels after resizing"),
    "n_pairs": _p(int, _prof(256, 512, 1024), "voxel pairs sampled per crop pair"),
    "expander_width": _p(int, _prof(256, 512, 8192), "VICReg expander MLP width"),
    "color_augment": _p(str, "paper", "colour augmentations of the views: paper (blur/sharpen, noise, brightness, "
                        "contrast, gamma) | no_intensity (blur/sharpen and noise only: the features keep absolute "
                        "intensity)", ("paper", "no_intensity")),
}

STAGES: dict[str, dict] = {
    "environment": {"notebook": "00_environment_check", "params": {}},
    "data": {
        "notebook": "01_data_prep",
        "params": {
            "dataset": _p(str, _prof("phantoms", "phantoms+samples", PAPER_DATASETS),
                          "cohort: phantoms | samples | manifest names, joined with '+'"),
            "n_train": _p(int, _prof(4, 16, 0), "phantom training cases (healthy)"),
            "n_test": _p(int, _prof(3, 6, 0), "phantom evaluation cases (with lesions)"),
            "n_val": _p(int, _prof(1, 2, 0), "phantom validation cases (with lesions; thresholds are chosen on them)"),
            "n_calib": _p(int, _prof(1, 3, 0), "held-out healthy phantoms (label-free thresholds are calibrated on them)"),
            "phantom_shape": _p(tuple, _prof((96, 96, 80), (128, 128, 100), (160, 160, 128)), "phantom grid (X, Y, Z) voxels"),
            "phantom_spacing": _p(tuple, (2.0, 2.0, 2.5), "phantom voxel size (mm)"),
            "target_spacing": _p(tuple, (1.5, 1.5, 2.25), "preprocessed voxel size (mm)"),
            "clahe": _p(bool, _prof(False, False, True), "3D CLAHE after windowing (the authors call it essential; "
                        "quick / demo: off, it spreads the liver's HU over the range faint liver lesions span)"),
            "max_cases": _p(int, _prof(4, 0, 0), "cap on cases read from a manifest or the samples (0 = all)"),
        },
    },
    "descriptor": {"notebook": "02_descriptor_ssl", "params": dict(_SSL)},
    "condition": {
        "notebook": "03_condition_ssl",
        "params": {
            **_SSL,
            # quick / demo: the context condition (a masked predictor of the cell intensities on the
            # density grid, centred masked inference; README "Departures"); full: the paper's masked
            # full-resolution UNet
            "condition_model": _p(str, _prof("context", "context", "masked_unet"),
                                  "context (masked prediction from the surroundings on the density grid) | masked_unet (the paper's)",
                                  ("context", "masked_unet")),
            # demo: 1500 steps at 4e-3 (validation residual AUROC 0.85; 300: 0.67; 3000 at 2e-3: 0.91 in
            # the bench, 0.84 in a demo run that took 36 min, over the 30-min budget);
            # quick: 300 (the validation phantom's lung lesions 0.03-0.41 after 60 steps, 0.82-1.0 after 300)
            "steps": _p(int, _prof(300, 1500, 300_000), "optimiser steps"),
            "lr": _p(float, _prof(4e-3, 4e-3, 3e-4), "peak learning rate (AdamW)"),
            "mask_ratio": _p(float, 0.6, "fraction of blocks hidden in a masked view"),
            "mask_prob": _p(float, 0.5, "probability that a view is masked (masked_unet)"),
            "mask_grid": _p(tuple, (4, 4, 4), "blocks per axis (masked_unet; 96x96x64 crop -> 24x24x16 blocks)"),
            "context_block": _p(int, _prof(8, 8, 4), "context: side of a hidden block, in grid cells (8 cells = 36 mm)"),
            "context_window": _p(int, 32, "context: training window side, in grid cells"),
            "context_phase_prob": _p(float, 0.5, "context: share of training masks drawn like the inference masks"),
            "context_heteroscedastic": _p(bool, _prof(True, True, False), "context: also predict the log-variance "
                                          "(Gaussian NLL loss; the residual density reads it)"),
            "context_target": _p(str, _prof("intensity", "intensity", "descriptor"),
                                 "context: what hidden cells regress: descriptor (pooled) | "
                                 "intensity (cell mean and std); both standardised", ("descriptor", "intensity")),
            "context_centred": _p(bool, _prof(True, True, False), "context: read each cell from the pass that centres it in its "
                                  "hidden block (8x the inference passes)"),
            "context_norm": _p(str, _prof("batch", "batch", "instance"), "context: normalisation layers: instance | batch (frozen "
                               "statistics: whole-grid maps in one pass per mask, ~2.7x faster)", ("instance", "batch")),
            "pool_stride": _p(tuple, (3, 3, 2), "context: the density grid's pooling stride (as in stage 04)"),
            "descriptor_patch": _p(tuple, _prof((48, 48, 32), (48, 48, 32), (96, 96, 64)),
                                   "context: descriptor window (X, Y, Z) voxels for the scans' grids"),
        },
    },
    "density": {
        "notebook": "04_density_fit",
        "params": {
            **_TRAIN,
            "steps": _p(int, _prof(40, 150, 50_000), "optimiser steps per density model"),
            "batch": _p(int, _prof(2, 4, 4), "crops per step"),
            "warmup": _p(int, _prof(5, 40, 1000), "linear warm-up steps"),
            "conditions": _p(str, _prof("none,sincos,learned", "none,sincos,learned", "none,sincos,learned"),
                             "comma-separated conditions to fit: none, sincos, learned"),
            # quick / demo: also the context's own predictive density of the cell intensities
            # (README "Departures"; needs the context condition, so not the full profile's)
            "densities": _p(str, _prof("gaussian,flow,residual", "gaussian,flow,residual", "gaussian,flow"),
                            "comma-separated density models: gaussian, flow, residual (the learned context's "
                            "own prediction of the cell intensities; with the context condition only)"),
            "residual_sigma": _p(float, 1.0, "residual: Gaussian neighbourhood (cells) over which the "
                                 "standardised residual is averaged before it is scored"),
            "patch": _p(tuple, _prof((48, 48, 32), (48, 48, 32), (96, 96, 64)), "crop size (X, Y, Z) voxels"),
            "pool_stride": _p(tuple, (3, 3, 2), "average-pooling stride of the feature maps"),
            "noise_std": _p(float, 0.1, "N(0, s^2) noise on descriptors and conditions during training"),
            "flow_depth": _p(int, _prof(2, 4, 32), "flow blocks"),
            "flow_hidden": _p(int, _prof(64, 128, 512), "coupling-net width"),
            "sincos_dim": _p(int, 24, "channels of the sin-cos position condition"),
            "overlap": _p(float, _prof(0.25, 0.25, 0.5), "sliding-window overlap of the maps the notebook shows"),
            "descriptor_map": _p(str, "windows", "how a whole scan's descriptor map is computed, for fitting and for "
                                 "scoring: windows (sliding windows of `patch`, the paper's) | scan (one pass over the "
                                 "scan, tiled beyond 192 x 192 x 160 voxels; only for context runs, whose densities "
                                 "are fitted on whole scans)", ("windows", "scan")),
        },
    },
    "distill": {
        "notebook": "05_distill",
        "params": {
            **_TRAIN,
            # demo: 500 steps of the small cell student halve the gap to the teacher (validation, E31)
            "steps": _p(int, _prof(150, 500, 100_000), "student distillation steps"),
            "batch": _p(int, _prof(2, 4, 8), "crops per step"),
            "warmup": _p(int, _prof(5, 30, 2000), "linear warm-up steps"),
            "teacher": _p(str, _prof("learned-residual", "learned-residual", "learned-flow"),
                          "teacher method (<condition>-<density>)"),
            "target": _p(str, "quantile", "student's regression target: the teacher map's Gaussianised rank "
                         "(quantile) or its z-score (standard)", ("quantile", "standard")),
            "student_size": _p(str, _prof("tiny", "small", "paper"), "student UNet size", ("tiny", "small", "paper")),
            # quick / demo: on the teacher's cell grid (the map has no finer detail; ~18x fewer positions)
            "student_grid": _p(str, _prof("cells", "cells", "voxels"), "where the student predicts: voxels (a "
                               "full-resolution UNet, the paper's) | cells (strided stem, UNet on the density grid, "
                               "upsampled)", ("voxels", "cells")),
            "pool_stride": _p(tuple, (3, 3, 2), "the density grid's cells (voxels per cell; the cell student's stem)"),
            "patch": _p(tuple, _prof((48, 48, 32), (48, 48, 32), (96, 96, 64)), "crop size (X, Y, Z) voxels"),
            "finetune_k": _p(int, _prof(2, 4, 25), "labelled cases per fine-tuning fold"),
            "teacher_cases": _p(int, _prof(0, 6, 0), "training cases whose teacher maps the student learns from "
                                "(0 = all; a cap, balanced over datasets, saves whole-volume teacher passes on CPU)"),
            "finetune_steps": _p(int, _prof(10, 30, 5000), "fine-tuning steps per fold and init"),
            "finetune_dataset": _p(str, _prof("phantoms", "phantoms", ""),
                                   "dataset whose labelled cases are fine-tuned on ('' = every labelled case)"),
            "overlap": _p(float, _prof(0.25, 0.25, 0.5), "sliding-window overlap of the teacher's whole-volume maps"),
            "folds": _p(int, _prof(2, 3, 3), "cross-validation folds"),
        },
    },
    "evaluate": {
        "notebook": "06_evaluate",
        "params": {
            "methods": _p(str, "all", "comma-separated methods (<condition>-<density>, zscore, init-gaussian, student) or all"),
            "main_method": _p(str, _prof("learned-residual", "learned-residual", "learned-flow"),
                              "the method the end-of-run summary and the figures lead with"),
            "overlap": _p(float, _prof(0.25, 0.25, 0.5), "sliding-window overlap (0.5: the paper's; 0.25: 3.4x fewer windows on CPU)"),
            "sw_batch": _p(int, _prof(2, 2, 8), "windows per forward pass"),
            "max_fpr": _p(float, 0.3, "FPR limit of the partial AUROC and AUPRO"),
            "froc_min_region_ml": _p(float, 0.1, "FROC: smallest detected region counted (ml)"),
            "calibration_rate": _p(float, 1e-3, "label-free threshold: fraction of healthy body voxels it flags"),
        },
    },
    "explore": {
        "notebook": "07_explore",
        "params": {
            "interactive": _p(bool, None, "show the interactive viewer (None: detect; never in a headless run)"),
            "case": _p(str, "", "case id to open ('' = the first evaluation case)"),
            "method": _p(str, "", "method whose map to show first ('' = the run's main method)"),
            "backend": _p(str, "auto", "viewer backend", ("auto", "itk", "offline")),
        },
    },
}

STAGE_ORDER = list(STAGES)
NOTEBOOKS = {name: spec["notebook"] for name, spec in STAGES.items()}


def stage_params(stage: str) -> dict[str, Param]:
    """All parameters one stage accepts (common ones included)."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; known stages: {', '.join(STAGE_ORDER)}")
    return {**COMMON, **STAGES[stage]["params"]}


def _coerce(name: str, value: Any, param: Param) -> Any:
    """Check (and gently convert) one value; strings come from ``-p key=value``."""
    t = param.type
    if value is None:
        return None
    if t is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("x", ",").replace("(", "").replace(")", "").split(",") if v.strip()]
            try:
                value = [float(v) if "." in v else int(v) for v in value]
            except ValueError:
                raise ConfigError(f"parameter {name!r}: expected a tuple of numbers like 48,48,32, found {value!r}")
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) for v in value):
            raise ConfigError(f"parameter {name!r}: expected a tuple of numbers, found {value!r}")
        value = tuple(value)
    elif t is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            value = value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"parameter {name!r}: expected true/false, found {value!r}")
    elif t is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(f"parameter {name!r}: expected an integer, found {value!r}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"parameter {name!r}: expected an integer, found {value!r} ({type(value).__name__})")
    elif t is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"parameter {name!r}: expected a number, found {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"parameter {name!r}: expected a number, found {value!r} ({type(value).__name__})")
        value = float(value)
    elif t is str:
        if not isinstance(value, str):
            raise ConfigError(f"parameter {name!r}: expected a string, found {value!r} ({type(value).__name__})")
    if param.choices is not None and value not in param.choices:
        raise ConfigError(f"parameter {name!r}: expected one of {', '.join(map(str, param.choices))}, found {value!r}")
    return value


def parse_cli_value(text: str) -> Any:
    """``-p key=value`` values: YAML scalars/lists (so 3, 0.5, true, [48,48,32] work)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def validate(stage: str | None, given: Mapping[str, Any], *, strict: bool = True) -> dict[str, Any]:
    """Check names and types of user-given parameters.

    ``stage=None`` checks against every stage (the runner's view: a name no
    stage knows is an error). Returns the coerced values.
    """
    known = stage_params(stage) if stage else {**COMMON, **{k: v for s in STAGES.values() for k, v in s["params"].items()}}
    out = {}
    for name, value in given.items():
        if name not in known:
            if strict:
                close = sorted(n for n in known if n[:3] == name[:3])
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                where = f"stage {stage!r}" if stage else "any stage"
                raise ConfigError(f"unknown parameter {name!r} for {where}{hint}")
            continue
        out[name] = _coerce(name, value, known[name])
    return out


def resolve(stage: str, namespace: Mapping[str, Any] | None = None, **given: Any) -> SimpleNamespace:
    """Full configuration of one stage: given values, else the profile's defaults.

    In a notebook: ``cfg = config.resolve("descriptor", globals())`` right after
    the parameters cell picks this stage's names from the notebook's namespace.
    """
    params = stage_params(stage)
    values = {k: v for k, v in (namespace or {}).items() if k in params}
    values.update(given)
    values = validate(stage, values)
    profile = values.get("profile") or "quick"
    out = {}
    for name, param in params.items():
        v = values.get(name)
        out[name] = v if v is not None else param.default_for(profile)
    if out["run_dir"] is None:
        out["run_dir"] = str(default_run_dir(profile))
    out["stage"] = stage
    _check_values(out)
    return SimpleNamespace(**out)


def resolve_for_run(stage: str, run_dir: str | Path) -> SimpleNamespace:
    """The configuration of ``stage`` as run ``run_dir`` was asked for it: its ``params.yaml`` (the
    profile and the overrides the runner recorded; the quick profile when there is none)."""
    import yaml

    path = Path(run_dir) / "params.yaml"
    given = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    if not isinstance(given, dict):
        raise InputError(path, "a mapping of parameter names to values", type(given).__name__)
    return resolve(stage, {k: v for k, v in given.items() if k != "run_dir"}, run_dir=str(run_dir))


def default_run_dir(profile: str) -> Path:
    """Where a notebook opened by hand reads and writes: ``$SCREENER_RUN_DIR`` (Binder sets it),
    else ``runs/<profile>`` at the repository root (a notebook's working directory is
    ``notebooks/``, so a relative default would land inside it), else in the working directory."""
    env = os.environ.get("SCREENER_RUN_DIR")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[1]
    base = repo if (repo / "notebooks").is_dir() else Path.cwd()
    return base / "runs" / profile


def _check_values(cfg: dict) -> None:
    for name in ("steps", "batch", "n_pairs"):
        if name in cfg and cfg[name] is not None and cfg[name] < 1:
            raise ConfigError(f"parameter {name!r}: expected a positive integer, found {cfg[name]}")
    if "patch" in cfg and (len(cfg["patch"]) != 3 or min(cfg["patch"]) < 8):
        raise ConfigError(f"parameter 'patch': expected 3 sizes >= 8 voxels (X, Y, Z), found {cfg['patch']}")
    for name in ("mask_ratio", "mask_prob"):
        if name in cfg and not 0.0 <= cfg[name] <= 1.0:
            raise ConfigError(f"parameter {name!r}: expected a value in [0, 1], found {cfg[name]}")
    for name in ("conditions", "densities"):
        if name in cfg:
            allowed = {"conditions": {"none", "sincos", "learned"}, "densities": {"gaussian", "flow", "residual"}}[name]
            bad = [v for v in split_list(cfg[name]) if v not in allowed]
            if bad:
                raise ConfigError(f"parameter {name!r}: unknown {', '.join(bad)}; expected some of {', '.join(sorted(allowed))}")


def split_list(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def as_dict(cfg: SimpleNamespace) -> dict:
    """JSON-friendly copy (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(cfg).items()}


def describe(stage: str) -> str:
    """A table of one stage's parameters with their defaults per profile (for --help)."""
    rows = []
    for name, p in stage_params(stage).items():
        d = p.default if not isinstance(p.default, dict) else " / ".join(str(p.default[q]) for q in PROFILES)
        rows.append(f"  {name:<18} {d!s:<34} {p.doc}")
    return "\n".join(rows)
