"""Colour augmentations applied independently to each SSL view.

The recipe is the paper's (docs/method.md, "Colour augmentations per view"), in the
order of the authors' public code (vox2vec ``augment_color``):

1. blur *or* sharpen in the axial plane (p 0.8, then one of the two with
   probability 1/2): Gaussian blur with sigma ~ U(0, 1.5) mm, or unsharp
   masking ``x + a (x - blur(x))`` with sigma ~ U(0, 1.5) mm and a ~ U(0, 2);
   sigma is converted from mm to voxels with the *view's* spacing, so the
   physical blur does not depend on the resize factor;
2. additive Gaussian noise (p 0.8, sigma ~ U(0, 0.1));
3. brightness ``x * U(0.8, 1.2)`` (p 0.8), clipped to [0, 1];
4. contrast about the view's mean ``(x - m) * U(0.8, 1.2) + m`` (p 0.8), clipped;
5. gamma ``x ** U(0.8, 1.25)`` (p 0.8) on the clipped image;
6. a final clip to [0, 1] (so noise alone cannot leave the range).

Written with numpy / scipy rather than MONAI transforms on purpose:
MONAI's random transforms draw from their own ``RandomState``, so a batch
would not be a pure function of the ``np.random.Generator`` the training loop
passes in (determinism from ``(seed, step)``); and MONAI's ``AdjustContrast``
applies gamma to the min-max *rescaled* view, which differs from the paper's
``x ** gamma`` on the [0, 1] scale. The blur is ``scipy.ndimage.gaussian_filter``
with sigma 0 along Z (in-plane only; scipy skips axes with sigma 0).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from scipy import ndimage

from ..errors import ConfigError, InputError

Range = tuple[float, float]


@dataclass(frozen=True)
class ColorAugment:
    """Random intensity augmentation of one view (numpy, (X, Y, Z), values in [0, 1]).

    Every constant is the paper's default; probabilities are per operation.
    ``ColorAugment.identity()`` turns every operation off (output = input).

    >>> aug = ColorAugment()
    >>> x = np.full((8, 8, 4), 0.5, np.float32)
    >>> y = aug(x, spacing=(1.5, 1.5, 2.25), rng=np.random.default_rng(0))
    >>> y.shape, y.dtype, bool(y.min() >= 0 and y.max() <= 1)
    ((8, 8, 4), dtype('float32'), True)
    """

    blur_or_sharpen_p: float = 0.8
    sharpen_fraction: float = 0.5      # P(sharpen | blur-or-sharpen applied); the rest is blur
    blur_sigma_mm: Range = (0.0, 1.5)
    sharpen_sigma_mm: Range = (0.0, 1.5)
    sharpen_alpha: Range = (0.0, 2.0)
    in_plane_axes: tuple[int, ...] = (0, 1)   # X, Y: the axial plane after preprocessing
    noise_p: float = 0.8
    noise_sigma: Range = (0.0, 0.1)
    brightness_p: float = 0.8
    brightness: Range = (0.8, 1.2)
    contrast_p: float = 0.8
    contrast: Range = (0.8, 1.2)
    gamma_p: float = 0.8
    gamma: Range = (0.8, 1.25)

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name.endswith("_p") or f.name == "sharpen_fraction":
                if not (isinstance(v, (int, float)) and 0.0 <= float(v) <= 1.0):
                    raise ConfigError(f"ColorAugment.{f.name} must be a probability in [0, 1], got {v!r}")
            elif f.name == "in_plane_axes":
                if not all(a in (0, 1, 2) for a in v):
                    raise ConfigError(f"ColorAugment.in_plane_axes must be axes among 0, 1, 2, got {v!r}")
            else:
                ok = (isinstance(v, (tuple, list)) and len(v) == 2
                      and all(isinstance(t, (int, float)) and np.isfinite(t) for t in v)
                      and 0.0 <= v[0] <= v[1])
                if not ok:
                    raise ConfigError(f"ColorAugment.{f.name} must be a range (lo, hi) with 0 <= lo <= hi, got {v!r}")
        if self.gamma[0] <= 0:
            raise ConfigError(f"ColorAugment.gamma must be positive, got {self.gamma!r}")

    @classmethod
    def identity(cls) -> "ColorAugment":
        """No augmentation at all (every probability 0)."""
        return cls(blur_or_sharpen_p=0.0, noise_p=0.0, brightness_p=0.0, contrast_p=0.0, gamma_p=0.0)

    def __call__(self, image: np.ndarray, spacing, rng: np.random.Generator) -> np.ndarray:
        """Augment one view.

        Args:
            image: (X, Y, Z) float array in [0, 1].
            spacing: (3,) the view's voxel size in mm (converts blur sigmas to voxels).
            rng: the only source of randomness (batches are pure functions of it).
        Returns:
            (X, Y, Z) float32 in [0, 1].
        """
        x = np.asarray(image, dtype=np.float32)
        if x.ndim != 3:
            raise InputError("ColorAugment input", "an (X, Y, Z) view", f"shape {x.shape}")
        try:
            sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            sp = np.zeros(0)
        if sp.shape != (3,) or not np.all(sp > 0):
            raise InputError("ColorAugment spacing", "3 positive voxel sizes in mm", f"{spacing!r}")

        if rng.random() < self.blur_or_sharpen_p:
            sharpen = rng.random() < self.sharpen_fraction
            sigma_mm = rng.uniform(*(self.sharpen_sigma_mm if sharpen else self.blur_sigma_mm))
            sigma = [sigma_mm / sp[a] if a in self.in_plane_axes else 0.0 for a in range(3)]
            blurred = ndimage.gaussian_filter(x, sigma=sigma)
            if sharpen:
                alpha = rng.uniform(*self.sharpen_alpha)
                x = x + np.float32(alpha) * (x - blurred)
            else:
                x = blurred
        if rng.random() < self.noise_p:
            sigma = rng.uniform(*self.noise_sigma)
            x = x + np.float32(sigma) * rng.standard_normal(x.shape, dtype=np.float32)
        if rng.random() < self.brightness_p:
            x = np.clip(x * np.float32(rng.uniform(*self.brightness)), 0.0, 1.0)
        if rng.random() < self.contrast_p:
            m = x.mean(dtype=np.float64)
            x = np.clip((x - m) * rng.uniform(*self.contrast) + m, 0.0, 1.0)
        if rng.random() < self.gamma_p:
            x = np.power(np.clip(x, 0.0, 1.0), np.float32(rng.uniform(*self.gamma)))
        return np.clip(x, 0.0, 1.0).astype(np.float32, copy=False)
