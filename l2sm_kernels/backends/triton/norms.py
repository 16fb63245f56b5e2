"""Small passes over a matrix's rows and columns: inverse row norms (features, and W with
normalize_weight) and the column sum of W_hat (label smoothing's dX term). Kernels and launchers."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRETED, _didx, _identity, wide_d
from .config import _pow2


@triton.jit
def _row_norms(base, mask, D, stride_d, D64: tl.constexpr, BLOCK_D: tl.constexpr):
    """|v_i| (fp32) of the rows starting at the pointers `base` (masked rows give 0).

    The squares are summed in float64 and the square root taken there, then rounded to fp32 once, as
    eager.normalize_rows does: an fp32 sum of squares overflows once |v| > ~1.8e19 (the norm itself
    fits fp32), which turned such a row into a zero vector (docs/reliability.md, case 31), and it
    underflows below ~1e-19. Cost (estimated, unmeasured): one conversion and one fp64 fused
    multiply-add per element, on the passes that read each row once (norms of x and of W, the per-row
    kernels' target rows, the dW pass's |W_j| per class block), never inside the products. An H100 /
    H200 does ~34 fp64 TFLOP/s: bf16 rows streamed at 4.8 TB/s need 2.4e12 FMAs/s, a seventh of it,
    so these passes stay bound by memory. On a GPU whose fp64 runs at 1/64 of fp32 (RTX 4090: ~1.3
    TFLOP/s) the W pass takes ~2 C K D / 1.3e12 s (0.8 ms at C K = 1M, D = 512), about its 1 ms of
    reading there: at most twice the pass, and it runs once per step.
    The alternative, a max-abs pass before a scaled fp32 sum, reads every row twice."""
    acc = tl.zeros(base.shape, tl.float64)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + _didx(tl.arange(0, BLOCK_D), D64)
        v = tl.load(base[:, None] + d[None, :] * stride_d, mask=mask[:, None] & (d[None, :] < D),
                    other=0.0).to(tl.float64)
        acc += tl.sum(v * v, 1)
    return tl.sqrt(acc).to(tl.float32)  # fp64 sqrt is correctly rounded (sqrt.rn.f64; numpy's sqrt)


@triton.jit
def _inv_norm_kernel(
    v_ptr, out_ptr,  # pointers: (N, D) input, (N,) fp32 output
    N, D, eps,  # sizes, eps
    stride_n, stride_d,  # strides of v
    D64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out_i = 1 / max(|v_i|, eps) in fp32 (a zero row gives 1 / eps, so v_hat = v / eps = 0: no NaN)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    norm = _row_norms(v_ptr + rows * stride_n, rmask, D, stride_d, D64, BLOCK_D)
    tl.store(out_ptr + rows, tl.div_rn(1.0, tl.maximum(norm, eps)), mask=rmask)


@triton.jit
def _colsum_kernel(
    w_ptr, inv_nw_ptr, part_ptr,  # pointers: W (C, D), 1/|W_j| (C,), partial sums (n_parts, D) fp32
    C, D, rows_per_part,  # sizes
    stride_wc, stride_wd,  # strides of W
    NORM_W: tl.constexpr, D64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Partial column sums of W_hat over a slice of classes (summed afterwards in a fixed order)."""
    d = _didx(tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D), D64)
    part = tl.program_id(1).to(tl.int64)
    lo = part * rows_per_part
    hi = tl.minimum(lo + rows_per_part, C)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for c0 in range(lo, hi, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < hi
        w = tl.load(w_ptr + cols[:, None] * stride_wc + d[None, :] * stride_wd,
                    mask=cmask[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
        if NORM_W:
            w = w * tl.load(inv_nw_ptr + cols, mask=cmask, other=0.0)[:, None]
        acc += tl.sum(w, 0)
    tl.store(part_ptr + part * D + d, acc, mask=d < D)


def inv_norms(v: torch.Tensor, eps: float, launch=_identity) -> torch.Tensor:
    """1 / max(|v_i|, eps) per row, fp32."""
    N, D = v.shape
    out = torch.empty((N,), device=v.device, dtype=torch.float32)
    if N == 0:
        return out
    BN, BD = 16 if (N <= 4096 or not INTERPRETED) else 1024, min(_pow2(D), 128)
    launch(_inv_norm_kernel)[(triton.cdiv(N, BN),)](
        v_ptr=v, out_ptr=out, N=N, D=D, eps=eps, stride_n=v.stride(0), stride_d=v.stride(1),
        D64=wide_d(D, v), BLOCK_N=BN, BLOCK_D=BD)
    return out


def column_sum(weight: torch.Tensor, inv_nw, launch=_identity) -> torch.Tensor:
    """sum_j W_hat_j (D,), fp32, in a fixed order (deterministic)."""
    C, D = weight.shape
    BD = min(_pow2(D), 128)
    BC = (16 if C <= 4096 else 1024) if INTERPRETED else 64
    parts = min(triton.cdiv(C, BC), 4 if INTERPRETED else 256)
    rows_per = BC * triton.cdiv(triton.cdiv(C, BC), parts)
    parts = triton.cdiv(C, rows_per)
    part = torch.empty((parts, D), device=weight.device, dtype=torch.float32)
    launch(_colsum_kernel)[(triton.cdiv(D, BD), parts)](
        w_ptr=weight, inv_nw_ptr=inv_nw if inv_nw is not None else part, part_ptr=part, C=C, D=D,
        rows_per_part=rows_per, stride_wc=weight.stride(0), stride_wd=weight.stride(1),
        NORM_W=inv_nw is not None, D64=wide_d(D, weight), BLOCK_C=BC, BLOCK_D=BD)
    return part.sum(dim=0)
