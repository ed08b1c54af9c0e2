"""The oracle condition: what a perfect context could give (the upper bound of notebook 04).

For a phantom the organ of every voxel is known. Pooled to the density grid's
cells and smoothed by a Gaussian of ``sigma_cells`` cells, the one-hot organ
map is a condition c (n_organs, x, y, z) that knows each cell's surroundings
exactly and knows nothing of a lesion (the organ map is that of the healthy
anatomy). No self-supervised model has it, so a score built on it bounds what a
learned condition could reach with the same density.

:class:`OracleContext` predicts the cell intensities t (cell mean and std,
:func:`~screener_nb.models.context.coarse_image`) as the organ shares c times
the subject's own median of each organ, m[k, j] (:func:`subject_prediction`;
like the learned context, which sees the rest of the organ around a cell, the
oracle knows the subject's normal intensities, and a median over an organ is
not moved by a lesion in it). The variance of the residual is linear in the
shares, least squares on the squared residuals of the healthy training scans'
body cells, because an organ's spread is its own (liver cells vary little, lung
cells much):

    t[k, p] ~ N( sum_j c[j, p] m[k, j],  max(sum_j c[j, p] v[k, j], floor[k]) )

It returns this in the learned context's format (standardised prediction,
log-variance), so :class:`~screener_nb.models.residual.ResidualDensity` scores
it exactly as it scores the learned context (``learned-residual``): the two
differ only in who predicts the intensities.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError


def organ_cells(organs: np.ndarray, stride=(3, 3, 2), sigma_cells: float = 1.0, n_organs: int | None = None) -> np.ndarray:
    """One-hot organ map (X, Y, Z) uint8 -> (n_organs, x, y, z) float32: each organ's share of every
    cell (average pooling with ``stride``, floor), smoothed by a Gaussian of ``sigma_cells`` cells."""
    from scipy.ndimage import gaussian_filter

    from ..data.phantoms import ORGAN_LABELS

    n = len(ORGAN_LABELS) if n_organs is None else int(n_organs)
    organs = np.asarray(organs)
    if organs.ndim != 3 or (organs.size and int(organs.max()) >= n):
        raise InputError("organ_cells", f"an organ map (X, Y, Z) of labels < {n}",
                         f"shape {organs.shape}, max label {int(organs.max()) if organs.size else None}")
    onehot = torch.from_numpy(np.eye(n, dtype=np.float32)[organs]).permute(3, 0, 1, 2)[None]
    cells = F.avg_pool3d(onehot, tuple(stride), tuple(stride))[0].numpy()
    if sigma_cells <= 0:
        return cells
    return np.stack([gaussian_filter(ch, sigma_cells, mode="nearest") for ch in cells]).astype(np.float32)


def subject_prediction(coarse: np.ndarray, cells: np.ndarray, body: np.ndarray) -> np.ndarray:
    """(dim, x, y, z) float64: each cell's organ shares times the scan's own median of each intensity
    channel over the body cells the organ fills (share > 0.5), normalised by the shares' sum; an organ
    that fills no cell takes its share-weighted mean instead."""
    coarse, cells, b = np.asarray(coarse, np.float64), np.asarray(cells, np.float64), np.asarray(body, bool)
    if coarse.shape[1:] != b.shape or cells.shape[1:] != b.shape:
        raise InputError("oracle prediction", f"coarse, organ and body grids of one shape {b.shape}",
                         f"{coarse.shape[1:]} and {cells.shape[1:]}")
    med = np.zeros((coarse.shape[0], cells.shape[0]))
    for j, share in enumerate(cells):
        filled, weight = b & (share > 0.5), share * b
        for k, channel in enumerate(coarse):
            if filled.any():
                med[k, j] = np.median(channel[filled])
            elif weight.sum() > 0:
                med[k, j] = (channel * weight).sum() / weight.sum()
    total = np.maximum(cells.sum(0), 1e-12)
    return np.einsum("kj,jxyz->kxyz", med, cells) / total


class OracleContext:
    """The oracle's predictive Gaussian of the cell intensities (module docstring).

    After :meth:`fit`: ``target_mean``, ``target_std`` (dim,) standardise the raw cell intensities (the
    residual density's units); ``var_weights`` (dim, n_organs) is the least-squares fit of the squared
    standardised residual on the organ shares; ``var_floor`` (dim,) bounds the variance below
    (``floor_share`` of the mean squared residual).
    """

    def __init__(self, floor_share: float = 0.01) -> None:
        self.floor_share = float(floor_share)
        self.target_mean = self.target_std = self.var_weights = self.var_floor = None

    def fit(self, scans: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> "OracleContext":
        """Fit on healthy scans, each (coarse (dim, x, y, z) raw cell intensities, organ cells
        (n_organs, x, y, z), body cells (x, y, z) bool)."""
        ts, rs, cs = [], [], []
        for coarse, cells, body in scans:
            b = np.asarray(body, bool)
            rs.append((np.asarray(coarse, np.float64) - subject_prediction(coarse, cells, b))[:, b].T)
            ts.append(np.asarray(coarse, np.float64)[:, b].T)
            cs.append(np.asarray(cells, np.float64)[:, b].T)
        if not ts or sum(len(t) for t in ts) == 0:
            raise InputError("OracleContext.fit", "healthy scans with body cells", "none")
        t, r, c = np.concatenate(ts), np.concatenate(rs), np.concatenate(cs)
        self.target_mean, self.target_std = t.mean(0), np.maximum(t.std(0), 1e-6)
        sq = (r / self.target_std) ** 2
        # the shares sum to one: they are their own intercept; an organ absent from training gets weight 0
        v, *_ = np.linalg.lstsq(c, sq, rcond=None)
        self.var_weights = v.T                                        # (dim, n_organs)
        self.var_floor = np.maximum(self.floor_share * sq.mean(0), 1e-12)
        return self

    def condition(self, coarse: np.ndarray, cells: np.ndarray, body: np.ndarray) -> torch.Tensor:
        """(2 * dim, x, y, z) float32 of one scan (its coarse intensities, organ cells and body cells, as
        in :meth:`fit`): the predicted standardised intensities and their log-variance."""
        if self.var_weights is None:
            raise InputError("OracleContext", "a fitted oracle (call fit first)", "an unfitted one")
        cells = np.asarray(cells, np.float64)
        if cells.ndim != 4 or cells.shape[0] != self.var_weights.shape[1]:
            raise InputError("OracleContext.condition", f"organ cells ({self.var_weights.shape[1]}, x, y, z)",
                             f"shape {cells.shape}")
        pred = (subject_prediction(coarse, cells, body) - self.target_mean[:, None, None, None]) \
            / self.target_std[:, None, None, None]
        var = np.einsum("kj,jxyz->kxyz", self.var_weights, cells)
        log_var = np.log(np.maximum(var, self.var_floor[:, None, None, None]))
        return torch.from_numpy(np.concatenate([pred, log_var]).astype(np.float32))
