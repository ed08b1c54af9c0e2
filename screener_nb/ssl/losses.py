"""Dense SSL losses on gathered voxel embeddings: VICReg (default) and InfoNCE.

Both losses see ``(M, d)`` features of the M valid voxel pairs of a batch
(rows k of the two views are the same physical voxel; see
:func:`screener_nb.ssl.pairs.gather_pairs`), pass them through a small MLP
head (VICReg: the *expander*, 32 -> 8192 -> 8192 -> 8192; InfoNCE: the
*projector* to 128) and compare the two views.

VICReg (Bardes et al. 2022; docs/method.md): ``loss = 25 * inv + 25 * var + 1 * cov``

* inv: mean squared error between paired embeddings (``F.mse_loss``, mean over M x D);
* var: per view, mean over dimensions of ``relu(1 - sqrt(var_j + 1e-4))``
  (unbiased variance over the M rows);
* cov: per view, sum of squared off-diagonal covariances / D.

How the two views' var and cov terms are combined is a parameter,
``view_reduction``: ``"sum"`` (default) adds them, as in the VICReg paper's
formula ``v(Z) + v(Z') ... c(Z) + c(Z')`` and docs/method.md's "per view";
``"mean"`` averages them, as the Screener authors' code does (the official
VICReg code averages var but sums cov). With the default weights, "sum" puts
twice the weight of "mean" on the regularisers.

InfoNCE (dense SimCLR / NT-Xent): l2-normalised projections, temperature 0.1,
the 2M x 2M cosine-similarity matrix of both views with self-similarity
removed; for each row the positive is its partner in the other view and every
other sampled voxel of both views and all images of the batch is a negative;
cross-entropy averaged over the 2M rows (= the symmetric loss).

Collapse monitors: :func:`embedding_std` (per-dimension std; VICReg pushes it
to >= 1, collapse sends it to 0) and :func:`effective_rank` (Roy & Vetterli
2007 effective rank of the covariance matrix).

Written by hand: these are a few lines of torch each, and no maintained
library exposes the dense (voxel-pair) variants with these exact terms.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InputError
from .pairs import gather_pairs

LOSS_KINDS = ("vicreg", "infonce")


class MLP(nn.Sequential):
    """``layers`` Linear layers with norm + activation between them (none after the last).

    Args:
        dim_in, hidden, out: widths; hidden is used by every inner layer.
        layers: number of Linear layers (>= 1).
        norm: "batch" (BatchNorm1d), "layer" (LayerNorm) or "none".
        activation: "relu" or "gelu".
    """

    def __init__(self, dim_in: int, hidden: int, out: int, layers: int = 3, norm: str = "batch",
                 activation: str = "relu", last_bias: bool = True):
        for name, v in (("dim_in", dim_in), ("hidden", hidden), ("out", out), ("layers", layers)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{type(self).__name__}.{name} must be a positive integer, got {v!r}")
        norms = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm, "none": None}
        acts = {"relu": nn.ReLU, "gelu": nn.GELU}
        if norm not in norms:
            raise ConfigError(f"{type(self).__name__}.norm must be one of {sorted(norms)}, got {norm!r}")
        if activation not in acts:
            raise ConfigError(f"{type(self).__name__}.activation must be one of {sorted(acts)}, got {activation!r}")
        widths = [dim_in] + [hidden] * (layers - 1) + [out]
        mods: list[nn.Module] = []
        for i in range(layers):
            last = i == layers - 1
            mods.append(nn.Linear(widths[i], widths[i + 1], bias=last_bias or not last))
            if not last:
                if norms[norm] is not None:
                    mods.append(norms[norm](widths[i + 1]))
                mods.append(acts[activation]())
        super().__init__(*mods)


class Expander(MLP):
    """VICReg expander: 32 -> 8192 -> 8192 -> 8192, BatchNorm1d + ReLU between (paper widths;
    smaller ``hidden``/``out`` on CPU). Last layer without bias, as in the official VICReg."""

    def __init__(self, dim_in: int = 32, hidden: int = 8192, out: int = 8192, layers: int = 3,
                 norm: str = "batch", activation: str = "relu"):
        super().__init__(dim_in, hidden, out, layers, norm, activation, last_bias=False)


class Projector(MLP):
    """InfoNCE projector to 128 dims: 32 -> 512 -> 512 -> 128, LayerNorm + GELU between
    (the authors' dense SimCLR head)."""

    def __init__(self, dim_in: int = 32, hidden: int = 512, out: int = 128, layers: int = 3,
                 norm: str = "layer", activation: str = "gelu"):
        super().__init__(dim_in, hidden, out, layers, norm, activation, last_bias=True)


def _check_pair(z1: torch.Tensor, z2: torch.Tensor, where: str, min_rows: int) -> None:
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise InputError(where, "two (M, D) embeddings of the same shape",
                         f"shapes {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < min_rows:
        raise InputError(where, f"at least {min_rows} embedding pairs (M)", f"M = {z1.shape[0]}")


def _variance_term(z: torch.Tensor, eps: float) -> torch.Tensor:
    std = torch.sqrt(z.var(dim=0) + eps)  # unbiased, as in VICReg
    return F.relu(1.0 - std).mean()


def _covariance_term(z: torch.Tensor) -> torch.Tensor:
    m, d = z.shape
    zc = z - z.mean(dim=0)
    cov = zc.T @ zc / (m - 1)
    off = cov - torch.diag(torch.diagonal(cov))
    return off.pow(2).sum() / d


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, inv_weight: float = 25.0, var_weight: float = 25.0,
                cov_weight: float = 1.0, eps: float = 1e-4, view_reduction: str = "sum"
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Dense VICReg on paired embeddings.

    Args:
        z1, z2: (M, D) embeddings (row k of each = the same voxel), M >= 2.
        view_reduction: "sum" (paper formula, default) or "mean" (authors' code) of the
            per-view variance and covariance terms.
    Returns:
        loss (scalar tensor) and detached terms {"loss", "invariance", "variance", "covariance"}
        (variance/covariance after the view reduction, before the weights).
    """
    _check_pair(z1, z2, "vicreg_loss", 2)
    if view_reduction not in ("sum", "mean"):
        raise ConfigError(f"vicreg_loss view_reduction must be 'sum' or 'mean', got {view_reduction!r}")
    z1, z2 = z1.float(), z2.float()  # statistics in fp32 even under autocast
    k = 1.0 if view_reduction == "sum" else 0.5
    inv = F.mse_loss(z1, z2)
    var = k * (_variance_term(z1, eps) + _variance_term(z2, eps))
    cov = k * (_covariance_term(z1) + _covariance_term(z2))
    loss = inv_weight * inv + var_weight * var + cov_weight * cov
    logs = {"loss": loss.detach(), "invariance": inv.detach(), "variance": var.detach(), "covariance": cov.detach()}
    return loss, logs


def infonce_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Dense InfoNCE (NT-Xent) on paired embeddings; l2-normalises internally.

    Args:
        z1, z2: (M, D) projections (row k of each = the same voxel), M >= 2.
        temperature: softmax temperature (paper 0.1).
    Returns:
        loss and detached logs {"loss", "positive_cosine" (mean cosine of the pairs),
        "accuracy" (fraction of rows whose most similar other row is the partner)}.
    """
    _check_pair(z1, z2, "infonce_loss", 2)
    if not temperature > 0:
        raise ConfigError(f"infonce_loss temperature must be positive, got {temperature!r}")
    m = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)                 # (2M, D)
    logits = z @ z.T / temperature                                       # (2M, 2M)
    self_mask = torch.eye(2 * m, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    target = torch.cat([torch.arange(m, 2 * m), torch.arange(0, m)]).to(z.device)
    loss = F.cross_entropy(logits, target)
    with torch.no_grad():
        pos = (z[:m] * z[m:]).sum(1).mean()
        acc = (logits.argmax(1) == target).float().mean()
    return loss, {"loss": loss.detach(), "positive_cosine": pos, "accuracy": acc}


def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """(M, D) -> (D,) per-dimension standard deviation (unbiased); ~0 means collapse."""
    if z.ndim != 2 or z.shape[0] < 2:
        raise InputError("embedding_std", "an (M, D) tensor with M >= 2", f"shape {tuple(z.shape)}")
    return z.detach().float().std(dim=0)


def effective_rank(z: torch.Tensor, eps: float = 1e-12) -> float:
    """Effective rank of the embeddings' covariance (Roy & Vetterli 2007).

    ``exp(H(p))`` with ``p_k = lambda_k / sum(lambda)`` the normalised eigenvalues of the
    (D, D) covariance of ``z`` (M, D): D for isotropic data, 1 for rank-one data. (RankMe,
    Garrido et al. 2023, applies the same formula to the singular values of ``z`` itself.)
    """
    if z.ndim != 2 or z.shape[0] < 2:
        raise InputError("effective_rank", "an (M, D) tensor with M >= 2", f"shape {tuple(z.shape)}")
    x = z.detach().double()
    x = x - x.mean(dim=0)
    lam = torch.linalg.eigvalsh(x.T @ x / (x.shape[0] - 1)).clamp_min(0)
    total = lam.sum()
    if total <= eps:
        return 0.0  # constant embeddings: no direction carries variance
    p = lam / total
    p = p[p > eps]
    return float(math.exp(float(-(p * p.log()).sum())))


class DenseSSLHead(nn.Module):
    """Head + loss of the dense SSL stage: ``forward(f1, f2, idx1, idx2, valid) -> (loss, logs)``.

    Args:
        kind: "vicreg" (Expander + :func:`vicreg_loss`) or "infonce" (Projector + :func:`infonce_loss`).
        dim: channels of the backbone's feature maps (d = 32).
        hidden, out, layers: head widths; defaults per kind are the paper's
            (VICReg 8192/8192/3, InfoNCE 512/128/3).
        temperature: InfoNCE temperature.
        vicreg: extra keyword arguments of :func:`vicreg_loss` (weights, eps, view_reduction).
        monitor: also log the collapse monitors of the raw features (costs a host sync).
    """

    def __init__(self, kind: str = "vicreg", dim: int = 32, hidden: int | None = None, out: int | None = None,
                 layers: int = 3, temperature: float = 0.1, monitor: bool = True, **vicreg):
        super().__init__()
        if kind not in LOSS_KINDS:
            raise ConfigError(f"unknown dense SSL loss kind {kind!r}; known kinds: {', '.join(LOSS_KINDS)}")
        if kind == "infonce" and vicreg:
            raise ConfigError(f"options {sorted(vicreg)} only apply to kind='vicreg'")
        allowed = {"inv_weight", "var_weight", "cov_weight", "eps", "view_reduction"}
        if set(vicreg) - allowed:
            raise ConfigError(f"unknown DenseSSLHead options {sorted(set(vicreg) - allowed)}; known: {sorted(allowed)}")
        self.kind, self.temperature, self.monitor, self.vicreg_kwargs = kind, temperature, monitor, vicreg
        if kind == "vicreg":
            self.head: nn.Module = Expander(dim, hidden or 8192, out or 8192, layers)
        else:
            self.head = Projector(dim, hidden or 512, out or 128, layers)

    def forward(self, f1: torch.Tensor, f2: torch.Tensor, idx1: torch.Tensor, idx2: torch.Tensor,
                valid: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """f1, f2 (B, D, X, Y, Z) feature maps of the two views; idx (B, N, 3); valid (B, N)."""
        y1, y2 = gather_pairs(f1, idx1, valid), gather_pairs(f2, idx2, valid)   # (M, D) each
        z1, z2 = self.head(y1), self.head(y2)  # each view through the head separately (BN statistics per view)
        if self.kind == "vicreg":
            loss, logs = vicreg_loss(z1, z2, **self.vicreg_kwargs)
        else:
            loss, logs = infonce_loss(z1, z2, self.temperature)
        logs = dict(logs, pairs=torch.tensor(float(y1.shape[0])))
        if self.monitor:
            logs["feature_std"] = embedding_std(torch.cat([y1, y2])).mean()
            logs["feature_rank"] = effective_rank(torch.cat([y1, y2]))
        return loss, logs
