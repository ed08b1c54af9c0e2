"""Whole-volume anomaly maps: the :class:`Screener` object users call.

``Screener.from_run("runs/demo", density="flow", condition="learned")``
rebuilds the frozen pipeline of a run; ``anomaly_map(image)`` takes a path
(NIfTI / NRRD / DICOM folder) or a :class:`~screener_nb.data.volume.Volume`
and returns a float32 map on the INPUT's grid (preprocessing inverted),
higher = more anomalous, outside the body set to the map's minimum.

Memory: MONAI's ``sliding_window_inference`` stitches only what the predictor
returns, and our predictor returns the one-channel score of each window --
descriptor, condition, pooling, -log q and trilinear upsampling all happen
inside the window. Peak memory therefore does not grow with the descriptor
dimension (compare :func:`naive_anomaly_map`, which stitches the full
descriptor and condition maps first).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import files
from .data.volume import Volume
from .errors import ConfigError, InputError
from .methods import CONDITIONS, DENSITIES, Method, check_method, method_name  # noqa: F401 (the public vocabulary)
from .runtime import autocast, resolve_device

#: ``window``: the paper's -- the density inside each window, only the score map stitched;
#: ``scan``: pooled descriptor and condition of the whole scan, then the density once per cell
INFERENCE_MODES = ("window", "scan")


class FeatureExtractor(nn.Module):
    """Frozen encoders -> pooled descriptor y and condition c of a crop.

    ``forward(x (B,1,X,Y,Z) in [0,1], origin_mm (B,3)) -> (y (B,D,x,y,z), c (B,C,x,y,z) | None)``
    where (x, y, z) = (X, Y, Z) / pool_stride. ``origin_mm`` is the crop's
    first voxel position in the whole preprocessed CT (used by ``sincos``).
    """

    def __init__(self, descriptor: nn.Module, condition: str, condition_encoder: nn.Module | None,
                 spacing: tuple[float, float, float], pool_stride=(3, 3, 2), sincos_dim: int = 24):
        super().__init__()
        if condition not in CONDITIONS:
            raise ConfigError(f"unknown condition {condition!r}; known: {', '.join(CONDITIONS)}")
        if condition == "learned" and condition_encoder is None:
            raise ConfigError("condition 'learned' needs the condition encoder")
        self.descriptor, self.condition_kind = descriptor, condition
        self.condition_encoder = condition_encoder if condition == "learned" else None
        self.spacing, self.pool_stride, self.sincos_dim = tuple(spacing), tuple(pool_stride), sincos_dim

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
        (:func:`pooled_map`); the context condition sees the whole scan's coarse grid.
        ``y``: the descriptor's map when already computed (it is then returned as is)."""
        dev = next(self.descriptor.parameters()).device
        if y is None:
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


@dataclass
class AnomalyResult:
    """A map on the input's grid plus what produced it."""

    map: Volume
    preprocessed_map: np.ndarray
    method: str

    def save(self, path: str | Path) -> Path:
        from .data.io import write_nifti

        return write_nifti(self.map, path)


class Screener:
    """Frozen Screener pipeline (or its distilled student) producing anomaly maps.

    Args:
        score_window: ``(x (B,1,X,Y,Z), origin_mm (B,3)) -> (B,1,X,Y,Z)`` anomaly scores of windows.
        patch: window size (X, Y, Z) voxels (the training crop size).
        preprocess_params: how the input is preprocessed (the run's data stage).
        method: a name for reports (``learned-flow``, ``student``...).
    """

    def __init__(self, score_window: Callable, patch, preprocess_params, method: str,
                 device: str | torch.device = "auto", overlap: float = 0.5, sw_batch: int = 2):
        self.score_window, self.patch, self.params, self.method = score_window, tuple(patch), preprocess_params, method
        self.device, self.overlap, self.sw_batch = resolve_device(device), overlap, sw_batch
        # the frozen parts when built by from_parts (None for a student): for benchmarks and figures
        self.extractor: FeatureExtractor | None = None
        self.density: nn.Module | None = None
        self.mode = "window"
        #: ``(image (1, 1, X, Y, Z), body (X, Y, Z)) -> (X, Y, Z) scores`` of a whole scan (scan mode), else None
        self.score_scan: Callable | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_run(cls, run_dir: str | Path, density: str = "flow", condition: str = "learned", *,
                 student: bool = False, device: str = "auto", overlap: float = 0.5, sw_batch: int = 2,
                 mode: str | None = None) -> "Screener":
        """Rebuild a run's frozen pipeline; raises a clear error when a stage is missing.

        ``mode`` (:data:`INFERENCE_MODES`): None = ``scan`` for runs whose condition is the
        context condition, else the paper's ``window``."""
        from .data.cohort import read_index
        from .data.preprocess import PreprocessParams

        run_dir = Path(run_dir)
        if not student:
            check_method(condition, density)  # a misspelt name is reported before any file is read
        files.require_stage(run_dir, "data")
        params = PreprocessParams.from_dict(read_index(run_dir)["preprocess"])
        dev = resolve_device(device)
        if student:
            from .distill import load_student

            model, patch = load_student(run_dir, device=dev)

            def score(x, origin):
                return model(x).float()

            return cls(score, patch, params, "student", dev, overlap, sw_batch)
        from .density_fit import load_density

        from .ssl.context_task import is_context

        extractor, model, patch = load_density(run_dir, condition, density, device=dev)
        # every density method of a run with the context condition is scored the same way (a fair ablation)
        mode = mode or ("scan" if is_context(run_dir) else "window")
        return cls.from_parts(extractor, model, patch, params, method_name(condition, density),
                              device=dev, overlap=overlap, sw_batch=sw_batch, mode=mode)

    @classmethod
    def from_parts(cls, extractor: "FeatureExtractor", density: nn.Module, patch, preprocess_params,
                   method: str = "custom", **kwargs) -> "Screener":
        """A pipeline from its frozen parts (what ``from_run`` rebuilds from a run directory).

        The window score is: descriptor and condition of the window, average
        pooling, -log q(y | c) on the pooled grid, trilinear upsampling back to
        the window: (B, 1, X, Y, Z) nats.
        """
        from .models.density import upsample_scores

        dev = resolve_device(kwargs.pop("device", "auto"))
        extractor, density = extractor.to(dev).eval(), density.to(dev).eval()

        mode = kwargs.pop("mode", None) or ("scan" if extractor.context else "window")
        if mode not in INFERENCE_MODES:
            raise ConfigError(f"inference mode: expected one of {', '.join(INFERENCE_MODES)}, found {mode!r}")
        if mode == "window" and extractor.context:
            raise ConfigError("the context condition needs the whole scan: use mode='scan'")
        from .models.residual import ResidualDensity

        if isinstance(density, ResidualDensity) and mode != "scan":
            raise ConfigError("the residual density needs the whole scan: use mode='scan'")

        def score(x, origin):
            y, c = extractor(x, origin)
            nll = -density.log_prob(y, c)                   # (B, x, y, z) nats
            return upsample_scores(nll, tuple(x.shape[2:]))[:, None]

        screener = cls(score, patch, preprocess_params, method, device=dev, **kwargs)
        screener.extractor, screener.density, screener.mode = extractor, density, mode
        if mode == "scan":
            screener.score_scan = lambda x, body: scan_scores(extractor, {method: density}, x, screener.patch,
                                                              screener.overlap, screener.sw_batch, body=body)[method]
        return screener

    # ------------------------------------------------------------------ maps
    @torch.inference_mode()
    def score_preprocessed(self, image: np.ndarray, body: np.ndarray, spacing, *, progress: bool = False,
                           source: str = "volume") -> np.ndarray:
        """Anomaly map (X, Y, Z) float32 of a preprocessed image (in [0, 1]) on its own grid."""
        from monai.inferers import sliding_window_inference

        image = np.asarray(image, dtype=np.float32)
        if not image.flags.writeable:  # a memory-mapped case: torch wants its own buffer
            image = image.copy()
        if image.ndim != 3:
            raise InputError(source, "a 3D preprocessed image", f"shape {image.shape}")
        if not np.isfinite(image).all():
            raise InputError(source, "finite intensities", f"{int((~np.isfinite(image)).sum())} NaN/inf voxels")
        if not np.any(body):
            raise InputError(source, "a body (voxels above the air threshold)", "none: the volume is all air")
        small = [i for i in range(3) if image.shape[i] < self.patch[i]]
        if small:
            raise InputError(source, f"a volume at least as large as the window {self.patch} voxels (after "
                             f"preprocessing to {tuple(round(s, 2) for s in spacing)} mm)",
                             f"shape {image.shape} (too small along {', '.join('XYZ'[i] for i in small)})")
        spacing_t = torch.tensor(spacing, dtype=torch.float64)

        def predictor(win: torch.Tensor, slices: list) -> torch.Tensor:
            starts = torch.tensor([[s.start for s in sl[2:]] for sl in slices], dtype=torch.float64)
            with autocast(self.device):
                return self.score_window(win, starts * spacing_t).float()

        x = torch.from_numpy(image)[None, None]
        if self.score_scan is not None:
            with autocast(self.device):
                score = self.score_scan(x, body).float().cpu().numpy().astype(np.float32)
        else:
            out = sliding_window_inference(
                x, self.patch, self.sw_batch, predictor, overlap=self.overlap, mode="gaussian",
                sw_device=self.device, device=torch.device("cpu"), progress=progress, with_coord=True,
            )
            score = out[0, 0].numpy().astype(np.float32)
        body = np.asarray(body, dtype=bool)
        score[~body] = score[body].min()
        return score

    def anomaly_map(self, image: str | Path | Volume, *, progress: bool | None = None) -> AnomalyResult:
        """Anomaly map of a whole CT on the input's voxel grid (see class docstring)."""
        from .data.io import read_volume
        from .data.preprocess import preprocess, to_original_grid

        volume = image if isinstance(image, Volume) else read_volume(image)
        if not np.isfinite(volume.array).all():
            raise InputError(volume.source, "finite voxel values", f"{int((~np.isfinite(volume.array)).sum())} NaN/inf voxels")
        pre = preprocess(volume, self.params)
        if progress is None:
            from .runtime import headless

            progress = not headless()
        score = self.score_preprocessed(pre.image, pre.body, pre.spacing, progress=progress,
                                        source=str(volume.source))
        back = to_original_grid(score, pre.record, fill=float(score.min()), mode="linear")
        out = volume.with_array(back.astype(np.float32), method=self.method)
        return AnomalyResult(out, score, self.method)

    def __repr__(self) -> str:
        return f"Screener(method={self.method!r}, patch={self.patch}, device={self.device})"


@torch.inference_mode()
def naive_anomaly_map(extractor: FeatureExtractor, density: nn.Module, image: np.ndarray, spacing, patch,
                      overlap: float = 0.5, sw_batch: int = 2) -> np.ndarray:
    """The straightforward way, for the benchmark: stitch the full-resolution
    descriptor and condition maps of the whole volume with MONAI, then pool
    and apply the density. Memory grows with D + C channels of the whole CT.

    Windows run on the extractor's device (bf16 on CUDA, as in :class:`Screener`);
    the stitched maps live in CPU memory, as the windowed pipeline's map does.
    """
    from .models.density import pool_features, upsample_scores

    if extractor.context:
        raise ConfigError("naive_anomaly_map compares the paper's window modes; a run with the context "
                          "condition is scored scan by scan (Screener.score_preprocessed)")
    dev = next(extractor.parameters()).device
    x = torch.from_numpy(np.asarray(image, np.float32))[None, None]
    feats = [stitch_encoder(extractor.descriptor, x, patch, overlap, sw_batch)]
    if extractor.condition_kind == "learned":
        feats.append(stitch_encoder(extractor.condition_encoder, x, patch, overlap, sw_batch))
    y = pool_features(feats[0], extractor.pool_stride).to(dev)
    c = pool_features(feats[1], extractor.pool_stride).to(dev) if len(feats) > 1 else None
    if extractor.condition_kind == "sincos":
        c = extractor.sincos(torch.zeros(1, 3), tuple(y.shape[2:])).to(dev)
    nll = -density.log_prob(y, c).float().cpu()
    return upsample_scores(nll, tuple(x.shape[2:]))[0].numpy()


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
