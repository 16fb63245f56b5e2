"""The second op boundary: cosine top-k, one forward-only torch.library op per backend, same schema for all
(docs/design.md, "Scoring"; the public function is l2sm_kernels.scoring.cosine_topk).

    l2sm::{backend}_cosine_topk(queries, gallery, k, normalize_gallery, largest, eps) -> (values, indices)

Contract every implementation honours:
- queries (Q, D), gallery (N, D): float16 / bfloat16 / float32 / float64 (float64 on eager and cpu), any
  strides, dtypes may differ, same device. 1 <= k <= N (the public function checks; the ops may assume it).
- score s_ij = (q_i / max(|q_i|, eps)) . g_j / max(|g_j|, eps) (the gallery's factor only when
  normalize_gallery), computed in compute_dtype(queries, gallery) (float64 if either is float64, else
  float32: fp16 / bf16 inputs are computed in fp32). A zero row scores 0 against everything.
- values (Q, k) in that dtype and indices (Q, k) int64: each query's k first gallery rows in the order
  "larger score first" (largest) or "smaller score first" (not largest), equal scores by the lower index,
  NaN larger than every number (first when largest, last when not), NaNs among themselves by index.
  Exact: no approximate search; the result is a function of the computed scores alone (identical gallery
  rows may score one rounding step apart when the BLAS computes some columns with another kernel: the
  tie rule applies to equal computed scores, not to equal rows).
- no Q x N buffer (each backend documents its workspace bound), nothing written into the inputs, no
  gradient (the ops have no autograd formula: the public function detaches).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..options import compute_dtype
from .contract import NAMESPACE

TOPK_SCHEMA = "(Tensor queries, Tensor gallery, int k, bool normalize_gallery, bool largest, float eps) -> (Tensor, Tensor)"


def topk_name(backend: str) -> str:
    return f"{NAMESPACE}::{backend}_cosine_topk"


def fake_topk(queries, gallery, k, normalize_gallery, largest, eps):
    Q = queries.shape[0]
    return (queries.new_empty((Q, k), dtype=compute_dtype(queries, gallery)),
            queries.new_empty((Q, k), dtype=torch.int64))


def register_topk_op(op) -> None:
    """Attach the shared fake (meta) kernel to one backend's top-k op (a CustomOpDef, or
    torch.ops.l2sm.<name>.default for the op defined in C++)."""
    torch.library.register_fake(op)(fake_topk)


def define_python_topk(backend: str, impl: Callable):
    """Define l2sm::{backend}_cosine_topk as a Python custom op implemented by impl; returns it."""
    op = torch.library.custom_op(topk_name(backend), impl, mutates_args=(), schema=TOPK_SCHEMA)
    register_topk_op(op)
    return op


# ---------------------------------------------------------------------------------------------
# fp32 scores as unique int64 keys: the eager backend's selection and the triton backend's merge
# ---------------------------------------------------------------------------------------------
# Each fp32 score and its gallery index become one int64, larger = earlier in the result: the score's bits
# mapped to a monotonic int32 key (-0.0 folded into +0.0, every NaN into the positive quiet NaN, which then
# sorts above +inf: NaN is larger than every number; for largest = False the key is complemented: smallest
# first, NaN last) in the high 32 bits, and 2^32 - 1 - index in the low 32 bits (equal scores: the lower
# index first). The keys are distinct, so the k largest keys are one well-defined set in one order, which
# torch.topk finds exactly. Indices must be < 2^32. (The triton kernel computes the same keys, _score_keys.)
LOW_MASK = 2**32 - 1


def encode_scores(s: torch.Tensor, first_index: int, largest: bool) -> torch.Tensor:
    """(Q, n) fp32 scores of gallery rows first_index ... first_index + n - 1 -> (Q, n) int64 keys.
    Overwrites s (its storage is reused for the key computation)."""
    nan = torch.isnan(s)
    s.masked_fill_(s == 0, 0.0)  # -0.0 -> +0.0
    bits = s.view(torch.int32)
    bits.masked_fill_(nan, 0x7FC00000)
    key = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    if not largest:
        key.bitwise_not_()
    comp = key.to(torch.int64)
    del key
    comp.bitwise_left_shift_(32)
    low = LOW_MASK - torch.arange(first_index, first_index + s.shape[1], device=s.device, dtype=torch.int64)
    return comp.bitwise_or_(low)


def decode_scores(comp: torch.Tensor, largest: bool):
    """int64 keys -> (fp32 scores, int64 indices); torch ops only (runs under torch.compile)."""
    key = (comp >> 32).to(torch.int32)
    if not largest:
        key = ~key
    bits = torch.where(key >= 0, key, key ^ 0x7FFFFFFF)
    return bits.view(torch.float32), LOW_MASK - (comp & LOW_MASK)


# Filled in by the registry as each backend's top-k op loads: backend name -> op.
TOPK_OPS: dict[str, object] = {}
