"""The cosine top-k of backend "triton" (docs/design.md, "Scoring"): kernel and launcher.

For each query the k gallery rows of largest (or smallest) cosine, with no Q x N buffer:

  1. inverse norms of the queries and (normalize_gallery) the gallery rows, fp32 (norms.inv_norms);
  2. _topk_split_kernel, grid (query blocks, gallery splits): each program walks its split of the gallery
     in BLOCK_N tiles: S = Q_tile G_tile^T accumulated over D in fp32 (bf16 / fp16 operands as stored:
     their products are exact in fp32; fp32 operands in IEEE fp32), scaled to the score
     s_ij = (q_i . g_j) / max(|q_i|, eps) / max(|g_j|, eps), and folded into a per-row running top-k held in
     registers (BLOCK_Q x KP, KP = next power of two >= k);
  3. the merge: torch.topk over the (Q, splits x KP) partials, exact because the partials are unique
     integers (below). Bounded: splits x Q x KP x 8 bytes, independent of N.

Scores as unique integers (the keys of backends/topk.py, encode_scores, computed here in registers by
_score_keys). Each score and its gallery index become one int64, larger = earlier in the result: the
score's fp32 bits mapped to a monotonic int32 key (-0.0 folded into +0.0, every NaN into the positive quiet
NaN, which then sorts above +inf: NaN is larger than every number, as torch.topk has it; for largest =
False the key is complemented, so the smallest score comes first and NaN last) in the high 32 bits, and
2^32 - 1 - index in the low 32 bits (equal scores: the lower index first). Keys are distinct, so "the k
largest keys" is a unique answer: per-row maximum extraction, the split merge and torch.topk of the
partials all agree, and the result is the one the cpu and eager backends give (same scores, same order;
bit-identical when the scores are exact, as the tests construct them).

The running top-k of a row is KP slots of keys: k live slots initialized to distinct sentinels below every
real key (INT64_MIN + slot), and KP - k padding slots at INT64_MAX, which are never the row's minimum, so
the minimum over the slots is the row's k-th best so far (its threshold). Per tile: n = max over the rows
of min(k, #candidates above the row's threshold); n rounds of "the row's best remaining candidate replaces
its worst slot if better" (after n rounds every candidate that belongs to the row's k best has been
taken: the i-th best candidate is considered in round i, and one rejected or evicted has k better keys).
For random data the thresholds rise quickly and n is 0 on almost every tile after the first few. Compiled
for sm_90 (tests/test_cosine_topk.py::test_triton_topk_compiles_for_hopper; GPU tiles 32 x 64 x 64, 4 warps,
no GPU run yet): k = 10 bf16, 128 registers and 16 bytes of stack; k = 256 fp32, 255 registers and 16
bytes of stack.

Limits: k <= MAX_K (256) here; larger k runs the documented fallback, the eager algorithm on the device
(chunked torch products and torch.topk of the same keys; backends/eager_topk.py), also with no Q x N
buffer. N < 2^32 (the index field). The products take the inputs as stored: a pair of rows whose
norms multiply beyond fp32's range (|q| |g| > 3.4e38) overflows where the cpu backend, which normalizes
the queries first, does not.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..topk import decode_scores
from .common import INTERPRETED, _didx, _identity, _mma, wide_d
from .config import _pow2, num_sms
from .norms import inv_norms

MAX_K = 256  # largest k the register top-k serves (KP slots per row); larger k: the fallback
_I64_MIN = tl.constexpr(-(2**63))  # below every real composite: padded columns, taken candidates
_I64_MAX = tl.constexpr(2**63 - 1)
_LOW_MAX = tl.constexpr(2**32 - 1)  # the low field holds 2^32 - 1 - index


@triton.jit
def _score_keys(s, low, cmask, LARGEST: tl.constexpr):
    """fp32 scores (R x C) and 2^32 - 1 - their gallery indices (C,) int64 -> int64 composites (module
    docstring); padded columns get INT64_MIN (below every sentinel and real composite)."""
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 == +0.0: one key, so that equal scores tie on the index
    bits = s.to(tl.int32, bitcast=True)
    bits = tl.where(s != s, 0x7FC00000, bits)  # every NaN -> the positive quiet NaN, above +inf
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # monotonic in the float's value
    if not LARGEST:
        key = -1 - key  # the complement: smallest first; NaN (the largest key) last
    comp = (key.to(tl.int64) << 32) | low[None, :]  # lower index -> larger low field -> earlier
    return tl.where(cmask, comp, _I64_MIN)


@triton.jit
def _topk_split_kernel(
    q_ptr, g_ptr, inv_q_ptr, inv_g_ptr, part_ptr,  # pointers: queries, gallery, their inverse norms, partials
    Q, N, D, split_len,  # sizes
    stride_qq, stride_qd, stride_gn, stride_gd,  # strides of queries and gallery
    K: tl.constexpr, KP: tl.constexpr, NORM_G: tl.constexpr, LARGEST: tl.constexpr,  # options
    DT: tl.constexpr, EMU: tl.constexpr, D64: tl.constexpr,  # precision, interpreter, wide D offsets
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,  # tiles
):
    """Program (query block, split): the KP best composites of each query over gallery rows
    [split x split_len, (split + 1) x split_len), written to part[split, query, :] (unsorted)."""
    pid_q = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rmask = rows < Q
    inv_q = tl.load(inv_q_ptr + rows, mask=rmask, other=0.0)
    slots = tl.arange(0, KP)
    # K live slots per row, starting at distinct sentinels INT64_MIN + slot, below every real composite (whose
    # key field is > INT32_MIN); the KP - K padding slots hold INT64_MAX, never the row's worst, so the worst
    # slot is the row's K-th best so far (the threshold), and are stored as INT64_MIN
    live = slots < K
    best = tl.where(live[None, :], tl.full([BLOCK_Q, KP], _I64_MIN, tl.int64) + slots[None, :].to(tl.int64),
                    _I64_MAX)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, N)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < hi
        acc = tl.zeros([BLOCK_Q, BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + _didx(tl.arange(0, BLOCK_D), D64)
            dmask = d < D
            qt = tl.load(q_ptr + rows[:, None] * stride_qq + d[None, :] * stride_qd,
                         mask=rmask[:, None] & dmask[None, :], other=0.0)
            gt = tl.load(g_ptr + cols[:, None] * stride_gn + d[None, :] * stride_gd,
                         mask=cmask[:, None] & dmask[None, :], other=0.0)
            acc = _mma(qt, tl.trans(gt), acc, DT, False, EMU)
        # s = (q . g) / max(|q|, eps) [/ max(|g|, eps)]: the queries' factor first, as the other backends'
        # q_hat . g (exact when the norms are powers of two, as in the cross-backend tests)
        s = acc * inv_q[:, None]
        if NORM_G:
            s = s * tl.load(inv_g_ptr + cols, mask=cmask, other=0.0)[None, :]
        cand = _score_keys(s, tl.full([BLOCK_N], _LOW_MAX, tl.int64) - cols, cmask[None, :], LARGEST)
        # rounds needed: the most candidates any row has above its current worst slot, at most K
        worst = tl.min(best, 1)
        above = tl.sum((cand > worst[:, None]).to(tl.int32), 1)
        rounds = tl.max(tl.minimum(above, K), 0)
        for _ in range(rounds):
            top = tl.max(cand, 1)  # the row's best remaining candidate (composites are distinct)
            worst = tl.min(best, 1)
            take = top > worst
            best = tl.where((best == worst[:, None]) & take[:, None], top[:, None], best)
            cand = tl.where(cand == top[:, None], _I64_MIN, cand)
    out = part_ptr + split * Q * KP + rows[:, None] * KP + slots[None, :]
    tl.store(out, tl.where(live[None, :], best, _I64_MIN), mask=rmask[:, None])


def _tiles(device, D: int):
    """(BLOCK_Q, BLOCK_N, BLOCK_D, num_warps): small tiles under the interpreter (speed), GPU tiles otherwise."""
    if INTERPRETED or torch.device(device).type != "cuda":
        return 16, 16, min(_pow2(D), 64), 4
    return 32, 64, min(_pow2(D), 64), 4


def _dtype_code(q: torch.Tensor, g: torch.Tensor) -> int:
    """Operand dtype of the products (common._operand): 2 bf16, 1 fp16 (both inputs so stored; products exact
    in the fp32 accumulator), else 0 (fp32, IEEE)."""
    if q.dtype == g.dtype == torch.bfloat16:
        return 2
    if q.dtype == g.dtype == torch.float16:
        return 1
    return 0


def num_splits(Q: int, N: int, block_q: int, block_n: int, device) -> int:
    """Gallery splits: enough programs for two waves of the device (4 splits under the interpreter), at least
    one tile per split. Bounds the partials at splits x Q x KP x 8 bytes."""
    row_blocks = triton.cdiv(max(Q, 1), block_q)
    sms = num_sms(device)
    target = 4 if sms is None else max(1, triton.cdiv(2 * sms, row_blocks))
    return max(1, min(target, triton.cdiv(N, block_n)))


def cosine_topk(queries: torch.Tensor, gallery: torch.Tensor, k: int, normalize_gallery: bool, largest: bool,
                eps: float, launch=_identity, tiles=None):
    """(values (Q, k) fp32, indices (Q, k) int64); see the module docstring. `tiles` = (BLOCK_Q, BLOCK_N,
    BLOCK_D, num_warps) overrides the defaults (tests)."""
    Q, D = queries.shape
    N = gallery.shape[0]
    if N >= 2**32:
        raise ValueError(f"the triton cosine top-k takes galleries of fewer than 2^32 rows, got {N}")
    if k > MAX_K:
        from ..eager_topk import cosine_topk_chunked

        return cosine_topk_chunked(queries, gallery, k, normalize_gallery, largest, eps)
    dev = queries.device
    if Q == 0:
        return (torch.empty((0, k), device=dev, dtype=torch.float32),
                torch.empty((0, k), device=dev, dtype=torch.int64))
    BQ, BN, BD, warps = tiles or _tiles(dev, D)
    KP = _pow2(k, 16)
    inv_q = inv_norms(queries, eps, launch=launch)
    inv_g = inv_norms(gallery, eps, launch=launch) if normalize_gallery else inv_q
    splits = num_splits(Q, N, BQ, BN, dev)
    split_len = BN * triton.cdiv(triton.cdiv(N, BN), splits)
    splits = triton.cdiv(N, split_len)
    part = torch.empty((splits, Q, KP), device=dev, dtype=torch.int64)
    launch(_topk_split_kernel)[(triton.cdiv(Q, BQ), splits)](
        q_ptr=queries, g_ptr=gallery, inv_q_ptr=inv_q, inv_g_ptr=inv_g, part_ptr=part,
        Q=Q, N=N, D=D, split_len=split_len,
        stride_qq=queries.stride(0), stride_qd=queries.stride(1),
        stride_gn=gallery.stride(0), stride_gd=gallery.stride(1),
        K=k, KP=KP, NORM_G=normalize_gallery, LARGEST=largest,
        DT=_dtype_code(queries, gallery), EMU=INTERPRETED, D64=wide_d(D, queries, gallery),
        BLOCK_Q=BQ, BLOCK_N=BN, BLOCK_D=BD, num_warps=warps)
    # merge the splits: the k largest of unique composites (torch.topk's order among ties never arises)
    comp = torch.topk(part.permute(1, 0, 2).reshape(Q, splits * KP), k, dim=1, largest=True, sorted=True).values
    return decode_scores(comp, largest)
