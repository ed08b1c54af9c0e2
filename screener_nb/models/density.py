"""Density models q(y | c) of pooled descriptor maps, and the pooling around them.

Every model scores each position of a grid independently:
``log_prob(y (B, D, x, y, z), c (B, C, x, y, z) | None) -> (B, x, y, z)``, the
log-density in nats of the D-dimensional descriptor at that position (summed
over the D channels), given the condition there (docs/method.md, "Density models").
The anomaly score of a position is ``-log_prob``.

Models (:func:`build_density`, kinds :data:`DENSITY_KINDS`):

``unconditional_gaussian``
    learned mean and diagonal log-variance, the same at every position.
``gaussian``
    conditional diagonal Gaussian: two conv heads map the condition map to the
    mean and to the log-variance. Each head is a 3x3x3 conv (padding 1) to
    ``hidden`` channels, a leaky ReLU, and a 1x1x1 conv to D channels (the
    paper only says "3x3x3 conv heads"; the small hidden layer is our choice,
    ``hidden=0`` gives a single linear 3x3x3 conv). The last convs start at
    zero, so the model starts as N(0, I). NLL = 0.5 sum_j[(y_j - mu_j)^2 / s_j^2
    + log s_j^2 + log 2 pi].
``flow``
    conditional normalizing flow, Glow-style, applied to each position's
    D-vector with that position's condition (a 1x1x1 conv is a linear map of
    the channel vector, so the whole flow is a per-position map). ``depth``
    blocks of

    1. ActNorm ``x * exp(s) + b`` whose (b, s) are predicted from c by a
       1x1x1 conv (learned vectors when there is no condition), zero-initialised
       so each block starts as the identity;
    2. an invertible 1x1x1 conv ``W x``, orthogonal initialisation, log|det W|
       by ``slogdet`` in float64;
    3. an affine coupling: one half x1 of the channels (the halves alternate
       from block to block) and c go through a 3-layer 1x1x1 net of width
       ``hidden`` (last layer zero-initialised) giving t and
       s = sigmoid(logit + 2); the other half becomes x2 <- (x2 + t) * s.

    Base N(0, I): NLL = 0.5 ||z||^2 + (D/2) log 2 pi - sum log-dets.
    With ``cond_dim == 0`` the same flow is unconditional.

Why zuko, and what is hand-written. The flow is assembled from zuko
(a maintained normalizing-flow library): :class:`zuko.lazy.Flow` (a lazy
distribution q(y | c) with the N(0, I) base, exact ``log_prob``, composition
of the log-dets, inverse and sampling), :class:`zuko.flows.GeneralCouplingTransform`
(the coupling split/merge and its 3-layer :class:`zuko.nn.MLP` conditioned on
c). Positions are flattened to rows: zuko works on (N, D) vectors with an
(N, C) context, which is exactly a per-position flow. zuko has no
condition-predicted ActNorm, no Glow 1x1 conv with float64 log-det, and its
affine coupling uses ``exp`` of a soft-clipped scale rather than Glow's
``sigmoid(logit + 2)``, so these three small pieces are written here as zuko
transforms (:class:`ConditionalActNorm`, :class:`InvertibleLinear`,
:class:`SigmoidAffineTransform`). The conditional Gaussian keeps real 3x3x3
convolutions over the grid, which a per-row library cannot express, so it is
plain torch.

Precision under mixed precision (bf16 autocast on CUDA): the Gaussians run
entirely in float32 (autocast disabled). In the flow, only the small nets that
predict the per-position parameters (ActNorm and coupling nets) follow the
ambient autocast; the data path, every log-det and the base density are
computed in float32 (float64 for ``slogdet``), so ``log_prob`` is the exact
log-density of the bijection actually applied. Models compute in the dtype of
their parameters (call ``.double()`` for float64).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
import zuko
from torch import nn
from torch.distributions import Transform, constraints
from zuko.flows import GeneralCouplingTransform
from zuko.lazy import Flow, LazyTransform, UnconditionalDistribution
from zuko.transforms import DependentTransform

from ..errors import ConfigError, InputError

DENSITY_KINDS = ("unconditional_gaussian", "gaussian", "flow")
LOG_2PI = math.log(2 * math.pi)


# ---------------------------------------------------------------------------- grids
def pool_features(feat: torch.Tensor, stride=(3, 3, 2)) -> torch.Tensor:
    """Average-pool feature maps: (B, C, X, Y, Z) -> (B, C, X // sx, Y // sy, Z // sz).

    Kernel = stride, so each grid cell is the mean of a disjoint block of voxels
    (the paper pools 96 x 96 x 64 crops to 32 x 32 x 32 with stride (3, 3, 2)).
    """
    stride = tuple(int(s) for s in stride)
    if feat.ndim != 5:
        raise InputError("pool_features", "feature maps (B, C, X, Y, Z)", f"shape {tuple(feat.shape)}")
    if len(stride) != 3 or min(stride) < 1 or any(n < s for n, s in zip(feat.shape[2:], stride)):
        raise InputError("pool_features", f"3 strides >= 1 no larger than the map {tuple(feat.shape[2:])}",
                         f"stride {stride}")
    return F.avg_pool3d(feat, kernel_size=stride, stride=stride)


def upsample_scores(scores: torch.Tensor, size) -> torch.Tensor:
    """Trilinear upsampling of score grids: (B, x, y, z) -> (B, X, Y, Z) (align_corners=False)."""
    if scores.ndim != 4:
        raise InputError("upsample_scores", "score grids (B, x, y, z)", f"shape {tuple(scores.shape)}")
    size = tuple(int(s) for s in size)
    if len(size) != 3:
        raise InputError("upsample_scores", "a target size (X, Y, Z)", f"{size}")
    return F.interpolate(scores[:, None], size=size, mode="trilinear", align_corners=False)[:, 0]


def upsample_cells(scores: torch.Tensor, shape, stride=(3, 3, 2)) -> torch.Tensor:
    """Cell scores of a whole scan (B, x, y, z) -> voxels (B, X, Y, Z).

    The cells of :func:`pool_features` cover the first ``x * sx`` voxels of each axis
    (floor), so the grid is upsampled (trilinear) onto those voxels and the few
    voxels past the last full cell repeat its edge."""
    if scores.ndim != 4:
        raise InputError("upsample_cells", "score grids (B, x, y, z)", f"shape {tuple(scores.shape)}")
    shape = tuple(int(n) for n in shape)
    if any(n // s != g for n, s, g in zip(shape, stride, scores.shape[1:])):
        raise InputError("upsample_cells", f"the cell grid of a {shape} scan pooled by {tuple(stride)}",
                         f"grid {tuple(scores.shape[1:])}")
    covered = [g * s for g, s in zip(scores.shape[1:], stride)]
    up = F.interpolate(scores[:, None], size=covered, mode="trilinear", align_corners=False)
    pad = []
    for n, c in reversed(list(zip(shape, covered))):
        pad += [0, n - c]
    return F.pad(up, pad, mode="replicate")[:, 0]


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, C, x, y, z) -> (B * x * y * z, C): one row per grid position."""
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def _grid(rows: torch.Tensor, batch_grid: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`_rows` for (N, C) rows, or (N,) -> (B, x, y, z)."""
    if rows.ndim == 1:
        return rows.reshape(batch_grid)
    return rows.reshape(*batch_grid, rows.shape[-1]).movedim(-1, 1)


def _no_autocast(t: torch.Tensor):
    return torch.autocast(device_type=t.device.type, enabled=False)


# ---------------------------------------------------------------------------- base class
class DensityModel(nn.Module):
    """Common checks and API of the density models (see the module docstring)."""

    kind = "?"

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.dim, self.cond_dim = int(dim), int(cond_dim)
        self.config: dict[str, Any] = {"kind": self.kind, "dim": self.dim, "cond_dim": self.cond_dim}

    @property
    def where(self) -> str:
        return f"{self.kind} density (dim {self.dim}, cond_dim {self.cond_dim})"

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def check(self, y: torch.Tensor, c: torch.Tensor | None, name: str = "y") -> None:
        """Raise :class:`InputError` unless y (B, D, x, y, z) and c fit this model."""
        if not isinstance(y, torch.Tensor) or y.ndim != 5 or y.shape[1] != self.dim:
            found = f"shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise InputError(self.where, f"{name} of shape (B, {self.dim}, x, y, z)", found)
        if self.cond_dim == 0:
            if c is not None:
                raise InputError(self.where, "no condition (this model is unconditional)",
                                 f"a condition of shape {tuple(c.shape)}")
            return
        expected = f"a condition of shape {(y.shape[0], self.cond_dim, *y.shape[2:])} (B, C, grid of {name})"
        if c is None:
            raise InputError(self.where, expected, "None (no condition given)")
        if c.ndim != 5:
            raise InputError(self.where, expected, f"shape {tuple(c.shape)} ({c.ndim} dimensions)")
        if c.shape[1] != self.cond_dim:
            raise InputError(self.where, expected, f"shape {tuple(c.shape)} ({c.shape[1]} channels)")
        if c.shape[0] != y.shape[0] or c.shape[2:] != y.shape[2:]:
            raise InputError(self.where, expected, f"shape {tuple(c.shape)} for {name} of shape {tuple(y.shape)} "
                                                   "(batch or grid mismatch)")

    def _sample_shape(self, c: torch.Tensor | None, shape) -> tuple[int, ...]:
        if c is not None:
            self.check(torch.empty(c.shape[0], self.dim, *c.shape[2:], device="meta"), c)
            return (c.shape[0], *c.shape[2:])
        if self.cond_dim:
            raise InputError(self.where, f"a condition (B, {self.cond_dim}, x, y, z) to sample from",
                             "None (no condition given)")
        if shape is None or len(tuple(shape)) != 4:
            raise InputError(self.where, "shape=(B, x, y, z) to sample an unconditional model", f"{shape}")
        return tuple(int(s) for s in shape)

    def log_prob(self, y: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, c: torch.Tensor | None = None, generator: torch.Generator | None = None,
               shape=None) -> torch.Tensor:
        """Draw y (B, D, x, y, z) ~ q(. | c); ``shape`` (B, x, y, z) is needed only without a condition."""
        batch_grid = self._sample_shape(c, shape)
        device = c.device if c is not None else next(self.parameters()).device
        z = torch.randn((batch_grid[0], self.dim, *batch_grid[1:]), generator=generator, device=device,
                        dtype=self.dtype)
        return self.inverse(z, c)

    def inverse(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


# ---------------------------------------------------------------------------- Gaussians
class _GaussianBase(DensityModel):
    """Diagonal Gaussians; subclasses give ``params(c, like) -> (mean, log_var)`` of shape like y."""

    def params(self, c: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def log_prob(self, y: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """log q(y | c) in nats, (B, x, y, z), computed in float32 (or float64) even under autocast."""
        self.check(y, c)
        with _no_autocast(y):
            y = y.to(self.dtype)
            mean, log_var = self.params(c, y)
            return -0.5 * ((y - mean).square() * torch.exp(-log_var) + log_var + LOG_2PI).sum(1)

    def forward(self, y: torch.Tensor, c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardise: z = (y - mean) / std, and log|dz/dy| (B, x, y, z)."""
        self.check(y, c)
        with _no_autocast(y):
            y = y.to(self.dtype)
            mean, log_var = self.params(c, y)
            return (y - mean) * torch.exp(-0.5 * log_var), -0.5 * log_var.sum(1)

    def inverse(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        self.check(z, c, name="z")
        with _no_autocast(z):
            z = z.to(self.dtype)
            mean, log_var = self.params(c, z)
            return mean + z * torch.exp(0.5 * log_var)


class UnconditionalGaussian(_GaussianBase):
    """N(mean, diag(exp(log_var))), the same at every grid position."""

    kind = "unconditional_gaussian"

    def __init__(self, dim: int, cond_dim: int = 0):
        if cond_dim != 0:
            raise ConfigError(f"density 'unconditional_gaussian' takes no condition, found cond_dim={cond_dim}; "
                              "use kind 'gaussian' for a conditional one")
        super().__init__(dim, 0)
        self.mean = nn.Parameter(torch.zeros(dim))
        self.log_var = nn.Parameter(torch.zeros(dim))

    def params(self, c, like):
        shape = (1, self.dim, 1, 1, 1)
        return self.mean.view(shape).expand_as(like), self.log_var.view(shape).expand_as(like)


class ConditionalGaussian(_GaussianBase):
    """N(mean(c), diag(exp(log_var(c)))) with conv heads over the condition map."""

    kind = "gaussian"

    def __init__(self, dim: int, cond_dim: int, hidden: int = 64, kernel_size: int = 3):
        if cond_dim < 1:
            raise ConfigError(f"density 'gaussian' needs a condition (cond_dim >= 1), found cond_dim={cond_dim}; "
                              "use kind 'unconditional_gaussian' without one")
        if kernel_size < 1 or kernel_size % 2 == 0 or hidden < 0:
            raise ConfigError(f"density 'gaussian': expected an odd kernel_size and hidden >= 0, "
                              f"found kernel_size={kernel_size}, hidden={hidden}")
        super().__init__(dim, cond_dim)
        self.config.update(hidden=int(hidden), kernel_size=int(kernel_size))
        self.mean_head = self._head(cond_dim, dim, hidden, kernel_size)
        self.log_var_head = self._head(cond_dim, dim, hidden, kernel_size)

    @staticmethod
    def _head(cin: int, cout: int, hidden: int, k: int) -> nn.Sequential:
        if hidden:
            layers = [nn.Conv3d(cin, hidden, k, padding=k // 2), nn.LeakyReLU(0.01), nn.Conv3d(hidden, cout, 1)]
        else:
            layers = [nn.Conv3d(cin, cout, k, padding=k // 2)]
        nn.init.zeros_(layers[-1].weight)  # start at N(0, I)
        nn.init.zeros_(layers[-1].bias)
        return nn.Sequential(*layers)

    def params(self, c, like):
        c = c.to(self.dtype)
        return self.mean_head(c), self.log_var_head(c)


# ---------------------------------------------------------------------------- flow pieces (zuko transforms)
class AffineTransform(Transform):
    """Elementwise ``x * exp(log_scale) + shift`` (the ActNorm map); computed in x's dtype."""

    domain = constraints.real
    codomain = constraints.real
    bijective = True

    def __init__(self, shift: torch.Tensor, log_scale: torch.Tensor, **kwargs):
        super().__init__(**kwargs)
        self.shift, self.log_scale = shift, log_scale

    def _call(self, x):
        return x * torch.exp(self.log_scale.to(x.dtype)) + self.shift.to(x.dtype)

    def _inverse(self, y):
        return (y - self.shift.to(y.dtype)) * torch.exp(-self.log_scale.to(y.dtype))

    def log_abs_det_jacobian(self, x, y):
        return self.log_scale.to(x.dtype).expand(x.shape)


class SigmoidAffineTransform(Transform):
    """Glow's coupling map ``(x + shift) * sigmoid(logit + offset)`` (elementwise).

    The scale lies in (0, 1) and starts near sigmoid(2) = 0.88 when the net's
    last layer is zero, which keeps deep flows stable.
    """

    domain = constraints.real
    codomain = constraints.real
    bijective = True

    def __init__(self, shift: torch.Tensor, logit: torch.Tensor, offset: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.shift, self.logit, self.offset = shift, logit, offset

    def _call(self, x):
        return (x + self.shift.to(x.dtype)) * torch.sigmoid(self.logit.to(x.dtype) + self.offset)

    def _inverse(self, y):
        return y / torch.sigmoid(self.logit.to(y.dtype) + self.offset) - self.shift.to(y.dtype)

    def log_abs_det_jacobian(self, x, y):
        return F.logsigmoid(self.logit.to(x.dtype) + self.offset).expand(x.shape)


class LinearTransform(Transform):
    """``x -> W x`` on (N, D) rows (the invertible 1x1x1 conv), never under autocast.

    log|det W| comes from ``slogdet`` in float64.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, weight: torch.Tensor, **kwargs):
        super().__init__(**kwargs)
        self.weight = weight

    def _call(self, x):
        with _no_autocast(x):
            return x @ self.weight.to(x.dtype).T

    def _inverse(self, y):
        with _no_autocast(y):
            return y @ torch.linalg.inv(self.weight.double()).to(y.dtype).T

    def log_abs_det_jacobian(self, x, y):
        with _no_autocast(x):
            logdet = torch.linalg.slogdet(self.weight.double()).logabsdet
        return logdet.to(x.dtype).expand(x.shape[:-1])


class ConditionalActNorm(LazyTransform):
    """ActNorm whose shift and log-scale are predicted from c by a 1x1x1 conv (zero-initialised).

    Without a condition (``context == 0``) they are learned vectors, also starting at zero.
    """

    def __init__(self, features: int, context: int = 0):
        super().__init__()
        self.features, self.context = features, context
        if context:
            self.net = nn.Linear(context, 2 * features)
            nn.init.zeros_(self.net.weight)
            nn.init.zeros_(self.net.bias)
        else:
            self.shift = nn.Parameter(torch.zeros(features))
            self.log_scale = nn.Parameter(torch.zeros(features))

    def forward(self, c: torch.Tensor | None = None) -> Transform:
        if self.context:
            shift, log_scale = self.net(c).chunk(2, dim=-1)
        else:
            shift, log_scale = self.shift, self.log_scale
        return DependentTransform(AffineTransform(shift, log_scale), 1)


class InvertibleLinear(LazyTransform):
    """Glow's invertible 1x1x1 conv: a learned D x D matrix, orthogonal at initialisation."""

    def __init__(self, features: int):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(features, features, dtype=torch.float64))
        self.weight = nn.Parameter(q.float())

    def forward(self, c: torch.Tensor | None = None) -> Transform:
        return LinearTransform(self.weight)


class ConditionalFlow(DensityModel):
    """Glow-style conditional normalizing flow per grid position (module docstring).

    Args:
        dim: descriptor channels D (>= 2: the coupling splits them in halves).
        cond_dim: condition channels C (0: unconditional flow).
        depth: number of blocks (the authors use many, up to 64).
        hidden: width of the coupling nets (512 in the paper).
        scale_offset: the ``+ 2`` of s = sigmoid(logit + 2).
    """

    kind = "flow"

    def __init__(self, dim: int, cond_dim: int = 0, depth: int = 32, hidden: int = 512, scale_offset: float = 2.0):
        if dim < 2:
            raise ConfigError(f"density 'flow' needs dim >= 2 (its coupling splits the channels), found dim={dim}")
        if depth < 1 or hidden < 1 or cond_dim < 0:
            raise ConfigError(f"density 'flow': expected depth >= 1, hidden >= 1, cond_dim >= 0, found "
                              f"depth={depth}, hidden={hidden}, cond_dim={cond_dim}")
        super().__init__(dim, cond_dim)
        self.config.update(depth=int(depth), hidden=int(hidden), scale_offset=float(scale_offset))
        first_half = torch.arange(dim) < dim // 2
        blocks: list[LazyTransform] = []
        for i in range(depth):
            coupling = GeneralCouplingTransform(
                features=dim, context=cond_dim,
                mask=first_half if i % 2 == 0 else ~first_half,  # True = the half that conditions
                univariate=partial(SigmoidAffineTransform, offset=float(scale_offset)),
                shapes=((), ()), hidden_features=(hidden, hidden),
            )
            nn.init.zeros_(coupling.hyper[-1].weight)  # last layer zero: t = 0, s = sigmoid(2)
            nn.init.zeros_(coupling.hyper[-1].bias)
            blocks += [ConditionalActNorm(dim, cond_dim), InvertibleLinear(dim), coupling]
        base = UnconditionalDistribution(zuko.distributions.DiagNormal, torch.zeros(dim), torch.ones(dim),
                                         buffer=True)
        self.flow = Flow(blocks, base)

    def _rows(self, y: torch.Tensor, c: torch.Tensor | None, name: str = "y"):
        self.check(y, c, name)
        batch_grid = (y.shape[0], *y.shape[2:])
        return _rows(y.to(self.dtype)), (None if c is None else _rows(c.to(self.dtype))), batch_grid

    def log_prob(self, y: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """log q(y | c) in nats, (B, x, y, z)."""
        y_rows, c_rows, batch_grid = self._rows(y, c)
        return _grid(self.flow(c_rows).log_prob(y_rows), batch_grid)

    def forward(self, y: torch.Tensor, c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """y -> (z (B, D, x, y, z), sum of log|det dz/dy| (B, x, y, z))."""
        y_rows, c_rows, batch_grid = self._rows(y, c)
        z, ladj = self.flow.transform(c_rows).call_and_ladj(y_rows)
        return _grid(z, batch_grid), _grid(ladj, batch_grid)

    def inverse(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """z -> y, the inverse of :meth:`forward`."""
        z_rows, c_rows, batch_grid = self._rows(z, c, name="z")
        return _grid(self.flow.transform(c_rows).inv(z_rows), batch_grid)


# ---------------------------------------------------------------------------- factory
_KINDS: dict[str, tuple[type, tuple[str, ...]]] = {
    "unconditional_gaussian": (UnconditionalGaussian, ()),
    "gaussian": (ConditionalGaussian, ("hidden", "kernel_size")),
    "flow": (ConditionalFlow, ("depth", "hidden", "scale_offset")),
}


def build_density(kind: str, dim: int, cond_dim: int = 0, **kw: Any) -> DensityModel:
    """A density model by name (:data:`DENSITY_KINDS`), e.g. ``build_density("flow", 32, 32, depth=8, hidden=128)``.

    Keyword options: ``gaussian``: hidden (64), kernel_size (3); ``flow``: depth (32),
    hidden (512), scale_offset (2.0). The model's ``.config`` (JSON-serialisable)
    records kind, dim, cond_dim and these options.
    """
    if kind not in _KINDS:
        raise ConfigError(f"unknown density kind {kind!r}; known kinds: {', '.join(DENSITY_KINDS)}")
    cls, options = _KINDS[kind]
    unknown = sorted(set(kw) - set(options))
    if unknown:
        raise ConfigError(f"density {kind!r}: unknown option(s) {', '.join(unknown)}; "
                          f"known: {', '.join(options) or 'none'}")
    if not isinstance(dim, int) or dim < 1 or not isinstance(cond_dim, int) or cond_dim < 0:
        raise ConfigError(f"density {kind!r}: expected integers dim >= 1 and cond_dim >= 0, "
                          f"found dim={dim!r}, cond_dim={cond_dim!r}")
    return cls(dim, cond_dim, **kw)
