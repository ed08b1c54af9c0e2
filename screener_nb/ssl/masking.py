"""Random block masking of SSL views, for the condition model.

The paper's condition model sees heavily masked crops so that its features
encode context (position, patient traits) and not local pathology: the crop
is split into a regular grid of blocks (4 x 4 x 4 on the 96 x 96 x 64 crop,
i.e. 24 x 24 x 16 voxel blocks; the block size is derived as patch / grid),
a fixed fraction of the blocks (ratio 0.6 -> round(0.6 * 64) = 38 blocks) is
hidden, and each view is masked independently with probability ``p`` (0.5 in
the authors' module).

Convention: **mask = 1 means hidden**, 0 means visible. A masked view is fed
to the network as two channels ``(image * (1 - mask), mask)``: hidden voxels
are zeroed and the second channel tells the network which zeros are hidden
(an unmasked view has an all-zero mask channel, so the input always has two
channels). The authors' code stores the complement (1 = visible) and feeds
``(image * mask, mask)``; both carry the same information.

Written by hand (a few lines of numpy) because MONAI's ``RandCoarseDropout``
draws holes at random positions and counts, not an exact fraction of aligned
grid blocks, and draws from its own RandomState.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError, InputError


@dataclass(frozen=True)
class BlockMasking:
    """Hide ``round(ratio * n_blocks)`` aligned blocks of a view with probability ``p``.

    Args:
        grid: blocks per axis (X, Y, Z); the patch must be divisible by it.
        ratio: fraction of blocks hidden in a masked view.
        p: probability that a given view is masked at all.

    >>> m = BlockMasking(grid=(2, 2, 2), ratio=0.5, p=1.0)
    >>> mask = m.block_mask((4, 4, 2), np.random.default_rng(0))
    >>> float(mask.mean())
    0.5
    """

    grid: tuple[int, int, int] = (4, 4, 4)
    ratio: float = 0.6
    p: float = 0.5

    def __post_init__(self) -> None:
        g = tuple(self.grid)
        if len(g) != 3 or not all(isinstance(v, (int, np.integer)) and v >= 1 for v in g):
            raise ConfigError(f"BlockMasking.grid must be 3 positive integers (X, Y, Z), got {self.grid!r}")
        object.__setattr__(self, "grid", tuple(int(v) for v in g))
        if not (0.0 <= float(self.ratio) <= 1.0):
            raise ConfigError(f"BlockMasking.ratio must be in [0, 1], got {self.ratio!r}")
        if not (0.0 <= float(self.p) <= 1.0):
            raise ConfigError(f"BlockMasking.p must be a probability in [0, 1], got {self.p!r}")

    @property
    def n_blocks(self) -> int:
        return int(np.prod(self.grid))

    @property
    def n_masked(self) -> int:
        """Blocks hidden in a masked view (ratio 0.6 of 64 -> 38)."""
        return int(round(float(self.ratio) * self.n_blocks))

    def block_size(self, shape) -> tuple[int, int, int]:
        """Voxels per block along (X, Y, Z) for a view of ``shape``; patch must divide by grid."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or any(s % g for s, g in zip(shape, self.grid)):
            raise InputError("BlockMasking", f"a view shape (X, Y, Z) divisible by the block grid {self.grid}",
                             f"shape {shape}")
        return tuple(s // g for s, g in zip(shape, self.grid))  # type: ignore[return-value]

    def block_mask(self, shape, rng: np.random.Generator) -> np.ndarray:
        """Always-masked view: (X, Y, Z) float32, 1 on exactly ``n_masked`` hidden blocks."""
        bx, by, bz = self.block_size(shape)
        flat = np.zeros(self.n_blocks, dtype=np.float32)
        flat[rng.permutation(self.n_blocks)[: self.n_masked]] = 1.0
        g = flat.reshape(self.grid)
        gx, gy, gz = self.grid
        # broadcast each grid cell over its block, then merge (grid, block) axes
        full = np.broadcast_to(g[:, None, :, None, :, None], (gx, bx, gy, by, gz, bz))
        return np.ascontiguousarray(full.reshape(gx * bx, gy * by, gz * bz))

    def sample(self, shape, rng: np.random.Generator) -> np.ndarray:
        """With probability ``p`` a block mask, else all zeros (nothing hidden). (X, Y, Z) float32."""
        self.block_size(shape)  # validate even when this view stays unmasked
        if rng.random() < self.p:
            return self.block_mask(shape, rng)
        return np.zeros(tuple(int(s) for s in shape), dtype=np.float32)

    def __call__(self, images: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask a batch of views independently.

        Args:
            images: (B, 1, X, Y, Z) views.
            rng: source of randomness.
        Returns:
            inputs (B, 2, X, Y, Z) = (image * (1 - mask), mask) and masks (B, 1, X, Y, Z) (1 = hidden).
        """
        if images.ndim != 5 or images.shape[1] != 1:
            raise InputError("BlockMasking", "views of shape (B, 1, X, Y, Z)", f"shape {tuple(images.shape)}")
        masks = np.stack([self.sample(images.shape[2:], rng) for _ in range(images.shape[0])])[:, None]
        masks_t = torch.from_numpy(masks).to(device=images.device, dtype=images.dtype)
        return masked_input(images, masks_t), masks_t


def masked_input(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B, 1, X, Y, Z) images and masks (1 = hidden) -> (B, 2, X, Y, Z) network input."""
    if images.shape != masks.shape or images.ndim != 5 or images.shape[1] != 1:
        raise InputError("masked_input", "images and masks of the same shape (B, 1, X, Y, Z)",
                         f"images {tuple(images.shape)}, masks {tuple(masks.shape)}")
    return torch.cat([images * (1 - masks), masks], dim=1)
