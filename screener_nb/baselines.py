"""Reference scores beside the Screener methods: what they bound or what they improve on.

* :class:`ZScoreBaseline` (``zscore``): the raw-intensity z-score of the body voxels.
* :class:`OracleResidual`: the residual density of :mod:`screener_nb.models.residual`
  with the *oracle* condition of :mod:`screener_nb.models.oracle` (the phantom's
  known organ map) in place of the learned context: an upper bound of what a
  better condition could give the same score (notebook 04).
* :func:`init_descriptor_gaussian` (``init-gaussian``): the descriptor's
  architecture at its random initialisation with the unconditional Gaussian of
  its pooled features: the rung of notebook 06's ladder below the trained
  descriptor (``none-gaussian``), which says what the self-supervised training
  adds over a random convolutional feature map.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .errors import InputError


@dataclass
class OracleResidual:
    """The residual score under the oracle condition, fitted on a run's healthy training phantoms.

    Attributes:
        oracle: the fitted :class:`~screener_nb.models.oracle.OracleContext`.
        density: the :class:`~screener_nb.models.residual.ResidualDensity` fitted on its predictions.
        stride: the density grid's cells (voxels per cell along X, Y, Z).
        organ_sigma: smoothing of the organ cells, in cells.
        fitted_on: the training case ids.
    """

    oracle: Any
    density: Any
    stride: tuple[int, int, int]
    organ_sigma: float
    fitted_on: list[str]

    def score_case(self, run_dir: str | Path, case: Any) -> np.ndarray:
        """(X, Y, Z) float32 voxel scores (nats) of phantom ``case`` of run ``run_dir``."""
        from .models.density import upsample_cells

        coarse, cells, body = _phantom_cells(run_dir, case, self.stride, self.organ_sigma)
        nll = self.density.score(coarse, self.oracle.condition(coarse.numpy(), cells, body), body)
        return upsample_cells(nll[None], np.shape(case.image), self.stride)[0].numpy().astype(np.float32)


def _phantom_cells(run_dir, case, stride, organ_sigma):
    """(coarse cell intensities (2, x, y, z) tensor, organ cells (n, x, y, z), body cells (x, y, z))."""
    from .data.phantom_truth import phantom_truth
    from .features import body_cells, coarse_cells
    from .models.oracle import organ_cells

    truth = phantom_truth(run_dir, case)
    x = torch.from_numpy(np.array(case.image, dtype=np.float32))[None, None]
    return (coarse_cells(x, stride)[0], organ_cells(truth.organs, stride, organ_sigma),
            body_cells(case.body, stride, source=case.id))


def fit_oracle_residual(run_dir: str | Path, train_cases: Sequence[Any], *, stride=(3, 3, 2),
                        sigma_cells: float = 1.0, organ_sigma: float = 1.0) -> OracleResidual:
    """Fit :class:`OracleResidual` on the healthy training phantoms among ``train_cases``
    (real scans have no organ map and are left out; ``sigma_cells``: the residual's neighbourhood)."""
    from .models.oracle import OracleContext
    from .models.residual import ResidualDensity

    phantoms = [c for c in train_cases if str(c.id).startswith("phantom-")]
    if not phantoms:
        raise InputError(Path(run_dir) / "data", "training phantoms (the oracle needs their organ maps)",
                         f"{len(train_cases)} training case(s), none a phantom")
    stride = tuple(int(s) for s in stride)
    grids = [_phantom_cells(run_dir, c, stride, organ_sigma) for c in phantoms]
    oracle = OracleContext().fit((coarse.numpy(), cells, body) for coarse, cells, body in grids)
    density = ResidualDensity(int(oracle.target_mean.size), sigma_cells, True, oracle.target_mean.tolist(),
                              oracle.target_std.tolist())
    density.fit((coarse, oracle.condition(coarse.numpy(), cells, body), body) for coarse, cells, body in grids)
    return OracleResidual(oracle, density, stride, float(organ_sigma), [str(c.id) for c in phantoms])


INIT_GAUSSIAN = "init-gaussian"


@torch.inference_mode()
def init_descriptor_gaussian(run_dir: str | Path, *, n_fit: int = 6, device: str = "auto", overlap: float = 0.5,
                             sw_batch: int = 2, mode: str | None = None):
    """The ``init-gaussian`` baseline of a run: its descriptor architecture at the random initialisation
    (the descriptor stage's seed) and the unconditional diagonal Gaussian of its pooled features,
    fitted in closed form -- the maximum-likelihood mean and variance over the body cells of up to
    ``n_fit`` training scans (evenly spaced in the cohort), the variance plus the density stage's
    training noise (``noise_std`` squared), as its SGD fit of ``none-gaussian`` sees it.

    Returns a :class:`~screener_nb.inference.Screener` named ``init-gaussian``, scored in ``mode``
    (None: as the run's density methods are, ``scan`` with the context condition, else ``window``).
    """
    from . import config, files
    from .data.cohort import load_cohort, read_index
    from .data.preprocess import PreprocessParams
    from .inference import FeatureExtractor, Screener, body_cells
    from .models.density import UnconditionalGaussian
    from .runtime import resolve_device
    from .ssl.context_task import is_context
    from .ssl.task import load_encoder

    run_dir = Path(run_dir)
    files.require_stage(run_dir, "descriptor")
    cfg = config.resolve_for_run("density", run_dir)
    dev = resolve_device(device)
    spacing = tuple(read_index(run_dir)["preprocess"]["spacing"])
    extractor = FeatureExtractor(load_encoder(run_dir, "descriptor", trained=False, device=dev), "none", None,
                                 spacing, cfg.pool_stride, cfg.sincos_dim, cfg.descriptor_map).to(dev).eval()
    cases = load_cohort(run_dir, role="train")
    if not cases:
        raise InputError(run_dir / "data", "at least one training case", "none")
    m = min(int(n_fit), len(cases))
    picked = [cases[i] for i in sorted({round(k * (len(cases) - 1) / max(m - 1, 1)) for k in range(m)})]
    n, s1, s2 = 0, 0.0, 0.0
    for case in picked:
        x = torch.from_numpy(np.array(case.image, dtype=np.float32))[None, None]
        y, _ = extractor.scan_features(x, cfg.patch, cfg.overlap, sw_batch)
        cells = y[0, :, torch.from_numpy(body_cells(case.body, cfg.pool_stride, source=case.id))].double().cpu()
        n, s1, s2 = n + cells.shape[1], s1 + cells.sum(1), s2 + cells.square().sum(1)
    mean = s1 / n
    var = (s2 / n - mean.square()).clamp_min(1e-8) + float(cfg.noise_std) ** 2
    density = UnconditionalGaussian(extractor.dim)
    density.mean.data.copy_(mean.float())
    density.log_var.data.copy_(var.log().float())
    params = PreprocessParams.from_dict(read_index(run_dir)["preprocess"])
    mode = mode or ("scan" if is_context(run_dir) else "window")
    return Screener.from_parts(extractor, density, tuple(cfg.patch), params, INIT_GAUSSIAN, device=dev,
                               overlap=overlap, sw_batch=sw_batch, mode=mode)


@dataclass(frozen=True)
class ZScoreBaseline:
    """Raw-intensity baseline: score = |x - mean| / std of preprocessed body intensities.

    The absolute value because pathology can be brighter (nodules, contrast-
    enhancing tumours) or darker (hypodense liver and kidney tumours, ground-glass
    against soft tissue) than normal tissue: a signed z-score would rank one of
    the two kinds as the most normal voxels of all. ``mean``/``std`` are pooled
    over every body voxel of the training cases (one number each for the whole
    body, lungs and soft tissue together: that is what makes it a weak
    baseline -- it knows intensities, not anatomy).
    Same interface as :class:`~screener_nb.inference.Screener`.
    """

    mean: float
    std: float
    method: str = "zscore"

    def score_preprocessed(self, image: np.ndarray, body: np.ndarray, spacing=None, **_: Any) -> np.ndarray:
        """(X, Y, Z) float32 map; outside the body set to the map's minimum (as Screener does)."""
        image = np.asarray(image, dtype=np.float32)
        body = np.asarray(body, dtype=bool)
        if body.shape != image.shape:
            raise InputError("zscore baseline", f"a body mask of the image's shape {image.shape}", f"shape {body.shape}")
        score = np.abs(image - np.float32(self.mean)) / np.float32(self.std)
        if body.any():
            score[~body] = score[body].min()
        return score.astype(np.float32, copy=False)


def zscore_baseline(train_cases: Iterable[Any]) -> ZScoreBaseline:
    """Fit :class:`ZScoreBaseline` on training cases (objects with ``.image``, ``.body``), streaming."""
    n, s, ss = 0, 0.0, 0.0
    for c in train_cases:
        body = np.asarray(c.body, dtype=bool)
        v = np.asarray(c.image)[body].astype(np.float64)
        n, s, ss = n + v.size, s + float(v.sum()), ss + float(np.dot(v, v))
    if n < 2:
        raise InputError("zscore baseline", "training cases with body voxels", f"{n} body voxel(s)")
    mean = s / n
    std = math.sqrt(max(ss / n - mean * mean, 0.0))
    if not std > 0:
        raise InputError("zscore baseline", "training intensities that vary", f"a constant body intensity {mean:g}")
    return ZScoreBaseline(mean, std)
