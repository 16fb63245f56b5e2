"""The cosine top-k of backend "eager": plain torch, chunked (docs/design.md, "Scoring").

Over chunks of the gallery: the chunk's scores s_ij = (q_hat_i . g_j) / max(|g_j|, eps), with
q_hat_i = q_i / max(|q_i|, eps), in the compute dtype (float32, float64 when an input is float64) -- the
formula every backend uses -- appended to the running k best of each query, and a stable sort of the
(Q, k + chunk) candidates keeps the k best. A stable sort keeps equal scores in the order they were
appended, which is increasing gallery index (the running best come first, and they hold lower indices
than the chunk), so ties go to the lower index; torch.sort puts NaN above every number (first when
descending, last when ascending). That is the order every backend returns.

Workspace: the chunk's (Q, chunk) scores and the sort's values and int64 indices of (Q, k + chunk), with
chunk = max(64, CHUNK_BYTES / (4 Q)) rows (CHUNK_BYTES = 16 MiB: a 16 MiB score chunk, about 64 MiB with
the sort's buffers), plus a (chunk, D) converted gallery chunk and the (Q, D) normalized queries. No Q x N
buffer. The triton backend uses this function as its fallback for k above its register limit.
"""
from __future__ import annotations

import torch

from ..options import compute_dtype

CHUNK_BYTES = 16 << 20


def chunk_rows(Q: int, k: int) -> int:
    """Gallery rows per chunk for Q queries (at least 64, and at least k)."""
    return max(64, k, CHUNK_BYTES // (4 * max(Q, 1)))


def cosine_topk_chunked(queries: torch.Tensor, gallery: torch.Tensor, k: int, normalize_gallery: bool,
                        largest: bool, eps: float, chunk: int | None = None):
    """(values (Q, k) in the compute dtype, indices (Q, k) int64), sorted in the requested order."""
    dt = compute_dtype(queries, gallery)
    Q, N = queries.shape[0], gallery.shape[0]
    dev = queries.device
    chunk = chunk or chunk_rows(Q, k)
    q = queries.to(dt)
    q_hat = q / q.norm(dim=1, keepdim=True).clamp_min(eps)  # F.normalize's formula, x / max(|x|, eps)
    vals = torch.empty((Q, 0), device=dev, dtype=dt)
    idx = torch.empty((Q, 0), device=dev, dtype=torch.int64)
    for c0 in range(0, N, chunk):
        gc = gallery[c0:c0 + chunk].to(dt)
        s = q_hat @ gc.T
        if normalize_gallery:
            s = s * (1.0 / gc.norm(dim=1).clamp_min(eps))  # times 1 / max(|g_j|, eps), as cpu and triton
        ci = torch.arange(c0, c0 + gc.shape[0], device=dev, dtype=torch.int64).expand(Q, -1)
        s = torch.cat([vals, s], dim=1)
        ci = torch.cat([idx, ci], dim=1)
        sv, order = torch.sort(s, dim=1, descending=largest, stable=True)
        vals, idx = sv[:, :k], ci.gather(1, order[:, :k])
    return vals.contiguous(), idx.contiguous()


def load():
    """Define l2sm::eager_cosine_topk; -> the op."""
    from .topk import define_python_topk

    def eager_cosine_topk(queries, gallery, k, normalize_gallery, largest, eps):
        return cosine_topk_chunked(queries, gallery, k, normalize_gallery, largest, eps)

    return define_python_topk("eager", eager_cosine_topk)
