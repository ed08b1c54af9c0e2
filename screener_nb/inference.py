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
# the feature layer (the bottom of the scoring stack); its names stay importable from here
from .features import (FeatureExtractor, body_cells, coarse_cells, pooled_map, scan_scores,  # noqa: F401
                       stitch_encoder)
from .methods import CONDITIONS, DENSITIES, Method, check_method, method_name  # noqa: F401 (the public vocabulary)
from .runtime import autocast, resolve_device

#: ``window``: the paper's -- the density inside each window, only the score map stitched;
#: ``scan``: pooled descriptor and condition of the whole scan, then the density once per cell
INFERENCE_MODES = ("window", "scan")


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
                 mode: str | None = None, backend: str = "torch") -> "Screener":
        """Rebuild a run's frozen pipeline; raises a clear error when a stage is missing.

        ``mode`` (:data:`INFERENCE_MODES`): None = ``scan`` for runs whose condition is the
        context condition, else the paper's ``window``. ``backend`` (the student only):
        ``torch`` (eager) or ``onnx`` (the exported student run by onnxruntime on the CPU,
        :mod:`screener_nb.deploy`)."""
        from .data.cohort import read_index
        from .data.preprocess import PreprocessParams

        run_dir = Path(run_dir)
        if not student:
            check_method(condition, density)  # a misspelt name is reported before any file is read
        files.require_stage(run_dir, "data")
        params = PreprocessParams.from_dict(read_index(run_dir)["preprocess"])
        dev = resolve_device(device)
        if backend not in ("torch", "onnx") or (backend == "onnx" and not student):
            raise ConfigError(f"backend: expected 'torch', or 'onnx' for the student, found {backend!r}"
                              + ("" if student else " (without student=True)"))
        if student and backend == "onnx":
            from .deploy import OnnxStudent

            model = OnnxStudent(run_dir)
            return cls(lambda x, origin: model(x).float(), model.patch, params, "student-onnx", "cpu", overlap,
                       sw_batch)
        if student:
            from .student import load_student

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
