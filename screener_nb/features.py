"""What the density models read: the frozen encoders' pooled descriptor y and condition c.

:class:`FeatureExtractor` turns a crop into (y, c) on the density grid; :func:`pooled_map`
and :func:`stitch_encoder` run an encoder over a whole scan in MONAI sliding windows;
:func:`scan_scores` scores a whole scan's cell grid with one or more densities. Everything
above (the :class:`~screener_nb.inference.Screener` facade, density fitting, distillation,
evaluation) builds on this module, which imports none of them.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .errors import ConfigError
from .methods import CONDITIONS
from .runtime import autocast

#: how a whole scan's descriptor map is computed: MONAI sliding windows, or one pass over the scan
DESCRIPTOR_MAPS = ("windows", "scan")
#: the largest tile (voxels) of a one-pass map, and the halo of its tiles when a scan is larger
SCAN_TILE = (192, 192, 160)
SCAN_HALO = (24, 24, 16)


class FeatureExtractor(nn.Module):
    """Frozen encoders -> pooled descriptor y and condition c of a crop.

    ``forward(x (B,1,X,Y,Z) in [0,1], origin_mm (B,3)) -> (y (B,D,x,y,z), c (B,C,x,y,z) | None)``
    where (x, y, z) = (X, Y, Z) / pool_stride. ``origin_mm`` is the crop's
    first voxel position in the whole preprocessed CT (used by ``sincos``).
    ``descriptor_map``: how :meth:`scan_features` encodes a whole scan with the descriptor --
    ``"windows"`` (:func:`pooled_map`, the paper's sliding windows) or ``"scan"``
    (:func:`scan_pooled_map`, one pass over the scan, tiled beyond a maximum size).
    """

    def __init__(self, descriptor: nn.Module, condition: str, condition_encoder: nn.Module | None,
                 spacing: tuple[float, float, float], pool_stride=(3, 3, 2), sincos_dim: int = 24,
                 descriptor_map: str = "windows"):
        super().__init__()
        if condition not in CONDITIONS:
            raise ConfigError(f"unknown condition {condition!r}; known: {', '.join(CONDITIONS)}")
        if descriptor_map not in DESCRIPTOR_MAPS:
            raise ConfigError(f"descriptor_map: expected one of {', '.join(DESCRIPTOR_MAPS)}, found {descriptor_map!r}")
        if condition == "learned" and condition_encoder is None:
            raise ConfigError("condition 'learned' needs the condition encoder")
        self.descriptor, self.condition_kind = descriptor, condition
        self.condition_encoder = condition_encoder if condition == "learned" else None
        self.spacing, self.pool_stride, self.sincos_dim = tuple(spacing), tuple(pool_stride), sincos_dim
        self.descriptor_map = descriptor_map

    @property
    def cond_dim(self) -> int:
        if self.condition_kind == "none":
            return 0
        if self.condition_kind == "sincos":
            return self.sincos_dim
        return int(self.condition_encoder.spec["out_channels"])

    @property
    def dim(self) -> int:
        return int(self.descriptor.spec["out_channels"])

    @property
    def context(self) -> bool:
        """Whether the learned condition is the context condition (:mod:`screener_nb.models.context`),
        whose value at a cell depends on the whole scan: such runs are scored scan by scan."""
        return self.condition_encoder is not None and self.condition_encoder.spec.get("kind") == "context"

    def forward(self, x: torch.Tensor, origin_mm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        from .models.density import pool_features
        from .ssl.task import encode

        y = pool_features(encode(self.descriptor, x).float(), self.pool_stride)
        if self.condition_kind == "none":
            return y, None
        if self.condition_kind == "learned":
            if self.context:  # the window is all the context there is here
                return y, torch.cat([self._context(w[None]) for w in x])
            return y, pool_features(encode(self.condition_encoder, x).float(), self.pool_stride)
        return y, self.sincos(origin_mm, tuple(y.shape[2:])).to(y.device, y.dtype)

    def _context(self, x: torch.Tensor) -> torch.Tensor:
        from .models.context import coarse_image

        return self.condition_encoder.scan_condition(coarse_image(x.float(), self.pool_stride)).to(x.device)

    def scan_features(self, x: torch.Tensor, patch, overlap: float = 0.25, sw_batch: int = 2,
                      y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pooled descriptor and condition of a whole scan ``x`` (1, 1, X, Y, Z) in [0, 1]:
        (1, D, x, y, z) and (1, C, x, y, z) | None on the extractor's device, with
        (x, y, z) = (X, Y, Z) // pool_stride. Encoders run in ``patch``-sized windows
        (:func:`pooled_map`), or the descriptor over the whole scan (``descriptor_map="scan"``);
        the context condition sees the whole scan's coarse grid.
        ``y``: the descriptor's map when already computed (it is then returned as is)."""
        dev = next(self.descriptor.parameters()).device
        if y is None and self.descriptor_map == "scan":
            y = scan_pooled_map(self.descriptor, x, self.pool_stride).to(dev)
        elif y is None:
            y = pooled_map(self.descriptor, x, patch, self.pool_stride, overlap, sw_batch).to(dev)
        grid = tuple(y.shape[2:])
        if self.condition_kind == "none":
            return y, None
        if self.condition_kind == "sincos":  # origin 0: the scan's first voxel, as in the windows' codes
            return y, self.sincos(torch.zeros(1, 3, dtype=torch.float64), grid).to(dev, y.dtype)
        if self.context:
            return y, self._context(x.to(dev))
        return y, pooled_map(self.condition_encoder, x, patch, self.pool_stride, overlap, sw_batch).to(dev)

    def scan_condition(self, x: torch.Tensor) -> torch.Tensor:
        """The context condition (1, C, x, y, z) of a whole scan ``x`` (1, 1, X, Y, Z) without the
        descriptor (what the residual density reads); only for the context condition."""
        if not self.context:
            raise ConfigError(f"scan_condition: the context condition only, found condition {self.condition_kind!r}")
        return self._context(x.to(next(self.descriptor.parameters()).device))

    def sincos(self, origin_mm: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, sincos_dim, *grid) position codes of the pooled cells of crops starting at ``origin_mm`` (B, 3)."""
        from .models.encodings import sincos_condition_map

        s = torch.tensor(self.spacing, dtype=torch.float64)
        stride = torch.tensor(self.pool_stride, dtype=torch.float64)
        # a pooled cell's position is the centre of the voxels it averages
        maps = [sincos_condition_map(o + (stride - 1) / 2 * s, s * stride, grid, self.sincos_dim)
                for o in origin_mm.double().cpu()]
        return torch.stack(maps)


def stitch_encoder(encoder: nn.Module, x: torch.Tensor, patch, overlap: float, sw_batch: int,
                   channels: int | None = None) -> torch.Tensor:
    """(1, C, X, Y, Z) float32 on the CPU: an encoder's full-resolution map of the
    whole image ``x`` (1, 1, X, Y, Z), Gaussian-blended MONAI sliding windows run on the
    encoder's device. ``channels``: keep only the first ones (the encoder still computes all)."""
    from monai.inferers import sliding_window_inference

    from .ssl.task import encode

    dev = next(encoder.parameters()).device

    def predictor(w: torch.Tensor) -> torch.Tensor:
        with autocast(dev):
            out = encode(encoder, w)
        return out[:, :channels].float()

    return sliding_window_inference(x, tuple(patch), sw_batch, predictor, overlap=overlap, mode="gaussian",
                                    sw_device=dev, device=torch.device("cpu"))


def pooled_map(encoder: nn.Module, x: torch.Tensor, patch, stride, overlap: float = 0.25,
               sw_batch: int = 2) -> torch.Tensor:
    """(1, C, X // sx, Y // sy, Z // sz) float32 on the CPU: an encoder's map of the whole image
    ``x`` (1, 1, X, Y, Z), average-pooled with ``stride`` inside each window and blended on the
    pooled grid (Gaussian weights), windows run on the encoder's device.

    The image is padded so every window starts on a cell boundary: the pooled windows then tile
    the same global cell grid that :func:`~screener_nb.models.density.pool_features` of the whole
    map would give (equal when one window covers the image; tested). Memory is that of the
    pooled map, 1 / (sx * sy * sz) of a full-resolution stitch.
    """
    from monai.inferers import sliding_window_inference

    from .models.density import pool_features
    from .ssl.task import encode

    stride, patch = tuple(int(s) for s in stride), tuple(int(p) for p in patch)
    if any(p % s for p, s in zip(patch, stride)):
        raise ConfigError(f"window {patch} must be a multiple of the pooling stride {stride}")
    intervals = [max(1, int(p * (1 - overlap))) for p in patch]
    if any(i % s for i, s in zip(intervals, stride)):
        raise ConfigError(f"overlap {overlap} gives window steps {tuple(intervals)} voxels, not multiples of the "
                          f"pooling stride {stride}; choose e.g. 0, 0.25 or 0.5")
    shape = x.shape[2:]
    grid = [n // s for n, s in zip(shape, stride)]
    target = [max(p, -(-n // s) * s) for n, p, s in zip(shape, patch, stride)]
    pad = []
    for n, t in reversed(list(zip(shape, target))):
        pad += [0, t - n]
    xp = torch.nn.functional.pad(x, pad)
    dev = next(encoder.parameters()).device

    def predictor(w: torch.Tensor) -> torch.Tensor:
        with autocast(dev):
            out = encode(encoder, w)
        return pool_features(out.float(), stride)

    out = sliding_window_inference(xp, patch, sw_batch, predictor, overlap=overlap, mode="gaussian",
                                   sw_device=dev, device=torch.device("cpu"))
    return out[..., :grid[0], :grid[1], :grid[2]]


def tiled_pooled_map(encoder: nn.Module, x: torch.Tensor, stride, tile, halo, *, multiple: int = 1) -> torch.Tensor:
    """(1, C, X // sx, Y // sy, Z // sz) float32 on the CPU: an encoder's pooled map of the whole
    image ``x`` (1, 1, X, Y, Z), each voxel encoded about once.

    The image is cut into tiles of ``tile`` voxels that overlap by two ``halo`` widths; each tile
    is encoded and pooled with ``stride``, and each cell is taken from the one tile whose core
    (the tile without its halo) holds it -- no blending. A voxel is encoded about
    prod(tile / (tile - 2 halo)) times, against prod(1 / (1 - overlap)) times for the sliding
    windows of :func:`pooled_map` (2.4x at overlap 0.25, 8x at 0.5).

    Exact -- equal to the pooled output of one pass over the whole zero-padded image -- for an
    encoder whose output at a voxel depends only on the input within ``halo`` voxels and that
    does not normalise over its input (tested with such a network). The project's UNets use
    instance normalisation and a receptive field wider than any affordable halo, so for them
    the map is an approximation of the windowed one (``bench tiles`` measures how close).

    Args:
        stride: pooling cells (sx, sy, sz) voxels; ``halo`` and ``tile - 2 halo`` must be
            multiples of it, so tiles cut the cell grid at cell boundaries.
        tile, halo: (3,) voxels; ``tile`` a multiple of ``multiple`` (the UNet's input multiple).
    """
    from .models.density import pool_features
    from .ssl.task import encode

    stride, tile, halo = (tuple(int(v) for v in t) for t in (stride, tile, halo))
    core = tuple(t - 2 * h for t, h in zip(tile, halo))
    if any(c <= 0 or c % s or h % s for c, h, s in zip(core, halo, stride)) or any(t % multiple for t in tile):
        raise ConfigError(f"tiles {tile} with halo {halo}: expected a halo and a core (tile - 2 halo = {core}) "
                          f"that are positive multiples of the pooling stride {stride}, and tiles that are "
                          f"multiples of {multiple}")
    shape = tuple(x.shape[2:])
    counts = [-(-n // c) for n, c in zip(shape, core)]
    pad = []
    for n, c, h, k in reversed(list(zip(shape, core, halo, counts))):
        pad += [h, k * c + h - n]
    xp = torch.nn.functional.pad(x.float(), pad)
    dev = next(encoder.parameters()).device
    out = None
    for i in range(counts[0]):
        for j in range(counts[1]):
            for k in range(counts[2]):
                idx = (i, j, k)
                window = xp[(..., *(slice(q * c, q * c + t) for q, c, t in zip(idx, core, tile)))].to(dev)
                with autocast(dev):
                    cells = pool_features(encode(encoder, window).float(), stride).cpu()
                if out is None:
                    out = torch.zeros(1, cells.shape[1], *(q * c // s for q, c, s in zip(counts, core, stride)))
                inner = cells[(..., *(slice(h // s, (h + c) // s) for h, c, s in zip(halo, core, stride)))]
                out[(..., *(slice(q * c // s, (q + 1) * c // s) for q, c, s in zip(idx, core, stride)))] = inner
    grid = [n // s for n, s in zip(shape, stride)]
    return out[..., :grid[0], :grid[1], :grid[2]]


def scan_tiling(shape, stride, multiple: int, max_tile=SCAN_TILE, halo=SCAN_HALO) -> tuple[tuple, tuple]:
    """(tile, halo) voxels of :func:`scan_pooled_map` for a scan of ``shape`` (X, Y, Z): on an axis
    that fits one tile of at most ``max_tile``, the axis rounded up to a multiple of the pooling
    stride and of ``multiple``, with no halo (one pass over it); on a longer axis, tiles of
    ``max_tile`` that overlap by two ``halo`` widths."""
    from math import lcm

    tile, out_halo = [], []
    for n, s, t, h in zip(shape, stride, max_tile, halo):
        step = lcm(int(s), int(multiple))
        whole = -(-int(n) // step) * step
        if whole <= t:
            tile.append(whole)
            out_halo.append(0)
        else:
            tile.append(int(t))
            out_halo.append(int(h))
    return tuple(tile), tuple(out_halo)


def scan_pooled_map(encoder: nn.Module, x: torch.Tensor, stride, max_tile=SCAN_TILE, halo=SCAN_HALO) -> torch.Tensor:
    """(1, C, X // sx, Y // sy, Z // sz) float32 on the CPU: an encoder's pooled map of the whole
    image ``x`` (1, 1, X, Y, Z) from one pass over it, or over tiles of at most ``max_tile`` voxels
    with a ``halo`` where it is larger (:func:`scan_tiling`, :func:`tiled_pooled_map`).

    Each voxel is encoded about once (1.3-1.8 times with the padding), against 2.8 times for
    48 x 48 x 32 windows at overlap 0.25 and 5.4 at 0.5. An instance-normalised UNet normalises
    over the scan (or tile) instead of over each window, so the map differs from the windowed
    one (docs/experiments.md, E33)."""
    tile, h = scan_tiling(tuple(x.shape[2:]), stride, getattr(encoder, "multiple", 1), max_tile, halo)
    return tiled_pooled_map(encoder, x, stride, tile, h, multiple=getattr(encoder, "multiple", 1))


@torch.inference_mode()
def scan_scores(extractor: FeatureExtractor, densities: dict, x: torch.Tensor, patch, overlap: float = 0.25,
                sw_batch: int = 2, extractors: dict | None = None, body: np.ndarray | None = None) -> dict:
    """Scan-mode anomaly maps: method -> (X, Y, Z) float32 scores (nats) of a whole scan
    ``x`` (1, 1, X, Y, Z).

    The descriptor runs once; each condition kind once (``extractors``: method -> its
    extractor sharing this one's descriptor, default ``extractor`` for all); every density
    scores the whole cell grid, and the cell scores are upsampled to the voxels. ``body``
    (X, Y, Z) bool: the scan's body mask, which the residual density averages inside."""
    from .models.density import upsample_cells
    from .models.residual import ResidualDensity

    extractors = extractors or {m: extractor for m in densities}
    # the residual density reads the context's prediction only: no descriptor pass when all are residual
    only_residual = all(isinstance(d, ResidualDensity) for d in densities.values())
    y, conds = None, {}
    out = {}
    for m, density in densities.items():
        ext = extractors[m]
        key = (ext.condition_kind, id(ext.condition_encoder))
        if key not in conds and only_residual:
            conds[key] = ext.scan_condition(x)
        elif key not in conds:
            y, conds[key] = ext.scan_features(x, patch, overlap, sw_batch, y=y)
        if isinstance(density, ResidualDensity):
            nll = density.score(coarse_cells(x, ext.pool_stride)[0], conds[key][0],
                                body_cells(body, ext.pool_stride, source=m))[None]
        else:
            nll = -density.log_prob(y, conds[key])
        out[m] = upsample_cells(nll.float().cpu(), tuple(x.shape[2:]), ext.pool_stride)[0]
    return out


def coarse_cells(x: torch.Tensor, stride) -> torch.Tensor:
    """(1, 2, x, y, z) cell mean and std of a scan ``x`` (1, 1, X, Y, Z) on the CPU."""
    from .models.context import coarse_image

    return coarse_image(x.float().cpu(), tuple(stride))


def body_cells(body: np.ndarray | None, stride, source: str = "scan") -> np.ndarray:
    """(x, y, z) bool: the cells at least half inside the body mask (X, Y, Z)."""
    if body is None:
        raise ConfigError(f"{source}: scoring needs the scan's body mask")
    b = torch.from_numpy(np.asarray(body, np.float32))[None, None]
    return (torch.nn.functional.avg_pool3d(b, tuple(stride), tuple(stride))[0, 0] > 0.5).numpy()
