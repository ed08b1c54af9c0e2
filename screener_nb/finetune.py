"""Low-shot supervised fine-tuning of the distilled student (notebook 05).

**Low-shot fine-tuning.** The paper replaces the student's head by one
sigmoid channel and trains with BCE + Dice on k labelled cases per fold,
against the same UNet from random initialisation. A MONAI UNet ends in a
one-channel convolution already, so the network is kept as it is and its
output is treated as a *logit*: the sigmoid is applied inside the loss
(MONAI ``DiceCELoss(sigmoid=True)``: ``BCEWithLogits`` + soft Dice) and at
inference (Dice at probability >= 0.5). Keeping the distilled last layer
also keeps its ranking: at step 0 the logit is the normalised anomaly
score. Lesions are tiny, so half of the fine-tuning crops are centred on a
random lesion voxel (``lesion_p=0.5``), the rest are random body crops.
Folds come from :func:`cv_splits`; per-case Dice pairs of the two inits are
compared with a Wilcoxon signed-rank test (:func:`paired_test`).

Artifacts: ``runs/<run>/distill/finetune/`` (one checkpointed run per fold and init),
``distill/finetune.json`` and ``distill/finetune.nc``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from . import files
from .data.crops import centred_start, random_crop, take_crop
from .distill import STAGE, build_student, check_patch, labelled_cases, load_student_unet, student_spec
from .errors import ConfigError, InputError
from .progress import report
from .runtime import resolve_device
from .train import TrainSettings, fit

INITS = ("distilled", "random")


# ============================================================================ low-shot fine-tuning


def cv_splits(case_ids: Sequence[str], folds: int, k: int, seed: int = 0) -> list[dict[str, list[str]]]:
    """Cross-validation splits for low-shot fine-tuning.

    The cases are shuffled (seeded) and cut into ``folds`` disjoint test folds
    covering every case; fold ``f`` trains on ``k`` cases drawn (seeded) from
    the cases outside its test fold.

    Returns:
        ``[{"train": [k ids], "test": [ids]}, ...]`` (one dict per fold; ids in input order).

    Raises:
        ConfigError: duplicate ids, ``folds < 2`` or more folds than cases,
        ``k < 1`` or more than the cases left outside a test fold.
    """
    ids = [str(i) for i in case_ids]
    n = len(ids)
    if len(set(ids)) != n:
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ConfigError(f"cv_splits: expected unique case ids, found duplicates {dup[:5]}")
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ConfigError(f"parameter 'folds': expected an integer >= 2, found {folds!r}")
    if folds > n:
        raise ConfigError(f"parameter 'folds': expected at most one fold per labelled case ({n} cases), found {folds}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"parameter 'finetune_k': expected an integer >= 1, found {k!r}")
    rng = np.random.default_rng([seed, 4242])
    order = rng.permutation(n)
    tests = np.array_split(order, folds)
    left = n - max(len(t) for t in tests)
    if k > left:
        raise ConfigError(f"parameter 'finetune_k': expected at most {left} labelled training cases per fold "
                          f"({n} labelled cases in {folds} folds leave {left} outside the largest test fold), found {k}")
    out = []
    for test in tests:
        rest = np.array([i for i in order if i not in set(test.tolist())])
        train = rng.choice(rest, size=k, replace=False)
        out.append({"train": [ids[i] for i in sorted(train.tolist())], "test": [ids[i] for i in sorted(test.tolist())]})
    return out


class SegmentationTask:
    """:class:`screener_nb.train.TrainTask` for supervised fine-tuning with BCE + Dice.

    With probability ``lesion_p`` a crop is centred (jittered by a quarter patch)
    on a random lesion voxel: lesions are tiny, and random crops would hardly
    ever contain one. Otherwise a random body crop. The network's output is a
    logit; the loss is MONAI ``DiceCELoss(sigmoid=True, batch=True)`` (Dice over
    the whole batch, so crops without lesion do not make it undefined).
    """

    def __init__(self, cases: Sequence, patch, lesion_p: float = 0.5):
        from monai.losses import DiceCELoss

        if not 0.0 <= lesion_p <= 1.0:
            raise ConfigError(f"lesion_p: expected a probability in [0, 1], found {lesion_p}")
        self.cases, self.patch, self.lesion_p = list(cases), tuple(int(p) for p in patch), lesion_p
        self.lesions = []
        for c in self.cases:
            if c.label is None:
                raise InputError(f"case {c.id}", "a lesion label for supervised fine-tuning", "none")
            self.lesions.append(np.argwhere(np.asarray(c.label) > 0))
        self.criterion = DiceCELoss(sigmoid=True, batch=True)

    def sample(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        i = int(rng.integers(len(self.cases)))
        case, lesion = self.cases[i], self.lesions[i]
        if len(lesion) and rng.random() < self.lesion_p:
            start = centred_start(lesion[int(rng.integers(len(lesion)))], case.shape, self.patch, rng)
            crop = take_crop(case.image, start, self.patch)
        else:
            crop, start = random_crop(case.image, case.body, self.patch, rng)
        label = take_crop(np.asarray(case.label) > 0, start, self.patch)
        return {"x": crop[None], "y": label[None]}

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = model(batch["x"].float()).float()
        return self.criterion(logits, batch["y"].float()), {}


class _Sigmoid(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.sigmoid(self.net(x).float())


def predict_probabilities(net: nn.Module, case, patch, device: str | torch.device = "auto", *,
                          overlap: float = 0.5, sw_batch: int = 2) -> np.ndarray:
    """Lesion probability (X, Y, Z) = sigmoid of the fine-tuned network's logit, whole volume."""
    from .inference import Screener

    dev = resolve_device(device)
    model = _Sigmoid(net).to(dev).eval()
    screener = Screener(lambda x, origin: model(x), patch, None, "finetuned", dev, overlap, sw_batch)
    return screener.score_preprocessed(case.image, case.body, case.spacing, source=f"case {case.id}")


def segmentation_dice(net: nn.Module, cases: Sequence, patch, device: str | torch.device = "auto", *,
                      threshold: float = 0.5, overlap: float = 0.5, sw_batch: int = 2) -> dict[str, float]:
    """Dice per case of ``sigmoid(logit) >= threshold`` inside the body against the lesion label."""
    from .metrics import dice

    out = {}
    for c in cases:
        prob = predict_probabilities(net, c, patch, device, overlap=overlap, sw_batch=sw_batch)
        out[c.id] = float(dice(prob, np.asarray(c.label) > 0, threshold, roi=np.asarray(c.body, dtype=bool)))
    return out


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Wilcoxon signed-rank test of paired values (e.g. per-case Dice, distilled vs random).

    ``scipy.stats.wilcoxon(a, b)`` (two-sided; zero differences dropped, the
    'wilcox' convention; exact null distribution for small samples without ties).

    Returns:
        ``{"statistic", "p_value", "n" (pairs), "n_nonzero", "method", "min_p",
        "median_difference", "note"}``: ``min_p`` is the smallest two-sided p-value
        an exact test can reach with ``n_nonzero`` pairs (2 / 2**n); below 6 pairs
        it exceeds 0.05, so no difference can be called significant at 5%.
    """
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise InputError("paired_test", "two 1-D sequences of the same length (pairs)", f"shapes {a.shape} and {b.shape}")
    if a.size == 0 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise InputError("paired_test", "at least one pair of finite values", f"{a.size} pairs, some non-finite")
    d = a - b
    n_nonzero = int(np.count_nonzero(d))
    out = {"n": int(a.size), "n_nonzero": n_nonzero, "median_difference": float(np.median(d)),
           "min_p": float(min(1.0, 2.0 / 2 ** n_nonzero)) if n_nonzero else 1.0}
    if n_nonzero == 0:
        out.update(statistic=float("nan"), p_value=1.0, method="none",
                   note="every pair is equal: no evidence of a difference (the test is undefined)")
        return out
    res = stats.wilcoxon(a, b)
    ties = len(np.unique(np.abs(d[d != 0]))) < n_nonzero
    exact = n_nonzero <= 50 and not ties and n_nonzero == a.size
    out.update(statistic=float(res.statistic), p_value=float(res.pvalue), method="exact" if exact else "approx")
    if n_nonzero < 6:
        out["note"] = (f"only {n_nonzero} non-zero pairs: the smallest possible two-sided p-value is "
                       f"{out['min_p']:.3g} > 0.05, so the test cannot detect a difference at 5% (very low power)")
    elif n_nonzero < 20:
        out["note"] = f"{n_nonzero} pairs: little power; treat the p-value as indicative"
    else:
        out["note"] = f"{n_nonzero} pairs"
    return out


def _init_net(init: str, run_dir: Path, size: str | None, seed: int) -> tuple[nn.Module, str]:
    if init == "distilled":
        unet, spec = load_student_unet(run_dir, seed=seed)
        return unet.requires_grad_(True).train(), spec["size"]
    if init == "random":
        # the distilled student's architecture where there is one (a given size alone: full resolution)
        spec = student_spec(run_dir) if size is None or (Path(run_dir) / STAGE / "model.json").exists() else {}
        size = spec["size"] if size is None else size
        torch.manual_seed(seed)
        return build_student(size, spec.get("grid", "voxels"), spec.get("stride", (3, 3, 2))), size
    raise ConfigError(f"init: expected one of {', '.join(INITS)}, found {init!r}")


@dataclass
class FinetuneCV:
    """:func:`finetune_cv`'s outcome: per-case and per-fold Dice of each initialisation, and their test.

    ``dice[init][case]`` is the held-out Dice of ``case`` in the fold that tested it
    (``fold_of_case``); ``fold_dice[init]`` the mean per fold; ``test`` the paired Wilcoxon test
    of distilled vs random initialisation when both ran (:func:`paired_test`).
    """

    k: int
    folds: int
    steps: int
    seed: int
    inits: list
    patch: list
    size: str
    threshold: float
    lesion_p: float
    lr: float
    batch: int
    splits: list
    dice: dict
    fold_dice: dict
    mean_dice: dict
    fold_of_case: dict
    test: dict | None = field(default=None)

    def table(self):
        """Mean Dice per fold and over cases, one column per initialisation (pandas)."""
        import pandas as pd

        out = pd.DataFrame(self.fold_dice, index=[f"fold {i}" for i in range(self.folds)])
        out.loc["mean over cases"] = [self.mean_dice[i] for i in out.columns]
        return out

    def figure(self):
        """Dice per held-out case, grouped by initialisation (plotly)."""
        from .viz.plots import grouped_bars

        return grouped_bars({f"{init} init": {c: self.dice[init][c] for c in self.fold_of_case} for init in self.inits},
                            labels={c: f"{c} (fold {fold})" for c, fold in self.fold_of_case.items()},
                            y_title=f"Dice at p >= {self.threshold:g}", y_range=(0, 1),
                            title=f"fine-tuned on k = {self.k} cases per fold, {self.steps} steps: Dice per held-out case")

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["test"] is None:
            del out["test"]
        return out

    def __getitem__(self, key: str):
        """``result["dice"]``: the dict-style reading of earlier versions."""
        return getattr(self, key)

    def __contains__(self, key: str) -> bool:
        return key in self.to_dict()


def finetune_cv(run_dir: str | Path, cases: Sequence, k: int, folds: int, steps: int,
                init: str | Sequence[str] = INITS, seed: int = 0, *, patch=None, size: str | None = None,
                batch: int = 2, lr: float = 1e-3, warmup: int | None = None, lesion_p: float = 0.5,
                threshold: float = 0.5, overlap: float = 0.5, sw_batch: int = 2, device: str = "auto",
                checkpoint_every: int | None = None, log_every: int = 5, amp: bool = True,
                write: bool = True, progress: Callable[[str], None] | None = report) -> "FinetuneCV":
    """Low-shot fine-tuning with k-fold cross-validation, for each initialisation.

    Args:
        cases: labelled cases (one lesion kind); those without lesion voxels are dropped.
        k, folds: see :func:`cv_splits`.
        steps: optimiser steps per fold and init (the same budget for every init).
        init: ``"distilled"`` (the run's student weights) and/or ``"random"``
            (the same architecture from ``torch.manual_seed(seed)``).
        patch, size: crop size and UNet size (default: the student's).
        warmup: linear warm-up steps (default ``steps // 10``); lr, batch, amp as in the shared loop.
        lesion_p: probability of a lesion-centred crop (:class:`SegmentationTask`).
        threshold: on the sigmoid probability for Dice.
        write: save ``distill/finetune.json`` and ``distill/finetune.nc``.

    Every (init, fold) trains through the shared loop in
    ``distill/finetune/k<k>-folds<folds>-steps<steps>-seed<seed>/<init>-fold<f>/``
    (checkpointed; an interrupted run resumes).

    Returns:
        a :class:`FinetuneCV` (``distill/finetune.json`` holds its :meth:`~FinetuneCV.to_dict`).
    """
    run_dir = Path(run_dir)
    inits = [init] if isinstance(init, str) else list(init)
    for name in inits:
        if name not in INITS:
            raise ConfigError(f"init: expected some of {', '.join(INITS)}, found {name!r}")
    labelled = labelled_cases(cases)
    if len(labelled) < 2:
        raise InputError("fine-tuning cases", "at least 2 cases with lesion labels",
                         f"{len(labelled)} (of {len(cases)} given)")
    if patch is None or size is None:
        spec = student_spec(run_dir)
        patch = spec["patch"] if patch is None else patch
        size = spec["size"] if size is None else size
    patch = tuple(int(p) for p in patch)
    small = [c.id for c in labelled if any(s < p for s, p in zip(c.shape, patch))]
    if small:
        raise InputError("fine-tuning cases", f"volumes at least as large as the patch {patch}", f"smaller: {small[:5]}")
    splits = cv_splits([c.id for c in labelled], folds, k, seed)
    by_id = {c.id: c for c in labelled}
    root = files.stage_dir(run_dir, STAGE) / "finetune" / f"k{k}-folds{folds}-steps{steps}-seed{seed}"
    warmup = max(1, steps // 10) if warmup is None else warmup
    settings = dict(steps=steps, batch=batch, lr=lr, warmup=warmup, seed=seed, device=device, amp=amp,
                    checkpoint_every=checkpoint_every or steps, log_every=log_every)
    dice: dict[str, dict[str, float]] = {name: {} for name in inits}
    fold_of: dict[str, int] = {}
    for f, split in enumerate(splits):
        for cid in split["test"]:
            fold_of[cid] = f
        for name in inits:
            folder = root / f"{name}-fold{f}"
            run_spec = {"init": name, "train": split["train"], "test": split["test"], "patch": list(patch),
                        "size": size, "lesion_p": lesion_p, **{k_: v for k_, v in settings.items() if k_ != "device"}}
            if (folder / "spec.json").exists() and files.read_json(folder / "spec.json") != json.loads(json.dumps(run_spec)):
                raise InputError(folder / "spec.json", "the fine-tuning configuration being run",
                                 "another one (other cases or settings); delete that folder or use another seed")
            files.write_json(folder / "spec.json", run_spec)
            net, _ = _init_net(name, run_dir, size, seed)
            check_patch(net, patch)
            task = SegmentationTask([by_id[i] for i in split["train"]], patch, lesion_p)
            result = fit(net, task, TrainSettings(**settings), folder, desc=f"finetune {name} fold {f}")
            scores = segmentation_dice(result.model, [by_id[i] for i in split["test"]], patch, device,
                                       threshold=threshold, overlap=overlap, sw_batch=sw_batch)
            dice[name].update(scores)
            if progress:
                progress(f"[finetune] {name:<9} fold {f}: Dice " + ", ".join(f"{c} {v:.3f}" for c, v in scores.items()))
    order = [c.id for c in labelled]
    fold_dice = {name: [float(np.mean([dice[name][c] for c in s["test"]])) for s in splits] for name in inits}
    out = {"k": k, "folds": folds, "steps": steps, "seed": seed, "inits": inits, "patch": list(patch), "size": size,
           "threshold": threshold, "lesion_p": lesion_p, "lr": lr, "batch": batch, "splits": splits,
           "dice": {name: {c: dice[name][c] for c in order} for name in inits}, "fold_dice": fold_dice,
           "mean_dice": {name: float(np.mean(list(dice[name].values()))) for name in inits},
           "fold_of_case": {c: fold_of[c] for c in order}}
    if set(INITS) <= set(inits):
        out["test"] = paired_test([dice["distilled"][c] for c in order], [dice["random"][c] for c in order])
    if write:
        files.write_json(run_dir / STAGE / "finetune.json", out)
        _write_finetune_nc(run_dir / STAGE / "finetune.nc", out)
    return FinetuneCV(**out)


def _write_finetune_nc(path: Path, res: dict) -> Path:
    """Per-case Dice as an ``xarray.Dataset`` (dims init x case, coordinate fold), written atomically."""
    import xarray as xr

    cases = list(res["fold_of_case"])
    data = np.array([[res["dice"][i][c] for c in cases] for i in res["inits"]], dtype=np.float64)
    ds = xr.Dataset({"dice": (("init", "case"), data)},
                    coords={"init": res["inits"], "case": cases, "fold": ("case", [res["fold_of_case"][c] for c in cases])},
                    attrs={k: v for k, v in res.items() if isinstance(v, (int, float, str))})
    with files.atomic_path(path) as tmp:
        ds.to_netcdf(tmp, engine="h5netcdf")
    return path


def finetune_cases(run_dir: str | Path, lesion_kind: str | None = None, dataset: str | None = None) -> list:
    """Labelled cases of a run for fine-tuning (val + test roles; those with lesion voxels),
    optionally only those whose ``lesion_kinds`` include ``lesion_kind`` and those of ``dataset``."""
    from .data.cohort import load_cohort

    cases = [c for c in load_cohort(run_dir) if c.role in ("val", "test")]
    if dataset:
        known = sorted({c.dataset for c in cases})
        cases = [c for c in cases if c.dataset == dataset]
        if not cases:
            raise InputError(Path(run_dir) / "data", f"labelled cases of dataset {dataset!r}",
                             f"none (datasets with val/test cases: {', '.join(known) or 'none'})")
    if lesion_kind:
        cases = [c for c in cases if lesion_kind in c.lesion_kinds]
    return labelled_cases(cases)
