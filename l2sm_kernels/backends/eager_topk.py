"""The cosine top-k of backend "eager": plain torch, chunked (docs/design.md, "Scoring").

Over chunks of the gallery: the chunk's scores s_ij = (q_hat_i . g_j) / max(|g_j|, eps), with
q_hat_i = q_i / max(|q_i|, eps), in the compute dtype (float32, float64 when an input is float64) -- the
formula every backend uses, the row norms accumulated in float64 (rows above 1.8e19 do not overflow) --
are merged with the running k best of each query:

- float32: each score and its index become one unique int64 key (backends/topk.py, encode_scores: the
  score's order in the high bits, the index in the low bits, NaN above every number, -0.0 = +0.0), and
  torch.topk of the (Q, k + chunk) keys keeps the k best. The keys are distinct, so torch.topk's
  unspecified order among equal values never arises: equal scores go to the lower index.
- float64: a stable sort of the (Q, k + chunk) candidates (the running best first; they hold the lower
  indices), so equal scores keep increasing index order; torch.sort puts NaN above every number.

Both give the order every backend returns. Workspace: a (Q, chunk) score block and its keys (or the sort's
values and int64 order), about 28 bytes per (Q x (k + chunk)) entry at the peak, with
chunk = max(64, k, CHUNK_BYTES / (8 Q)) rows (CHUNK_BYTES = 8 MiB: about 28 MiB), plus a (chunk, D)
converted gallery chunk and the (Q, D) normalized queries. No Q x N buffer. The triton backend uses this
function as its fallback for k above its register limit.
"""
from __future__ import annotations

import torch

from ..options import compute_dtype
from .topk import decode_scores, encode_scores

CHUNK_BYTES = 8 << 20


def chunk_rows(Q: int, k: int) -> int:
    """Gallery rows per chunk for Q queries (at least 64, and at least k)."""
    return max(64, k, CHUNK_BYTES // (8 * max(Q, 1)))


def cosine_topk_chunked(queries: torch.Tensor, gallery: torch.Tensor, k: int, normalize_gallery: bool,
                        largest: bool, eps: float, chunk: int | None = None):
    """(values (Q, k) in the compute dtype, indices (Q, k) int64), in the requested order."""
    dt = compute_dtype(queries, gallery)
    Q, N = queries.shape[0], gallery.shape[0]
    dev = queries.device
    chunk = chunk or chunk_rows(Q, k)
    q = queries.to(dt)
    # F.normalize's formula, x / max(|x|, eps), with the norm accumulated in float64: an fp32 sum of squares
    # overflows for rows above 1.8e19 (their cosines came out as 0 or NaN: wrong neighbours)
    q_hat = q / _norms(q).clamp_min(eps).to(dt)[:, None]
    keys = dt == torch.float32
    best = torch.empty((Q, 0), device=dev, dtype=torch.int64 if keys else dt)  # keys, or values
    idx = torch.empty((Q, 0), device=dev, dtype=torch.int64)  # (float64 path) their indices
    for c0 in range(0, N, chunk):
        gc = gallery[c0:c0 + chunk].to(dt)
        s = q_hat @ gc.T
        if normalize_gallery:
            s.mul_((1.0 / _norms(gc).clamp_min(eps)).to(dt))  # times 1 / max(|g_j|, eps), as cpu and triton
        m = best.shape[1]
        if keys:
            cand = torch.cat([best, encode_scores(s, c0, largest)], dim=1)
            del s
            best = torch.topk(cand, k, dim=1, largest=True, sorted=True).values
            continue
        s = torch.cat([best, s], dim=1)  # the running best (lower indices) first: the stable sort keeps them first
        sv, order = torch.sort(s, dim=1, descending=largest, stable=True)
        del s
        order = order[:, :k].contiguous()  # copies: a view would keep the whole sort output alive
        # position p < m: the running best's index; else gallery row c0 + p - m
        prev = idx.gather(1, order.clamp(max=max(m - 1, 0))) if m else order
        best, idx = sv[:, :k].contiguous(), torch.where(order < m, prev, order + (c0 - m))
        del sv
    if keys:
        return decode_scores(best, largest)
    return best, idx


def _norms(t: torch.Tensor) -> torch.Tensor:
    """Row norms accumulated in float64 (as the cpu backend's inverse norms and the loss's eager norms)."""
    return torch.linalg.vector_norm(t, dim=1, dtype=torch.float64)


def load():
    """Define l2sm::eager_cosine_topk; -> the op."""
    from .topk import define_python_topk

    def eager_cosine_topk(queries, gallery, k, normalize_gallery, largest, eps):
        return cosine_topk_chunked(queries, gallery, k, normalize_gallery, largest, eps)

    return define_python_topk("eager", eager_cosine_topk)
