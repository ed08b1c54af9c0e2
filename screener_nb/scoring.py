"""The one whole-volume scorer: sliding windows (or whole scans) in, one map per head out.

Every map of the project -- a :class:`~screener_nb.inference.Screener`'s, the distilled
student's, the evaluation stage's joint pass over all density methods of a run -- is computed
by :func:`score_volume`. What differs between them is only the *heads*
(:class:`Heads`): the functions that turn a window (or a whole scan) into one score channel
per method. The checks of the input, MONAI's Gaussian-blended sliding window, the window
origins in millimetres, autocast, and the fill outside the body live here once.

:class:`JointDensityScorer` builds the heads of several density methods of one run that share
a descriptor (and a condition encoder): each window is encoded once and every density scores
it, so six methods cost one encoder pass instead of six.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .errors import ConfigError, InputError
from .runtime import autocast


@dataclass(frozen=True)
class Heads:
    """What a scorer computes: one score channel per name.

    Attributes:
        names: the channels' names (methods), in order.
        window: ``(x (B, 1, X, Y, Z), origin_mm (B, 3) float64) -> (B, len(names), X, Y, Z)``
            scores of windows, stitched by MONAI (Gaussian blending); None for scan heads.
        scan: ``(x (1, 1, X, Y, Z), body (X, Y, Z) bool) -> {name: (X, Y, Z) tensor}`` scores of
            a whole scan at once (the context condition's mode); None for window heads.
    """

    names: tuple[str, ...]
    window: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    scan: Callable[[torch.Tensor, np.ndarray], Mapping[str, torch.Tensor]] | None = None

    def __post_init__(self) -> None:
        if (self.window is None) == (self.scan is None):
            raise ConfigError("Heads: expected exactly one of a window or a scan function")


def check_preprocessed(image: np.ndarray, body: np.ndarray, patch, spacing,
                       source: str = "volume") -> tuple[np.ndarray, np.ndarray]:
    """A preprocessed image (float32, writable) and its body mask (bool), or a clear
    :class:`~screener_nb.errors.InputError` naming ``source``: not 3D, body of another shape,
    NaN / inf voxels, no body, smaller than the window ``patch`` (voxels)."""
    image = np.asarray(image, dtype=np.float32)
    if not image.flags.writeable:  # a memory-mapped case: torch wants its own buffer
        image = image.copy()
    body = np.asarray(body, dtype=bool)
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
    return image, body


@torch.inference_mode()
def score_volume(heads: Heads, image: np.ndarray, body: np.ndarray, spacing, patch, *,
                 device: torch.device, overlap: float = 0.5, sw_batch: int = 2, progress: bool = False,
                 source: str = "volume") -> dict[str, np.ndarray]:
    """name -> (X, Y, Z) float32 map of a preprocessed image (in [0, 1]) on its own grid.

    Window heads run in MONAI sliding windows of ``patch`` voxels on ``device`` (the stitched
    maps live in CPU memory: only the heads' channels, never the features); scan heads see the
    whole scan. Outside the body every map is set to its minimum inside the body.
    ``spacing`` (mm per voxel) turns window starts into the origins the heads receive.
    """
    from monai.inferers import sliding_window_inference

    image, body = check_preprocessed(image, body, patch, spacing, source)
    x = torch.from_numpy(image)[None, None]
    if heads.scan is not None:
        with autocast(device):
            scored = heads.scan(x, body)
        maps = {n: scored[n].float().cpu().numpy().astype(np.float32) for n in heads.names}
    else:
        spacing_t = torch.tensor(tuple(float(s) for s in spacing), dtype=torch.float64)

        def predictor(win: torch.Tensor, slices: list) -> torch.Tensor:
            starts = torch.tensor([[s.start for s in sl[2:]] for sl in slices], dtype=torch.float64)
            with autocast(device):
                return heads.window(win, starts * spacing_t).float()

        out = sliding_window_inference(x, tuple(patch), sw_batch, predictor, overlap=overlap, mode="gaussian",
                                       sw_device=device, device=torch.device("cpu"), progress=progress,
                                       with_coord=True)
        maps = {n: out[0, i].numpy().astype(np.float32) for i, n in enumerate(heads.names)}
    for score in maps.values():
        score[~body] = score[body].min()
    return maps


def density_heads(extractor: Any, densities: Mapping[str, Any], *, extractors: Mapping[str, Any] | None = None,
                  scan: bool = False, patch=None, overlap: float = 0.5, sw_batch: int = 2) -> Heads:
    """The heads of density methods sharing one descriptor.

    Args:
        extractor: the shared :class:`~screener_nb.features.FeatureExtractor`; it runs once per
            window, and its condition encoder is every ``learned`` method's condition.
        densities: method -> density module (``-log_prob(y, c)`` on the pooled grid, nats).
        extractors: method -> that method's own extractor (which condition it reads; default
            ``extractor`` for all). A ``sincos`` method's code comes from its own extractor.
        scan: whole-scan heads (:func:`~screener_nb.features.scan_scores`, whose descriptor
            windows are ``patch`` voxels at ``overlap``) instead of window heads.
    """
    from .models.density import upsample_scores

    names = tuple(densities)
    extractors = dict(extractors or {m: extractor for m in names})
    if scan:
        from .features import scan_scores

        return Heads(names, scan=lambda x, body: scan_scores(extractor, dict(densities), x, patch, overlap, sw_batch,
                                                             extractors=extractors, body=body))

    def window(win: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
        y, c_shared = extractor(win, origin)
        out = []
        for m, density in densities.items():
            own = extractors[m]
            if own.condition_kind == "sincos":
                c = own.sincos(origin, tuple(y.shape[2:])).to(y.device, y.dtype)
            else:
                c = c_shared if own.condition_kind == "learned" else None
            out.append(upsample_scores(-density.log_prob(y, c), tuple(win.shape[2:])).float())
        return torch.stack(out, 1)

    return Heads(names, window=window)


class JointDensityScorer:
    """Several density methods of one run scored in ONE pass of :func:`score_volume`.

    Every density of a run sits on the same frozen descriptor (and the ``learned`` ones on the
    same condition encoder), so each window's descriptor (and learned condition) is computed
    once and every density scores it; MONAI stitches one channel per method. Each channel is
    that method's ``Screener.score_preprocessed`` map (tested against it).

    Args:
        screeners: method -> ``Screener`` built by ``Screener.from_run`` (they must share
            patch, pooling stride, spacing, device, overlap, sw_batch and mode).
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
                raise ConfigError(f"JointDensityScorer: {m} differs from {self.methods[0]} in patch / pooling / "
                                  f"spacing / device / window settings: {joint_key(s)} vs {joint_key(first)}")
        self.patch, self.device = first.patch, first.device
        self.overlap, self.sw_batch, self.mode = first.overlap, first.sw_batch, first.mode
        ext0 = first.extractor
        learned = next((s.extractor for s in screeners.values() if s.extractor.condition_kind == "learned"), None)
        # one descriptor (and one condition encoder) for all: the per-method copies are dropped
        self.base = learned or FeatureExtractor(ext0.descriptor, "none", None, ext0.spacing, ext0.pool_stride,
                                                descriptor_map=ext0.descriptor_map)
        self.extractors = {m: s.extractor for m, s in screeners.items()}
        self.densities = {m: s.density for m, s in screeners.items()}

    def heads(self, methods: Sequence[str] | None = None) -> Heads:
        """The :class:`Heads` of ``methods`` (default all)."""
        methods = list(methods or self.methods)
        return density_heads(self.base, {m: self.densities[m] for m in methods}, extractors=self.extractors,
                             scan=self.mode == "scan", patch=self.patch, overlap=self.overlap,
                             sw_batch=self.sw_batch)

    def score_all(self, image: np.ndarray, body: np.ndarray, spacing, methods: Sequence[str] | None = None,
                  *, source: str = "volume") -> dict[str, np.ndarray]:
        """method -> (X, Y, Z) float32 map of a preprocessed image (in [0, 1]) on its own grid."""
        return score_volume(self.heads(methods), image, body, spacing, self.patch, device=self.device,
                            overlap=self.overlap, sw_batch=self.sw_batch, source=source)


def joint_key(screener: Any) -> tuple:
    """What density methods must share to be scored in one pass."""
    e = screener.extractor
    return (tuple(screener.patch), tuple(e.pool_stride), tuple(float(v) for v in e.spacing), str(screener.device),
            float(screener.overlap), int(screener.sw_batch), screener.mode, e.descriptor_map)
