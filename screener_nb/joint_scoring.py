"""Several density methods of one run scored in one pass (the evaluation stage's scorer).

:class:`JointDensityScorer`: the shared descriptor and condition encoders run once per window
(window mode) or once per scan (scan mode) for every density method sharing them; the maps are
bit-identical to each method's ``Screener.score_preprocessed``.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .errors import ConfigError, InputError

class JointDensityScorer:
    """Several density methods of one run scored in ONE sliding-window pass.

    Why not ``Screener.score_preprocessed`` per method: every density of a run
    sits on the same frozen descriptor (and the ``learned`` ones on the same
    condition encoder), so six methods would run the descriptor six times on
    the same windows. Here each window's descriptor (and learned condition) is
    computed once, every density scores it, and MONAI stitches one channel per
    method. Each channel is that method's ``score_preprocessed`` map: same
    windows, Gaussian blending (linear, per channel), autocast and
    outside-the-body fill (tested against it).

    Args:
        screeners: method -> ``Screener`` built by ``Screener.from_run`` (they must
            share patch, pooling stride, spacing, device, overlap and sw_batch).
    """

    def __init__(self, screeners: Mapping[str, Any]):
        from .features import FeatureExtractor

        if not screeners:
            raise ConfigError("JointDensityScorer: expected at least one density method")
        self.methods = list(screeners)
        first = next(iter(screeners.values()))
        for m, s in screeners.items():
            if s.extractor is None or s.density is None:
                raise ConfigError(f"JointDensityScorer: {m} is not a density method (no extractor/density)")
            if joint_key(s) != joint_key(first):
                raise ConfigError(f"JointDensityScorer: {m} differs from {self.methods[0]} in "
                                  f"patch / pooling / spacing / device / window settings: {joint_key(s)} vs {joint_key(first)}")
        self.patch, self.device = first.patch, first.device
        self.overlap, self.sw_batch = first.overlap, first.sw_batch
        ext0 = first.extractor
        learned = next((s.extractor for s in screeners.values() if s.extractor.condition_kind == "learned"), None)
        # one descriptor (and one condition encoder) for all: the per-method copies are dropped
        self.base = learned or FeatureExtractor(ext0.descriptor, "none", None, ext0.spacing, ext0.pool_stride)
        self.kinds = {m: s.extractor.condition_kind for m, s in screeners.items()}
        self.sincos = {m: FeatureExtractor(self.base.descriptor, "sincos", None, s.extractor.spacing,
                                           s.extractor.pool_stride, s.extractor.sincos_dim)
                       for m, s in screeners.items() if self.kinds[m] == "sincos"}
        self.densities = {m: s.density for m, s in screeners.items()}
        self.mode = first.mode
        self.extractors = {m: s.extractor for m, s in screeners.items()}

    def score_all(self, image: np.ndarray, body: np.ndarray, spacing, methods: Sequence[str] | None = None,
                  *, source: str = "volume") -> dict[str, np.ndarray]:
        """method -> (X, Y, Z) float32 map of a preprocessed image (in [0, 1]) on its own grid."""
        import torch
        from monai.inferers import sliding_window_inference

        from .models.density import upsample_scores
        from .runtime import autocast

        methods = list(methods or self.methods)
        image = np.asarray(image, dtype=np.float32)
        if not image.flags.writeable:  # a memory-mapped case: torch wants a writable buffer
            image = image.copy()
        body = np.asarray(body, dtype=bool)
        _check_image(image, body, self.patch, spacing, source)
        spacing_t = torch.tensor(tuple(spacing), dtype=torch.float64)
        if self.mode == "scan":
            from .features import scan_scores

            x = torch.from_numpy(image)[None, None]
            with autocast(self.device):
                scored = scan_scores(self.base, {m: self.densities[m] for m in methods}, x, self.patch,
                                     self.overlap, self.sw_batch, extractors=self.extractors, body=body)
            maps = {}
            for m in methods:
                score = scored[m].numpy().astype(np.float32)
                score[~body] = score[body].min()
                maps[m] = score
            return maps

        def predictor(win, slices):
            starts = torch.tensor([[sl.start for sl in ss[2:]] for ss in slices], dtype=torch.float64)
            origin = starts * spacing_t
            with autocast(self.device):
                y, c_learned = self.base(win, origin)
                out = []
                for m in methods:
                    kind = self.kinds[m]
                    c = (c_learned if kind == "learned" else None if kind == "none"
                         else self.sincos[m].sincos(origin, tuple(y.shape[2:])).to(y.device, y.dtype))
                    nll = -self.densities[m].log_prob(y, c)
                    out.append(upsample_scores(nll, tuple(win.shape[2:])).float())
                return torch.stack(out, 1)

        with torch.inference_mode():
            out = sliding_window_inference(
                torch.from_numpy(image)[None, None], self.patch, self.sw_batch, predictor, overlap=self.overlap,
                mode="gaussian", sw_device=self.device, device=torch.device("cpu"), progress=False, with_coord=True)
        maps = {}
        for i, m in enumerate(methods):
            score = out[0, i].numpy().astype(np.float32)
            score[~body] = score[body].min()
            maps[m] = score
        return maps


def joint_key(screener: Any) -> tuple:
    """What density methods must share to be scored in one pass."""
    e = screener.extractor
    return (tuple(screener.patch), tuple(e.pool_stride), tuple(float(v) for v in e.spacing), str(screener.device),
            float(screener.overlap), int(screener.sw_batch), screener.mode)


def _check_image(image: np.ndarray, body: np.ndarray, patch, spacing, source: str) -> None:
    """The refusals of ``Screener.score_preprocessed``, for the joint pass."""
    if image.ndim != 3:
        raise InputError(source, "a 3D preprocessed image", f"shape {image.shape}")
    if body.shape != image.shape:
        raise InputError(source, f"a body mask of the image's shape {image.shape}", f"shape {body.shape}")
    if not np.isfinite(image).all():
        raise InputError(source, "finite intensities", f"{int((~np.isfinite(image)).sum())} NaN/inf voxels")
    if not body.any():
        raise InputError(source, "a body (voxels above the air threshold)", "none: the volume is all air")
    small = [i for i in range(3) if image.shape[i] < patch[i]]
    if small:
        raise InputError(source, f"a volume at least as large as the window {tuple(patch)} voxels (after "
                         f"preprocessing to {tuple(round(float(s), 2) for s in spacing)} mm)",
                         f"shape {image.shape} (too small along {', '.join('XYZ'[i] for i in small)})")
