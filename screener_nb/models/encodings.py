"""Sin-cos encodings of absolute position in the CT: the ``sincos`` condition baseline.

The ablation of the paper compares its learned condition with "sin-cos
encodings of each voxel's absolute position in the whole CT". The encoding
parameters are not stated in the paper; the choices here:

- each axis gets ``dim / 3`` channels: ``n = dim / 6`` frequencies, each as a
  (sin, cos) pair, so ``dim`` must be a multiple of 6 (24 -> 4 frequencies per axis);
- wavelengths are geometric from ``min_wavelength_mm`` (9 mm: twice the 4.5 mm
  step of the pooled grid, the shortest wavelength that grid can represent
  without aliasing) to ``max_wavelength_mm`` (1000 mm, longer than any CT, so
  the longest (sin, cos) pair alone already tells every position of a scan
  apart: the code is unique);
- phases are computed in float64 from millimetres (positions up to ~1 m would
  lose sub-voxel precision in float32), the result is float32.

Channel layout for axis a (0 = X, 1 = Y, 2 = Z) and frequency k (0 = shortest
wavelength): channel ``a * dim/3 + k`` is ``sin(2 pi p_a / lambda_k)`` and
channel ``a * dim/3 + n + k`` is ``cos(2 pi p_a / lambda_k)``.
"""
from __future__ import annotations

import math

import torch

from ..errors import ConfigError, InputError


def sincos_wavelengths(n: int, min_wavelength_mm: float = 9.0, max_wavelength_mm: float = 1000.0) -> torch.Tensor:
    """``n`` wavelengths (mm, float64), geometric from the shortest to the longest."""
    if n < 1:
        raise ConfigError(f"sin-cos encoding: need at least one frequency per axis, found {n}")
    if not 0 < min_wavelength_mm <= max_wavelength_mm:
        raise ConfigError("sin-cos encoding: expected 0 < min_wavelength_mm <= max_wavelength_mm, "
                          f"found {min_wavelength_mm} and {max_wavelength_mm}")
    if n == 1:
        return torch.tensor([max_wavelength_mm], dtype=torch.float64)
    ratio = max_wavelength_mm / min_wavelength_mm
    return min_wavelength_mm * ratio ** (torch.arange(n, dtype=torch.float64) / (n - 1))


def sincos_condition_map(origin_mm: torch.Tensor, step_mm: torch.Tensor, shape: tuple[int, int, int],
                         dim: int = 24, *, min_wavelength_mm: float = 9.0,
                         max_wavelength_mm: float = 1000.0) -> torch.Tensor:
    """Sin-cos codes of the absolute positions of a grid's cells.

    Args:
        origin_mm: (3,) position (mm) of cell (0, 0, 0) in the whole CT.
        step_mm: (3,) spacing (mm) of the grid; cell (i, j, k) lies at ``origin_mm + (i, j, k) * step_mm``.
        shape: grid size (x, y, z).
        dim: number of channels, a multiple of 6.
        min_wavelength_mm, max_wavelength_mm: range of the geometric wavelengths.

    Returns:
        (dim, x, y, z) float32 on the CPU (the caller moves it); layout in the module docstring.
    """
    if not isinstance(dim, int) or dim < 6 or dim % 6:
        raise ConfigError(f"sin-cos condition: dim must be a positive multiple of 6 (sin and cos of each "
                          f"of 3 axes), found {dim!r}")
    origin = torch.as_tensor(origin_mm, dtype=torch.float64).cpu()
    step = torch.as_tensor(step_mm, dtype=torch.float64).cpu()
    if origin.shape != (3,) or step.shape != (3,):
        raise InputError("sincos_condition_map", "origin_mm and step_mm of shape (3,)",
                         f"{tuple(origin.shape)} and {tuple(step.shape)}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError("sincos_condition_map", "a grid shape of 3 positive sizes", f"{shape}")
    n = dim // 6
    omega = 2 * math.pi / sincos_wavelengths(n, min_wavelength_mm, max_wavelength_mm)  # (n,) rad/mm
    out = torch.empty((dim, *shape), dtype=torch.float32)
    per_axis = dim // 3
    for a in range(3):
        pos = origin[a] + torch.arange(shape[a], dtype=torch.float64) * step[a]  # (shape[a],) mm
        phase = omega[:, None] * pos[None, :]                                      # (n, shape[a])
        view = [1, 1, 1, 1]
        view[1 + a] = shape[a]
        out[a * per_axis: a * per_axis + n] = torch.sin(phase).float().view(n, *view[1:])
        out[a * per_axis + n: (a + 1) * per_axis] = torch.cos(phase).float().view(n, *view[1:])
    return out
