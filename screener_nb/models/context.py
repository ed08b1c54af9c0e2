"""The context condition: a masked predictor of the descriptor on the density grid.

Why it exists. The condition c[p] of Screener must describe the anatomy
*around* p (which organ, which patient) but not p itself: a condition that
sees the voxel "explains away" its anomaly. The paper gets this from a
full-resolution UNet trained with block masking for 300k GPU steps. At the
budgets a CPU allows the same network stays only weakly masking-invariant and
lowers every method it joins. This module gives the condition that property
*by construction* instead of by training:

1. **Coarse input, wide view.** The network works on the density grid itself
   (the preprocessed CT average-pooled with the density's stride, 4.5 mm cells
   at the default spacing): two channels, the cell's mean intensity and its
   standard deviation. A 32^3-cell window covers 144 x 144 x 144 mm.
2. **Masked prediction.** Training hides blocks of cells (``block`` cells per
   side) and regresses a standardised target at the hidden cells only (mean
   squared error, body cells only): the frozen descriptor's pooled features, or
   the cell mean and std themselves (``context_target``; the CPU profiles' choice,
   since the surroundings predict intensities far better than the descriptor).
   So the output at a hidden cell is an estimate of E[target | context].
3. **Masked inference.** At inference every cell is hidden in exactly one of
   ``2 ** 3 = 8`` passes: pass ``k`` hides the blocks whose block indices have
   parities ``k`` (every hidden block is surrounded by visible ones), and c at
   a cell is read from the pass in which its own block was hidden. A finding
   smaller than a block can never reach its own condition.

The density model q(y | c) then scores how far each cell's descriptor is from
what its surroundings predict. Self-supervised (no labels), a separate model
from the descriptor, and cheap: the network sees ~1/18 of the voxels.

Shapes: grids are (B, C, x, y, z) cells; ``stride`` is (3, 3, 2) voxels per cell.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InputError

#: channels of the coarse image input (cell mean, cell standard deviation) + the mask channel
IMAGE_CHANNELS = 2
N_PHASES = 8
#: normalisation layers the context network can use (see :class:`ContextNet`)
NORMS = ("instance", "batch")


def coarse_image(image: torch.Tensor, stride=(3, 3, 2)) -> torch.Tensor:
    """(B, 1, X, Y, Z) image in [0, 1] -> (B, 2, X // sx, Y // sy, Z // sz): per-cell mean and std.

    The cells are those of :func:`screener_nb.models.density.pool_features` (same stride, floor)."""
    if image.ndim != 5 or image.shape[1] != 1:
        raise InputError("coarse_image", "images (B, 1, X, Y, Z)", f"shape {tuple(image.shape)}")
    stride = tuple(int(s) for s in stride)
    mean = F.avg_pool3d(image, stride, stride)
    sq = F.avg_pool3d(image.square(), stride, stride)
    std = (sq - mean.square()).clamp_min(0).sqrt()
    return torch.cat([mean, std], 1)


def phase_masks(grid: Sequence[int], block: int, offset: Sequence[int] = (0, 0, 0)) -> torch.Tensor:
    """The 8 complementary inference masks (8, x, y, z) float32, 1 = hidden.

    Cells are grouped into blocks of ``block`` cells per axis, the block grid
    shifted by ``offset`` cells; mask ``k`` hides the blocks whose (bx, by, bz)
    parities equal the bits of ``k``. Every cell is hidden in exactly one mask.

    >>> m = phase_masks((4, 4, 4), block=2)
    >>> m.shape, m.sum(0).min().item(), m.sum(0).max().item(), m[0].mean().item()
    (torch.Size([8, 4, 4, 4]), 1.0, 1.0, 0.125)
    """
    if block < 1:
        raise ConfigError(f"context block: expected >= 1 cells, found {block}")
    idx = [((torch.arange(n) + int(o)) // block) % 2 for n, o in zip(grid, offset)]
    px, py, pz = torch.meshgrid(*idx, indexing="ij")
    code = px * 4 + py * 2 + pz
    return torch.stack([(code == k).float() for k in range(N_PHASES)])


def random_block_mask(grid: Sequence[int], block: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """A random mask (x, y, z) float32 hiding ``round(ratio * n)`` of the blocks (random grid offset)."""
    offset = rng.integers(0, block, 3)
    nb = [int(np.ceil((n + o) / block)) for n, o in zip(grid, offset)]
    flat = np.zeros(int(np.prod(nb)), np.float32)
    flat[rng.permutation(flat.size)[: max(1, int(round(ratio * flat.size)))]] = 1
    full = flat.reshape(nb).repeat(block, 0).repeat(block, 1).repeat(block, 2)
    return np.ascontiguousarray(full[offset[0]:offset[0] + grid[0], offset[1]:offset[1] + grid[1],
                                     offset[2]:offset[2] + grid[2]])


def training_mask(grid: Sequence[int], block: int, rng: np.random.Generator, ratio: float = 0.6,
                  phase_prob: float = 0.5) -> np.ndarray:
    """The mask of one training crop (x, y, z) float32: with ``phase_prob`` one of the inference
    phase masks (random offset and phase), else a random ``ratio`` of the blocks."""
    if rng.random() < phase_prob:
        m = phase_masks(grid, block, rng.integers(0, 2 * block, 3))[int(rng.integers(N_PHASES))]
        return m.numpy()
    return random_block_mask(grid, block, ratio, rng)


class ContextNet(nn.Module):
    """Masked context predictor on the density grid.

    ``forward(coarse (B, 2, x, y, z), mask (B, 1, x, y, z)) -> (B, D, x, y, z)``: the standardised
    descriptor each cell's surroundings predict (meaningful at hidden cells); ``heteroscedastic``:
    (B, 2D, x, y, z), the prediction and its log-variance (how sure the surroundings are). Input
    sides must be multiples of ``self.multiple`` (use :meth:`condition_map` for any size).

    ``norm``: ``"instance"`` (statistics of each input window, so the output depends on the
    window layout) or ``"batch"`` (training-batch statistics, frozen in eval mode: the network
    does not depend on the window layout, and a whole scan's grid is read in one pass per mask
    with ``window=None``).
    """

    def __init__(self, dim: int = 32, size: str = "tiny", block: int = 4, heteroscedastic: bool = False,
                 norm: str = "instance"):
        super().__init__()
        from .unet import build_unet

        if norm not in NORMS:
            raise ConfigError(f"context norm: expected one of {', '.join(NORMS)}, found {norm!r}")
        self.dim, self.block, self.heteroscedastic = int(dim), int(block), bool(heteroscedastic)
        self.norm = norm
        self.out_channels = self.dim * (2 if self.heteroscedastic else 1)
        self.unet = build_unet(size, in_channels=IMAGE_CHANNELS + 1, out_channels=self.out_channels, norm=norm)
        self.multiple = self.unet.multiple
        self.config = {"kind": "context", "dim": self.dim, "size": size, "block": self.block,
                       "heteroscedastic": self.heteroscedastic, "norm": norm}

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-cell loss (B, 1, x, y, z) of a prediction ``pred`` (B, out_channels, ...) of the
        standardised descriptor ``target`` (B, D, ...): mean squared error, or, heteroscedastic,
        the Gaussian NLL with the predicted log-variance (the last D channels)."""
        pred = pred.float()
        if not self.heteroscedastic:
            return (pred - target).square().mean(1, keepdim=True)
        mean, log_var = pred[:, :self.dim], pred[:, self.dim:].clamp(-7, 7)
        return 0.5 * ((mean - target).square() * torch.exp(-log_var) + log_var).mean(1, keepdim=True)

    def forward(self, coarse: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.unet(torch.cat([coarse * (1 - mask), mask], 1))

    def _padded(self, t: torch.Tensor, window: Sequence[int]) -> tuple[torch.Tensor, tuple]:
        grid = t.shape[2:]
        target = [max(w, -(-n // self.multiple) * self.multiple) for n, w in zip(grid, window)]
        pad = []
        for n, s in reversed(list(zip(grid, target))):
            pad += [0, s - n]
        return F.pad(t, pad), tuple(grid)

    #: ``(folder, stamp)`` where :meth:`scan_condition` memoises maps (set by the run's loader), or None
    map_cache: tuple | None = None

    @torch.no_grad()
    def scan_condition(self, coarse: torch.Tensor) -> torch.Tensor:
        """:meth:`condition_map` of a whole scan's coarse grid (1, 2, x, y, z) with the network's own
        inference settings (``self.window``, ``self.centred``). With :attr:`map_cache` set, each
        map is computed once and kept on disk, keyed by the grid's bytes, those settings and the
        weights' stamp: a run's stages score the same scans, and masked inference is the costly
        part of a context run."""
        window, centred = getattr(self, "window", (32, 32, 32)), bool(getattr(self, "centred", False))
        if self.map_cache is None:
            return self.condition_map(coarse, window=window, centred=centred)
        import hashlib

        from .. import files

        folder, stamp = self.map_cache
        grid = coarse.detach().float().cpu().contiguous()
        key = hashlib.sha1(grid.numpy().tobytes() + repr((tuple(grid.shape), window, centred, stamp)).encode()).hexdigest()
        path = Path(folder) / f"{key}.pt"
        if path.is_file():
            try:
                return files.torch_load(path).to(coarse.device)
            except InputError:  # a damaged cache file is recomputed
                pass
        out = self.condition_map(coarse, window=window, centred=centred)
        files.torch_save(out.detach().cpu(), path)
        return out

    @torch.no_grad()
    def condition_map(self, coarse: torch.Tensor, window=(32, 32, 32), overlap: float = 0.25,
                      sw_batch: int = 4, centred: bool = False, pass_batch: int = 2) -> torch.Tensor:
        """c (1, D, x, y, z) of a whole scan's coarse grid (1, 2, x, y, z) by masked inference:
        8 passes, each cell's value taken from the pass that hid its block (module docstring).
        ``centred``: the 8 passes are repeated with the block grid shifted by half a block on
        each axis (64 passes), and each cell is read from the shift that puts it in the middle
        half of its hidden block on every axis, so at least ``block // 4`` hidden cells separate
        it from anything the network sees (without: a cell at its block's edge has visible
        neighbours, and a finding larger than one cell reaches its own condition).
        Windows (MONAI sliding window) keep the network's input the size it was trained on;
        ``window=None`` runs the whole (padded) grid in one pass, the fast choice of a
        ``norm="batch"`` network; ``pass_batch`` of those passes go through the network together
        (the same values, faster on a CPU)."""
        from monai.inferers import sliding_window_inference

        if coarse.ndim != 5 or coarse.shape[0] != 1 or coarse.shape[1] != IMAGE_CHANNELS:
            raise InputError("ContextNet.condition_map", f"one coarse grid (1, {IMAGE_CHANNELS}, x, y, z)",
                             f"shape {tuple(coarse.shape)}")
        whole = window is None
        window = (1, 1, 1) if whole else tuple(int(w) for w in window)
        padded, grid = self._padded(coarse, window)
        shape = padded.shape[2:]
        out = torch.zeros(1, self.out_channels, *shape, dtype=coarse.dtype, device=coarse.device)

        def predict(w):
            return self(w[:, :IMAGE_CHANNELS], w[:, -1:])

        half = self.block // 2
        shifts = [0, half] if centred and half > 0 else [0]
        if len(shifts) > 1:
            # per axis: the cells in the middle half of their block unshifted; the rest are in the
            # middle half under the half-block shift
            centre = (self.block - 1) / 2
            unshifted = [((torch.arange(n) % self.block) - centre).abs() <= self.block / 4 for n in shape]
            middle = {0: unshifted, half: [~m for m in unshifted]}
        for offset in np.ndindex(*(len(shifts),) * 3):
            off = [shifts[o] for o in offset]
            take = 1.0
            if len(shifts) > 1:
                mx, my, mz = (middle[s][a] for a, s in enumerate(off))
                take = (mx[:, None, None] & my[None, :, None] & mz[None, None, :]).to(coarse)
            masks = phase_masks(shape, self.block, off).to(coarse)
            # whole-grid passes go ``pass_batch`` masks at a time: frozen statistics make the samples of
            # a batch independent, and two per call use a 2-core CPU better than one
            step = max(1, int(pass_batch)) if whole else 1
            for k in range(0, N_PHASES, step):
                m = masks[k:k + step][:, None]
                # channels_last_3d: the whole-grid pass is ~1.6x faster on a 2-core CPU (same values)
                x = torch.cat([padded.expand(len(m), -1, -1, -1, -1), m], 1).contiguous(
                    memory_format=torch.channels_last_3d)
                pred = (predict(x) if whole else
                        sliding_window_inference(x, window, sw_batch, predict, overlap=overlap, mode="gaussian"))
                out += (pred * (m * take)).sum(0, keepdim=True)
        return out[..., :grid[0], :grid[1], :grid[2]]
