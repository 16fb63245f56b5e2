"""Class-centre tools on the fused cosine top-k: no C x C matrix (docs/non_target_heads.md).

A trained head's class weights W (C K rows: K sub-centers per class, rows [jK, jK + K) are class j's)
say things about the data set that trained them:

- inter_class_similarity: for each class its nearest other class (the largest cosine between any of
  their sub-centers) and that cosine. Its mean over the classes is RegularFace's quantity (Zhao et al.,
  "RegularFace: Deep Face Recognition via Exclusive Regularization", CVPR 2019); a class whose nearest
  neighbour is close to cosine 1 is usually a duplicated identity. Computed by cosine_topk of W against
  itself, a block of query rows at a time, k = K + 1 (a row's own class holds at most K of its top
  K + 1 rows, so at least one other class is among them, and the best of those is the row's best
  other class).
- inter_class_regularizer: RegularFace's exclusive regularization term, mean_j max_{k != j} cos(W_j,
  W_k), differentiable (the nearest pairs found without gradient, their cosines recomputed: O(C K D)).
- closest_class_pairs: the n class pairs of largest cosine (k = (n + 1) K per query row suffices: a
  class takes part in at most n of the n best pairs).
- subcenter_outliers: sub-center ArcFace's cleaning step (Deng et al., "Sub-center ArcFace", ECCV
  2020): each sample's dominant sub-center in its own class (one gather of its class's K rows per
  sample), each class's dominant sub-center (the one most of its samples chose), and the samples whose
  angle to their class's dominant sub-center exceeds a threshold (75 degrees in the paper); a chunk
  of samples at a time, with the nearest sub-center over all classes (cosine_topk, k = 1) for each.

Memory is independent of C x C: per block, the top-k op's workspace and (block, k) results; the
outputs are O(C) (O(N K) for the samples).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F

from .options import check_int
from .scoring import cosine_topk


def _check_weight(weight, subcenters):
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D floating tensor (C K, D), got "
                         f"{weight.shape if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    K = check_int("subcenters", subcenters, 1)
    if weight.shape[0] % K:
        raise ValueError(f"weight has {weight.shape[0]} rows, not a multiple of subcenters={K}")
    return K, weight.shape[0] // K


@dataclass
class InterClassSimilarity:
    """nearest (C,) int64: each class's nearest other class (-1 when there is none, C = 1);
    max_cosine (C,): that cosine (float32, float64 for float64 weights; NaN when C = 1)."""

    nearest: torch.Tensor
    max_cosine: torch.Tensor

    def summary(self, quantiles=(0.5, 0.9, 0.99, 0.999)) -> dict:
        """The distribution of the per-class maxima: mean (RegularFace's score), std, min, max, quantiles."""
        v = self.max_cosine.double()
        v = v[~torch.isnan(v)]
        if v.numel() == 0:
            return {"classes": 0}
        out = {"classes": int(v.numel()), "mean": float(v.mean()), "std": float(v.std(unbiased=False)),
               "min": float(v.min()), "max": float(v.max())}
        for q in quantiles:
            out[f"q{q:g}"] = float(torch.quantile(v, q))
        return out

    def histogram(self, bins: int = 20, lo: float = -1.0, hi: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(counts (bins,), edges (bins + 1,)) of the per-class maxima."""
        v = self.max_cosine.double()
        v = v[~torch.isnan(v)].clamp(lo, hi)
        return torch.histc(v, bins=bins, min=lo, max=hi).long(), torch.linspace(lo, hi, bins + 1, dtype=torch.float64)


def _blocks(n: int, block: int):
    for r0 in range(0, n, block):
        yield r0, min(n, r0 + block)


def _best_other(weight, K, C, k, query_block, backend):
    """Per query row (C K,): the top-k (values, gallery rows) of W against W, a block at a time."""
    for r0, r1 in _blocks(C * K, query_block):
        yield r0, r1, cosine_topk(weight[r0:r1], weight, k, backend=backend)


def inter_class_similarity(weight: torch.Tensor, subcenters: int = 1, *, query_block: int = 4096,
                           backend: str = "auto") -> InterClassSimilarity:
    """Each class's nearest other class by the cosine of their weights (the maximum over the two
    classes' sub-center pairs); exact (a function of cosine_topk's scores; ties to the lower class).
    Memory: query_block x (K + 1) results plus the top-k op's workspace; never C x C."""
    K, C = _check_weight(weight, subcenters)
    query_block = check_int("query_block", query_block, 1)
    w = weight.detach()
    dt = torch.float64 if w.dtype == torch.float64 else torch.float32
    best = torch.full((C,), -math.inf, dtype=dt, device=w.device)
    arg = torch.full((C,), -1, dtype=torch.long, device=w.device)
    if C == 1:
        return InterClassSimilarity(arg, torch.full((1,), math.nan, dtype=dt, device=w.device))
    k = min(K + 1, C * K)
    for r0, r1, (vals, idx) in _best_other(w, K, C, k, query_block, backend):
        own = torch.arange(r0, r1, device=w.device) // K
        other = idx // K
        v = torch.where(other == own[:, None], torch.full_like(vals, -math.inf), vals)
        # the best other class of each query row: the first (largest) entry of another class
        j = torch.argmax((other != own[:, None]).to(torch.int8), dim=1)
        row_best = v.gather(1, j[:, None]).squeeze(1)
        row_cls = other.gather(1, j[:, None]).squeeze(1)
        # a class's maximum over its K query rows (ties: the lower class index)
        for r in range(K):
            sel = (torch.arange(r0, r1, device=w.device) % K) == r
            cls, b, c = own[sel], row_best[sel], row_cls[sel]
            cur_b, cur_c = best[cls], arg[cls]
            take = (b > cur_b) | ((b == cur_b) & (c < cur_c)) | (cur_c < 0)
            best[cls] = torch.where(take, b, cur_b)
            arg[cls] = torch.where(take, c, cur_c)
    return InterClassSimilarity(arg, best)


def inter_class_regularizer(weight: torch.Tensor, subcenters: int = 1, nearest: torch.Tensor | None = None, *,
                            query_block: int = 4096, backend: str = "auto") -> torch.Tensor:
    """RegularFace's exclusive regularization, mean_j max_{k != j} cos(W_j, W_k) (classes' cosines as the
    maximum over sub-center pairs), differentiable w.r.t. weight: the nearest classes are found without
    gradient (or given: `nearest`, e.g. recomputed every few steps), their cosines recomputed from the
    rows (O(C K^2 D)). Add lambda times it to the loss (RegularFace: lambda = 1)."""
    K, C = _check_weight(weight, subcenters)
    if C == 1:
        return weight.sum() * 0.0
    if nearest is None:
        nearest = inter_class_similarity(weight, K, query_block=query_block, backend=backend).nearest
    w = F.normalize(weight, dim=1).view(C, K, -1)
    cos = torch.einsum("cad,cbd->cab", w, w[nearest]).reshape(C, K * K).max(dim=1).values
    return cos.mean()


def closest_class_pairs(weight: torch.Tensor, n: int = 20, subcenters: int = 1, *, query_block: int = 4096,
                        backend: str = "auto") -> list[tuple[int, int, float]]:
    """The n pairs of distinct classes (i < j) of largest cosine, largest first (ties: lower (i, j)):
    duplicated identities in a data set are the usual cause of pairs near 1. Exact; memory
    query_block x (n + 1) K results."""
    K, C = _check_weight(weight, subcenters)
    n = check_int("n", n, 1)
    w = weight.detach()
    k = min((min(n, C - 1) + 1) * K, C * K)
    best: dict[tuple[int, int], float] = {}
    for r0, r1, (vals, idx) in _best_other(w, K, C, k, query_block, backend):
        own = (torch.arange(r0, r1, device=w.device) // K)[:, None].expand_as(idx)
        other = idx // K
        keep = other != own
        for a, b, v in zip(own[keep].tolist(), other[keep].tolist(), vals[keep].tolist()):
            key = (min(a, b), max(a, b))
            if key not in best or v > best[key]:
                best[key] = v
        if len(best) > 4 * n + 1024:  # keep the candidates bounded: the n best so far and ties
            cut = sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
            best = dict(cut)
    out = sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    return [(i, j, v) for (i, j), v in out]


@dataclass
class SubcenterOutliers:
    """subcenter (N,) int64: each sample's nearest sub-center in its own class (-1 for a label outside
    [0, C)); cosine (N, K): its cosines to its class's K sub-centers; counts (C, K) int64: how many
    samples chose each sub-center; dominant (C,) int64: each class's most chosen sub-center (ties: the
    lower; 0 for a class without samples); angle (N,): degrees between each sample and its class's
    dominant sub-center (NaN for an invalid label); outlier (N,) bool: angle > max_angle;
    predicted (N,) int64: the class of the nearest sub-center over all classes (cosine_topk, k = 1)."""

    subcenter: torch.Tensor
    cosine: torch.Tensor
    counts: torch.Tensor
    dominant: torch.Tensor
    angle: torch.Tensor
    outlier: torch.Tensor
    predicted: torch.Tensor


def subcenter_outliers(chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], weight: torch.Tensor, subcenters: int,
                       max_angle: float = 75.0, *, backend: str = "auto") -> SubcenterOutliers:
    """Sub-center ArcFace's data cleaning over a data set given as chunks of (features (n, D), labels
    (n,)): one pass over the chunks (each sample's K own-class cosines kept: N x K values), then every
    class's dominant sub-center and each sample's angle to it. max_angle in degrees (the paper drops
    samples beyond 75)."""
    K, C = _check_weight(weight, subcenters)
    if not (0.0 <= max_angle <= 180.0):
        raise ValueError(f"max_angle must be in [0, 180] degrees, got {max_angle!r}")
    w = weight.detach()
    w_hat = F.normalize(w.float() if w.dtype != torch.float64 else w, dim=1)
    cos_parts, label_parts, pred_parts = [], [], []
    for x, y in chunks:
        if x.dim() != 2 or x.shape[1] != w.shape[1] or y.shape != (x.shape[0],):
            raise ValueError(f"each chunk must be (features (n, {w.shape[1]}), labels (n,)), got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        x = x.detach().to(w.device)
        y = y.to(w.device).long()
        valid = (y >= 0) & (y < C)
        xh = F.normalize(x.to(w_hat.dtype), dim=1)
        rows = (torch.where(valid, y, torch.zeros_like(y))[:, None] * K + torch.arange(K, device=w.device)).reshape(-1)
        c = (w_hat.index_select(0, rows).view(-1, K, w.shape[1]) * xh[:, None, :]).sum(2)
        cos_parts.append(torch.where(valid[:, None], c, torch.full_like(c, math.nan)))
        label_parts.append(torch.where(valid, y, torch.full_like(y, -1)))
        if x.shape[0]:
            _, idx = cosine_topk(x, w, 1, backend=backend)
            pred_parts.append(idx[:, 0] // K)
        else:
            pred_parts.append(torch.empty(0, dtype=torch.long, device=w.device))
    dt = w_hat.dtype
    cos = torch.cat(cos_parts) if cos_parts else torch.empty(0, K, dtype=dt, device=w.device)
    labels = torch.cat(label_parts) if label_parts else torch.empty(0, dtype=torch.long, device=w.device)
    valid = labels >= 0
    sub = torch.where(valid, torch.nan_to_num(cos, nan=-math.inf).argmax(dim=1), torch.full_like(labels, -1))
    counts = torch.zeros(C * K, dtype=torch.long, device=w.device)
    counts.index_add_(0, (labels * K + sub)[valid], torch.ones(int(valid.sum()), dtype=torch.long, device=w.device))
    counts = counts.view(C, K)
    dominant = counts.argmax(dim=1)  # ties: the first (lower) sub-center
    dom_cos = cos.gather(1, dominant[labels.clamp_min(0)][:, None]).squeeze(1) if K else cos[:, 0]
    angle = torch.rad2deg(torch.acos(dom_cos.clamp(-1.0, 1.0)))
    angle = torch.where(valid, angle, torch.full_like(angle, math.nan))
    pred = torch.cat(pred_parts) if pred_parts else torch.empty(0, dtype=torch.long, device=w.device)
    return SubcenterOutliers(sub, cos, counts, dominant, angle, valid & (angle > max_angle), pred)


__all__ = ["InterClassSimilarity", "SubcenterOutliers", "closest_class_pairs", "inter_class_regularizer",
           "inter_class_similarity", "subcenter_outliers"]
