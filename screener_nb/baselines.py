"""Reference scores beside the Screener methods: what they bound or what they improve on.

* :class:`OracleResidual`: the residual density of :mod:`screener_nb.models.residual`
  with the *oracle* condition of :mod:`screener_nb.models.oracle` (the phantom's
  known organ map) in place of the learned context: an upper bound of what a
  better condition could give the same score (notebook 04).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

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
    from .inference import body_cells, coarse_cells
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
