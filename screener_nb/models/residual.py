"""The residual density: how far a region's intensities are from what its surroundings predict.

Why it exists. The phantom and real lesions that matter most (hypo- and
hyperdense liver and kidney lesions, bone lesions) have intensities that are
normal *somewhere* in the body: they are context anomalies. The context
condition (:mod:`screener_nb.models.context`) trained with
``context_target="intensity"`` and ``heteroscedastic=True`` already predicts,
for every cell and from the surroundings alone (masked inference), the mean
and the log-variance of the standardised cell intensities (cell mean, cell
std). Its own predictive Gaussian is a conditional density of those two
channels given the context. The residual density scores it, with the
evidence of a small neighbourhood pooled before the score:

    z[k, p]    = (t[k, p] - mu[k, p]) * exp(-log_var[k, p] / 2)      signed, channel k
    zbar[k, p] = sum_q w(p - q) body[q] z[k, q] / sum_q w(p - q) body[q]
    score[p]   = 0.5 * sum_k (zbar[k, p] / scale[k]) ** 2

``w`` is a Gaussian of ``sigma_cells`` cells (truncated at 4 sigma, as
:func:`scipy.ndimage.gaussian_filter`), the average runs over body cells only,
and ``scale[k]`` is fitted on healthy training scans: the density of the
pooled residual is N(0, diag(scale ** 2)), and the score is its negative
log-density up to a constant. Why the average: a compact finding shifts
every cell of it the same way and adds up, while noise and thin structures
that the surroundings cannot predict (vessels, organ borders) cover a small
part of the neighbourhood and are diluted.

Shapes: grids are (C, x, y, z) cells of the density grid (stride (3, 3, 2));
``t`` and ``mu`` are in the context's standardised units.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, InputError


def body_average(z: np.ndarray, body: np.ndarray, sigma_cells: float) -> np.ndarray:
    """Normalised Gaussian average of ``z`` (C, x, y, z) over the body cells ``body`` (x, y, z):
    cells outside the body (or past the grid) carry no weight. (C, x, y, z) float64."""
    from scipy.ndimage import gaussian_filter

    b = np.asarray(body, np.float64)
    if sigma_cells <= 0:
        return np.asarray(z, np.float64) * b
    norm = np.maximum(gaussian_filter(b, sigma_cells, mode="constant"), 1e-12)
    return np.stack([gaussian_filter(np.asarray(ch, np.float64) * b, sigma_cells, mode="constant") / norm
                     for ch in z])


class ResidualDensity(nn.Module):
    """The context's own predictive density of the cell intensities, evidence pooled (module docstring).

    Args:
        dim: target channels (2: cell mean and std).
        sigma_cells: Gaussian neighbourhood of the average, in cells (0: no pooling).
        heteroscedastic: whether the context predicts a log-variance (then the condition has
            ``2 * dim`` channels; else ``dim`` and the residual is not standardised).
        target_mean, target_std: (dim,) the context's standardisation of the cell intensities.
    """

    def __init__(self, dim: int = 2, sigma_cells: float = 1.0, heteroscedastic: bool = True,
                 target_mean: Iterable[float] | None = None, target_std: Iterable[float] | None = None):
        super().__init__()
        if sigma_cells < 0:
            raise ConfigError(f"residual sigma: expected >= 0 cells, found {sigma_cells}")
        self.dim, self.sigma_cells, self.heteroscedastic = int(dim), float(sigma_cells), bool(heteroscedastic)
        mean = torch.zeros(dim) if target_mean is None else torch.tensor(list(target_mean), dtype=torch.float32)
        std = torch.ones(dim) if target_std is None else torch.tensor(list(target_std), dtype=torch.float32)
        self.register_buffer("target_mean", mean)
        self.register_buffer("target_std", std)
        self.register_buffer("scale", torch.ones(dim))
        self.config = {"kind": "residual", "dim": self.dim, "sigma_cells": self.sigma_cells,
                       "heteroscedastic": self.heteroscedastic}

    @property
    def cond_dim(self) -> int:
        return self.dim * (2 if self.heteroscedastic else 1)

    def target(self, coarse: torch.Tensor) -> torch.Tensor:
        """The standardised target (dim, x, y, z) from the coarse image (dim, x, y, z)."""
        return (coarse.float().cpu() - self.target_mean[:, None, None, None].cpu()) / \
            self.target_std[:, None, None, None].cpu()

    def signed_residual(self, coarse: torch.Tensor, c: torch.Tensor) -> np.ndarray:
        """z (dim, x, y, z) float64: the target minus the context's prediction, in predicted sds."""
        if c.ndim != 4 or c.shape[0] != self.cond_dim or tuple(c.shape[1:]) != tuple(coarse.shape[1:]):
            raise InputError("ResidualDensity", f"a condition ({self.cond_dim}, x, y, z) on the coarse grid "
                             f"{tuple(coarse.shape[1:])}", f"shape {tuple(c.shape)}")
        c = c.float().cpu()
        z = self.target(coarse) - c[:self.dim]
        if self.heteroscedastic:
            z = z * torch.exp(-0.5 * c[self.dim:].clamp(-7, 7))
        return z.double().numpy()

    def pooled_residual(self, coarse: torch.Tensor, c: torch.Tensor, body: np.ndarray) -> np.ndarray:
        """zbar (dim, x, y, z) float64: :meth:`signed_residual` averaged over the body neighbourhood."""
        return body_average(self.signed_residual(coarse, c), body, self.sigma_cells)

    @torch.no_grad()
    def fit(self, scans: Iterable[tuple[torch.Tensor, torch.Tensor, np.ndarray]]) -> "ResidualDensity":
        """Maximum-likelihood ``scale`` (the std of zbar per channel, zero mean) over the body cells of
        healthy scans, each given as (coarse (dim, x, y, z), condition (cond_dim, x, y, z), body cells)."""
        sq, n = np.zeros(self.dim), 0
        for coarse, c, body in scans:
            zbar = self.pooled_residual(coarse, c, body)[:, np.asarray(body, bool)]
            sq += np.square(zbar).sum(1)
            n += zbar.shape[1]
        if n == 0:
            raise InputError("ResidualDensity.fit", "healthy scans with body cells", "none")
        self.scale.copy_(torch.from_numpy(np.sqrt(sq / n)).float().clamp_min(1e-6))
        return self

    @torch.no_grad()
    def score(self, coarse: torch.Tensor, c: torch.Tensor, body: np.ndarray) -> torch.Tensor:
        """-log q(zbar) + const (x, y, z) float32 nats of one scan's cell grid (module docstring)."""
        zbar = self.pooled_residual(coarse, c, body) / self.scale.double().cpu().numpy()[:, None, None, None]
        return torch.from_numpy(0.5 * np.square(zbar).sum(0)).float()
