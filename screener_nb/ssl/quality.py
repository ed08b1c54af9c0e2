"""Does the SSL work? Measures reported by notebooks 02/03 and ``bench train``.

* :func:`retrieval_rate` -- correspondence retrieval: for body voxels of one
  augmented view, is the nearest descriptor in the other view within ``tol``
  voxels of the true match? (trained vs randomly initialised encoders)
* :func:`masking_invariance` -- cosine similarity, inside a hidden block,
  between an encoder's map with and without the block hidden: high for the
  condition encoder (it encodes context), lower for the descriptor.
* collapse monitors (:func:`screener_nb.ssl.losses.embedding_std`,
  :func:`~screener_nb.ssl.losses.effective_rank`) on a whole view.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .augment import ColorAugment
from .losses import effective_rank, embedding_std
from .pairs import PairSampler
from .task import encode


@torch.inference_mode()
def retrieval_rate(encoder: nn.Module, cases: list, patch=(48, 48, 32), n_views: int = 4, n_query: int = 256,
                   tol: float = 2.0, seed: int = 0, augment: bool = True) -> dict:
    """Fraction of query voxels whose nearest neighbour (L2, over all voxels of
    the other view) lies within ``tol`` voxels (Euclidean, view-2 grid) of the
    true match. Returns ``{"rate", "median_error_vox", "n"}``.
    """
    rng = np.random.default_rng(seed)
    sampler = PairSampler(cases, patch=tuple(patch), n_pairs=n_query,
                          augment=ColorAugment() if augment else None)
    hits, errors = [], []
    for _ in range(n_views):
        b = sampler.sample_batch(rng, 1)
        f1 = encode(encoder, b.view1)[0].float()            # (D, X, Y, Z)
        f2 = encode(encoder, b.view2)[0].float()
        v = b.valid[0]
        i1, i2 = b.idx1[0][v], b.idx2[0][v]                 # (n, 3)
        q = f1[:, i1[:, 0], i1[:, 1], i1[:, 2]].T          # (n, D)
        cand = f2.flatten(1).T                              # (X*Y*Z, D)
        nn_idx = torch.cdist(q, cand).argmin(dim=1)
        found = torch.stack(torch.unravel_index(nn_idx, f2.shape[1:]), dim=1)
        err = (found - i2).float().norm(dim=1)
        hits.append(err <= tol)
        errors.append(err)
    err = torch.cat(errors)
    return {"rate": float(torch.cat(hits).float().mean()), "median_error_vox": float(err.median()), "n": int(err.numel())}


@torch.inference_mode()
def masking_invariance(encoder: nn.Module, image: np.ndarray, block: tuple[slice, slice, slice]) -> float:
    """Mean cosine similarity, over the voxels of ``block``, between the
    encoder's map of ``image`` (X, Y, Z) and its map with ``block`` hidden."""
    x = torch.tensor(np.asarray(image), dtype=torch.float32)[None, None]
    mask = torch.zeros_like(x)
    mask[(0, 0, *block)] = 1.0
    clean = encode(encoder, x)[0]
    hidden = encode(encoder, x, mask)[0]
    cos = F.cosine_similarity(clean[(slice(None), *block)], hidden[(slice(None), *block)], dim=0)
    return float(cos.mean())


def central_block(shape, grid=(4, 4, 4)) -> tuple[slice, slice, slice]:
    """The block of a ``grid`` partition of ``shape`` nearest the centre."""
    size = [s // g for s, g in zip(shape, grid)]
    start = [(g // 2) * b for g, b in zip(grid, size)]
    return tuple(slice(a, a + b) for a, b in zip(start, size))


@torch.inference_mode()
def collapse_monitors(encoder: nn.Module, image: np.ndarray, body: np.ndarray | None = None) -> dict:
    """Per-dimension std (mean, min) and effective rank of an encoder's
    features over the (body) voxels of ``image`` (X, Y, Z)."""
    x = torch.tensor(np.asarray(image), dtype=torch.float32)[None, None]
    f = encode(encoder, x)[0].float().flatten(1).T          # (voxels, D)
    if body is not None:
        f = f[torch.tensor(np.asarray(body).ravel())]
    std = embedding_std(f)
    return {"std_mean": float(std.mean()), "std_min": float(std.min()), "effective_rank": effective_rank(f),
            "dim": int(f.shape[1])}


@torch.inference_mode()
def dense_features(encoder: nn.Module, image: np.ndarray, patch=(48, 48, 32), overlap: float = 0.25,
                   mask: np.ndarray | None = None) -> torch.Tensor:
    """Full-resolution feature map (D, X, Y, Z) of a whole preprocessed scan
    (sliding window, Gaussian blending; ``mask`` hides voxels, 1 = hidden)."""
    from monai.inferers import sliding_window_inference

    x = torch.tensor(np.asarray(image), dtype=torch.float32)[None, None]
    if mask is None:
        return sliding_window_inference(x, tuple(patch), 2, lambda w: encode(encoder, w).float(),
                                        overlap=overlap, mode="gaussian")[0]
    m = torch.tensor(np.asarray(mask), dtype=torch.float32)[None, None]
    both = torch.cat([x, m], dim=1)
    return sliding_window_inference(both, tuple(patch), 2, lambda w: encode(encoder, w[:, :1], w[:, 1:]).float(),
                                    overlap=overlap, mode="gaussian")[0]


def similarity_map(features_a: torch.Tensor, voxel, features_b: torch.Tensor) -> np.ndarray:
    """Cosine similarity (X, Y, Z) between the descriptor of ``voxel`` in scan A
    and every voxel of scan B (the "click a voxel, find it in another scan" figure)."""
    q = features_a[(slice(None), *voxel)].float()
    return F.cosine_similarity(features_b.float(), q[:, None, None, None], dim=0).numpy()
