"""Whole-volume anomaly maps: the :class:`Screener` object users call.

``Screener.from_run("runs/demo", "learned-flow")`` rebuilds the frozen pipeline of a run; ``anomaly_map(image)`` takes a path
(NIfTI / NRRD / DICOM folder) or a :class:`~screener_nb.data.volume.Volume`
and returns a float32 map on the INPUT's grid (preprocessing inverted),
higher = more anomalous, outside the body set to the map's minimum.

The map itself is computed by the project's one scorer,
:func:`screener_nb.scoring.score_volume`. Memory: MONAI's ``sliding_window_inference``
stitches only what the window function returns, the one-channel score of each window --
descriptor, condition, pooling, -log q and trilinear upsampling all happen inside the
window. Peak memory therefore does not grow with the descriptor dimension (compare the
benchmark's naive map, :func:`screener_nb.benchmarks.inference.naive_anomaly_map`, which
stitches the full descriptor and condition maps first).
"""
from __future__ import annotations

import warnings
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
from .runtime import resolve_device
from .scoring import Heads, density_heads, score_volume

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

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_run(cls, run_dir: str | Path, method: str | Method = "learned-flow", *legacy: str,
                 student: bool = False, device: str = "auto", overlap: float = 0.5, sw_batch: int = 2,
                 mode: str | None = None, backend: str = "torch", density: str | None = None,
                 condition: str | None = None) -> "Screener":
        """Rebuild a run's frozen pipeline; raises a clear error when a stage is missing.

        ``method``: ``"<condition>-<density>"`` (:class:`~screener_nb.methods.Method`), ignored
        with ``student=True``. The older ``from_run(run, density, condition)`` (positional, or
        ``density=`` / ``condition=`` keywords) still works and warns (DeprecationWarning).
        ``mode`` (:data:`INFERENCE_MODES`): None = ``scan`` for runs whose condition is the
        context condition, else the paper's ``window``. ``backend`` (the student only):
        ``torch`` (eager) or ``onnx`` (the exported student run by onnxruntime on the CPU,
        :mod:`screener_nb.deploy`)."""
        from .data.cohort import read_index
        from .data.preprocess import PreprocessParams

        run_dir = Path(run_dir)
        if not student:  # a misspelt name is reported before any file is read
            method = _method_argument(method, legacy, density, condition)
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

        extractor, model, patch = load_density(run_dir, method.condition, method.density, device=dev)
        # every density method of a run with the context condition is scored the same way (a fair ablation)
        mode = mode or ("scan" if is_context(run_dir) else "window")
        return cls.from_parts(extractor, model, patch, params, str(method),
                              device=dev, overlap=overlap, sw_batch=sw_batch, mode=mode)

    @classmethod
    def from_parts(cls, extractor: "FeatureExtractor", density: nn.Module, patch, preprocess_params,
                   method: str = "custom", **kwargs) -> "Screener":
        """A pipeline from its frozen parts (what ``from_run`` rebuilds from a run directory).

        The window score is: descriptor and condition of the window, average
        pooling, -log q(y | c) on the pooled grid, trilinear upsampling back to
        the window: (B, 1, X, Y, Z) nats.
        """
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

        window = density_heads(extractor, {method: density}).window  # (B, 1, X, Y, Z) nats
        screener = cls(window, patch, preprocess_params, method, device=dev, **kwargs)
        screener.extractor, screener.density, screener.mode = extractor, density, mode
        return screener

    def heads(self) -> Heads:
        """What :func:`~screener_nb.scoring.score_volume` computes for this pipeline: its window
        function, or (scan mode) the whole-scan scores of its density."""
        if self.mode == "scan":
            return density_heads(self.extractor, {self.method: self.density}, scan=True, patch=self.patch,
                                 overlap=self.overlap, sw_batch=self.sw_batch)
        return Heads((self.method,), window=self.score_window)

    # ------------------------------------------------------------------ maps
    def score_preprocessed(self, image: np.ndarray, body: np.ndarray, spacing, *, progress: bool = False,
                           source: str = "volume") -> np.ndarray:
        """Anomaly map (X, Y, Z) float32 of a preprocessed image (in [0, 1]) on its own grid
        (:func:`~screener_nb.scoring.score_volume`; ``body`` (X, Y, Z) bool)."""
        maps = score_volume(self.heads(), image, body, spacing, self.patch, device=self.device,
                            overlap=self.overlap, sw_batch=self.sw_batch, progress=progress, source=source)
        return maps[self.method]

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


def _method_argument(method: str | Method, legacy: tuple, density: str | None, condition: str | None) -> Method:
    """The method of ``Screener.from_run``'s arguments; the older (density, condition) order warns."""
    old_positional = isinstance(method, str) and method in DENSITIES
    if not (old_positional or density or condition):
        if legacy:
            raise ConfigError(f"Screener.from_run: expected one method name such as 'learned-flow', found "
                              f"{(method, *legacy)!r}")
        return method if isinstance(method, Method) else Method.parse(method)
    if old_positional:
        density = method
    condition = condition or (legacy[0] if legacy else "learned")
    density = density or "flow"
    warnings.warn(f"Screener.from_run(run, density, condition) is deprecated: pass the method name, "
                  f"Screener.from_run(run, '{condition}-{density}')", DeprecationWarning, stacklevel=3)
    return Method(condition, density)
