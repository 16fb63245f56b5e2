"""Scoring with L2-softmax embeddings: the fused cosine top-k and the scores built on it (docs/design.md,
"Scoring").

An L2-softmax-trained network is used by cosine similarity: to the class weights (closed-set prediction;
1 - the largest cosine is the anomaly score), to a gallery of known samples (k nearest neighbours), or
pairwise (verification). At face scale the score matrix (thousands of queries x a 1M gallery) is as large
as the loss's logits; cosine_topk never builds it.

- cosine_topk(queries, gallery, k): the k largest (or smallest) cosines per query and their gallery
  indices, exact, through one op per backend (backends/topk.py) like the loss.
- max_cosine / weight_anomaly_score: k = 1 against the class weights (prediction and its cosine; anomaly
  score 1 - cosine), no B x C matrix; sub-center heads (subcenters=K, or the head itself) give classes.
- knn_cosine / knn_anomaly_score: the mean of the k largest cosines to a gallery; 1 - that.
- verification_pair_chunks / verification_scores / verification_histogram: the all-pairs verification
  scores of a labelled set, a block of rows at a time (l2sm_kernels.metrics reads them).
"""
from __future__ import annotations

import math
import numbers
from typing import Iterator

import torch

from .backends.registry import resolve_topk, topk_op_for
from .metrics import ScoreHistogram
from .options import FLOAT_DTYPES


def _check_matrix(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, features), got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float, got {eps!r}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite float, got {eps!r}")
    return float(eps)


def cosine_topk(queries: torch.Tensor, gallery: torch.Tensor, k: int, *, normalize_gallery: bool = True,
                largest: bool = True, eps: float = 1e-12, backend: str = "auto"):
    """The k gallery rows of largest (largest=False: smallest) cosine to each query, exactly.

    queries (Q, D), gallery (N, D): float16 / bfloat16 / float32 / float64 (float64 on the eager and cpu
    backends), any strides, on one device. Both are normalized inside, v / max(|v|, eps) as the loss does
    (normalize_gallery=False: the gallery is used as given, e.g. already normalized); a zero row scores 0.

    Returns (values (Q, k), indices (Q, k) int64): values in float32 (float64 when an input is float64;
    fp16 / bf16 are computed in fp32), in the requested order; equal scores by the lower gallery index; NaN
    counts as larger than every number (as in torch.topk): a NaN score (a NaN in the query or in that
    gallery row) comes first with largest=True and last with largest=False, so it is never passed off as a
    plausible neighbour. The result is the same on every backend for the same scores.

    Ties are among equal COMPUTED scores: identical gallery rows (duplicates, an expanded stride-0 row) are
    not promised identical scores, since a BLAS may compute some columns of one product with another
    kernel (seen on AMD EPYC with 2 threads: the last columns one float step apart), and then the order
    follows the computed values. Exactly representable inputs score exactly, hence identically. No gradient (the
    inputs are detached). No Q x N buffer: each backend's workspace is bounded (docs/design.md, "Scoring").

    backend: "auto" (triton for CUDA tensors, cpu for CPU tensors, eager where neither can serve, announced
    once), "eager", "cpu", "triton". 1 <= k <= N, else a ValueError.
    """
    _check_matrix("queries", queries)
    _check_matrix("gallery", gallery)
    Q, D = queries.shape
    N = gallery.shape[0]
    if gallery.shape[1] != D:
        raise ValueError(f"gallery must have shape (N, {D}) to match queries of shape {tuple(queries.shape)}, "
                         f"got {tuple(gallery.shape)}")
    if D == 0:
        raise ValueError("queries and gallery must have at least one feature dimension, got D = 0")
    if queries.device != gallery.device:
        raise ValueError(f"queries and gallery must be on one device, got {queries.device} and {gallery.device}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {k!r}")
    if not 1 <= k <= N:
        raise ValueError(f"k must be in [1, N] where N = {N} is the number of gallery rows, got k = {k}")
    for name, v in (("normalize_gallery", normalize_gallery), ("largest", largest)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool, got {v!r}")
    eps = _check_eps(eps)
    name = resolve_topk(backend, queries.device.type, {queries.dtype, gallery.dtype})
    op = topk_op_for(name)
    return op(queries.detach(), gallery.detach(), int(k), normalize_gallery, largest, eps)


# ---------------------------------------------------------------------------------------------
# scores built on it
# ---------------------------------------------------------------------------------------------
def max_cosine(features: torch.Tensor, weight, *, subcenters: int | None = None, normalize_weight: bool = True,
               eps: float = 1e-12, backend: str = "auto"):
    """(largest cosine to the class weights (B,), its class (B,) int64): the closed-set prediction of an
    L2-softmax model by cosine, without the B x C matrix (cosine_topk with k = 1; ties to the lower class).

    weight: the (C K, D) class weights with K = subcenters sub-centers per class (rows [j K, (j + 1) K) are
    class j's, as the loss lays them out; default K = 1), or the head itself (an L2SoftmaxLoss or any
    module with `.weight` and `.options.subcenters`), whose weight and sub-centers are used. A class's
    cosine is the largest over its sub-centers (as the loss and L2SoftmaxLoss.cosine have it), so the
    class returned is the best row's, row // K, never a row index."""
    weight, K = _class_weights(weight, subcenters)
    v, i = cosine_topk(features, weight, 1, normalize_gallery=normalize_weight, eps=eps, backend=backend)
    # the best row over all C K rows is the best class's best sub-center; on ties the lower row, whose
    # class is the lower one (rows of class j precede those of class j + 1)
    return v[:, 0], i[:, 0] // K if K > 1 else i[:, 0]


def weight_anomaly_score(features: torch.Tensor, weight, **kw) -> torch.Tensor:
    """1 - max_j cos(x, W_j): far from every known class direction = anomalous (keywords: max_cosine's,
    subcenters included; weight may be the head)."""
    return 1.0 - max_cosine(features, weight, **kw)[0]


def _class_weights(weight, subcenters):
    """(the weight tensor, K) from a tensor and subcenters (default 1) or from a head."""
    if not isinstance(weight, torch.Tensor) and hasattr(weight, "weight") and hasattr(weight, "options"):
        head_k = weight.options.subcenters
        if subcenters is not None and subcenters != head_k:
            raise ValueError(f"subcenters={subcenters!r} contradicts the head's subcenters={head_k}")
        weight, subcenters = weight.weight.detach(), head_k
    _check_matrix("weight", weight)
    K = 1 if subcenters is None else subcenters
    if isinstance(K, bool) or not isinstance(K, numbers.Integral) or K < 1:
        raise ValueError(f"subcenters must be an int >= 1, got {subcenters!r}")
    if weight.shape[0] % K:
        raise ValueError(f"weight has {weight.shape[0]} rows, not a multiple of subcenters={K} (rows [j K, (j + 1) K) "
                         "are class j's sub-centers)")
    return weight, int(K)


def knn_cosine(queries: torch.Tensor, gallery: torch.Tensor, k: int = 5, *, eps: float = 1e-12,
               backend: str = "auto") -> torch.Tensor:
    """Mean of the k largest cosines of each query to the gallery (Q,)."""
    return cosine_topk(queries, gallery, k, eps=eps, backend=backend)[0].mean(dim=1)


def knn_anomaly_score(queries: torch.Tensor, gallery: torch.Tensor, k: int = 5, **kw) -> torch.Tensor:
    """1 - knn_cosine: far from the k nearest known samples = anomalous."""
    return 1.0 - knn_cosine(queries, gallery, k, **kw)


# ---------------------------------------------------------------------------------------------
# all-pairs verification scores
# ---------------------------------------------------------------------------------------------
PAIR_BLOCK_BYTES = 64 << 20  # one block of pair scores (rows x N fp32)


def verification_pair_chunks(embeddings: torch.Tensor, labels: torch.Tensor, *, eps: float = 1e-12,
                             block_rows: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every unordered pair i < j of a labelled set, a block of rows i at a time: yields (cosine (n,) fp32,
    same label (n,) bool) with the pairs in row-major order (i, then j). Memory: one block of
    block_rows x N scores (default: PAIR_BLOCK_BYTES of fp32), plus the (N, D) normalized embeddings."""
    _check_matrix("embeddings", embeddings)
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels must be a 1-D tensor of length {embeddings.shape[0]}")
    eps = _check_eps(eps)
    n = embeddings.shape[0]
    e = embeddings.detach().float()
    e = e / e.norm(dim=1, keepdim=True).clamp_min(eps)
    labels = labels.to(e.device)
    rows = block_rows or max(1, PAIR_BLOCK_BYTES // (4 * max(n, 1)))
    for i0 in range(0, n - 1, rows):
        i1 = min(n, i0 + rows)
        s = e[i0:i1] @ e[i0:].T  # (r, n - i0): row i against j >= i0
        upper = torch.ones_like(s, dtype=torch.bool).triu_(diagonal=1)  # j > i
        same = labels[i0:i1, None] == labels[None, i0:]
        yield s[upper], same[upper]


def verification_scores(embeddings: torch.Tensor, labels: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs i < j at once: (cosine (n (n - 1) / 2,), same label) -- for sets whose pair count fits in
    memory; verification_histogram streams larger ones."""
    chunks = list(verification_pair_chunks(embeddings, labels, **kw))
    if not chunks:
        dev = embeddings.device
        return torch.empty(0, device=dev), torch.empty(0, dtype=torch.bool, device=dev)
    return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])


def verification_histogram(embeddings: torch.Tensor, labels: torch.Tensor, *, bins: int = ScoreHistogram.DEFAULT_BINS,
                           **kw) -> ScoreHistogram:
    """The all-pairs verification scores streamed into a ScoreHistogram (memory O(bins) beyond one block)."""
    h = ScoreHistogram(bins, -1.0, 1.0, device=embeddings.device)
    for s, same in verification_pair_chunks(embeddings, labels, **kw):
        h.update(s, same)
    return h
