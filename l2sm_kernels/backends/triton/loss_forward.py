"""Triton kernels of the fused L2-softmax loss, and their launchers (forward(), backward()).

Notation (DESIGN.md): x_hat_i = x_i / max(|x_i|, eps); W_hat_j = W_j / max(|W_j|, eps) when normalize_weight,
else W_j; c_ij = x_hat_i . W_hat_j; z_ij = alpha c_ij + b_j, with f(c_iy) instead of c_iy on a row's target
column y = y_i; p = softmax_j(z); lse_i = logsumexp_j z_ij. The backward of every output is
    dz_ij = w_p p_ij - w_t ((1 - s) [j = y] + s / C),   w_t = grad_loss (0 on ignored rows), w_p = w_t + grad_lse.

Design: four GEMM-equivalents of matrix work (the 3-GEMM floor needs three; an exact method that stores
no B x C values needs at least four, DESIGN.md "roofline"), a constant number of launches, no B x C
buffer, no atomics, deterministic.

  forward   _fwd_split_kernel     grid (row blocks, class splits[, D chunks]). Walks its classes once:
            S = x W^T tile by tile, online logsumexp over the non-target columns, and, flash-attention style
            (V = W, online rescaling), O'_i = sum_{j != y_i} p_ij W_hat_j when the dX hint is set. That is
            the forward's 2 GEMM-equivalents; without the hint only S is computed (1).
            _fwd_combine_kernel   per row: merges the class splits' partial (max, sum, O'), adds the target
            column (its cosine c_iy = x_hat_i . W_hat_y computed as one exact fp32 dot per row, then the
            margin), writes loss, lse and the aux statistics.
  backward  _bwd_rows_kernel      per row: dX needs no pass over the classes, because
              dx_hat_i = alpha [w_p O'_i - w_t (s/C) (sum_j W_hat_j - W_hat_y) + dz_iy f'(c_iy) W_hat_y]
            (O' excludes the target column, so a confident row's p_iy - 1 = -q_i never cancels; q_i is the
            merged non-target mass, exact in fp32), then the normalization backward. d alpha likewise:
              sum_j dz_ij g_ij = w_p PC_i - w_t (s/C) SC_i + dz_iy f(c_iy),
            PC_i = sum_{j != y} p_ij c_ij and SC_i = sum_{j != y} c_ij accumulated by the forward.
            _bwd_dw_kernel        persistent, one program per multiprocessor, each owning class blocks in
            turn: walks the rows, recomputes S, forms dz (the target entry from the per-row value),
            accumulates dW_hat += dz^T x_hat and db += sum_i dz, then the normalization backward of W in
            the epilogue (w_hat . dw_hat = sum_i dc_ij c_ij, accumulated alongside). 2 GEMM-equivalents.
            When the forward ran without the dX / alpha hints (e.g. under no_grad, or the op called
            directly), the backward reruns the forward kernels to get O' / PC (the contract allows it).

Why this design and not a bounded dz workspace with cuBLAS GEMMs (both are 4 GEMM-equivalents): the
memory target leaves little room at C = 131072 (peak extra <= 1.1 x the gradients: 12.9 MiB beyond the
0.126 GiB of gradients), so dz chunks could hold at most ~4096 classes: 32+ chunks of 3-4 launches
each, about 1 ms of host time per step (estimate), more than the whole 1.6x-floor budget (1.09 ms on
the H200 anchors). Here the launch count is constant (forward 3-5, backward 2-4).
The cost of this design is register pressure: the D-wide fp32 accumulator of O' (or dW) is 64 x 512 x 4
= 128 KiB, half the register file, which fixes 64-row (or 64-class) tiles with 8 warps. Compiled for
sm_90 (benchmarks/compile_report.py, no GPU needed; B=1024, D=512, bf16): both main kernels use 255
registers, 136 KiB of shared memory and warpgroup MMA (HGMMA); the forward spills 72-80 bytes, the dW
pass 8 bytes (352 with normalize_weight: in its epilogue). Triton's layout rule for chained products
makes both warpgroups of a 64-row tile compute all of S (twice the HGMMA instructions): the default
tiles pass p through a scratch buffer instead (_through_scratch), whose barrier in turn stops Triton's
software pipelining, so each iteration waits for its W (or x) tile from L2. Estimated time (unmeasured):
at e = the kernels' efficiency relative to cuBLAS, 4 / (3 e) of the floor plus ~0.02-0.05 ms of per-row
kernels: 1.6x at e = 0.85, 1.9x at e = 0.7; e is unknown, and the unpipelined loads make e >= 0.85
unlikely. The alternatives in GPU_CONFIGS, timed by the GPU benchmark: "fused_chained" (pipelined, S
computed twice: 3 GEMM-equivalents of tensor work per pass) and "split_d" (one warpgroup, two programs
per multiprocessor, a 256-wide accumulator chunk per program: S once per chunk, also 3).

Workspace (besides outputs, aux and O(B + C + D) vectors), all bounded independently of C except as noted:
  forward: the class-split partials, n_splits x B x (4 + D) fp32 (4 + 0 without the dX hint), with
    n_splits <= max(1, 2 P / row_blocks), P = SMs x programs resident per SM (num_splits): at most
    (2 P x BLOCK_B + B) x (4 + D) x 4 bytes (H100, B = 1024, D = 512: 16 splits, 32 MiB); the chain-break
    scratch, 2 slots x BLOCK_B x BLOCK_C per program (4.1 MiB there); both freed when the forward returns,
    before the backward allocates dW (also when the backward reruns the forward), so they
    do not set the training step's peak. normalize_weight: 1/|W_j| (C floats); label smoothing: one
    column-sum pass over W (D floats kept in aux).
  backward: per-row values (B x 5 fp32), the dW pass's chain-break scratch (SMs x 2 x 64 x 64 x 2 bytes
    = 2.1 MiB on an H100). The peak of a training step is the gradients + aux (B x (5 + D) x 4 bytes with
    the dX hint) + that.

Precision: every accumulation in fp32. Matrix products take the inputs as stored (bf16, fp16 or fp32,
mixed allowed; W is never copied or cast in memory: tiles are converted in registers):
  bf16 x and W: bf16 tensor-core products; the derived operand (p for O', dz for dW) rounded to bf16,
    as eager bf16 torch rounds its dz (bf16 has fp32's range, so nothing underflows).
  fp16 x and W: fp16 products for S; the derived operands in tf32 (fp16 would underflow p ~ 1/C).
  mixed (e.g. fp32 master W with bf16 features): tf32 (the 16-bit operand is exact in tf32).
  fp32 x and W: IEEE fp32 (as torch's default fp32 matmul), tf32 when
    torch.get_float32_matmul_precision() is "high" or "medium".
Norms, eps, logsumexp, margins and all per-row work in fp32: zero rows give x_hat = 0, never NaN. Norms,
their reciprocals and the per-row divisions use correctly rounded sqrt / division (tl.sqrt_rn, tl.div_rn;
off the hot path): the compiled default is an approximate sqrt that flushes subnormals and a 2-ulp
division, which would differ from the interpreter's (CI's) exact numpy ones.

Index arithmetic is int64 (rows and classes are promoted before multiplying by strides: C x D and
B x C exceed 2^31 at the sizes this serves; D indices too where a non-unit D stride needs it, _didx).
Ragged edges are masked: padded classes get z = -inf, padded rows are zeroed before they can reach a product.

Under the Triton interpreter (CI), two of its gaps are bridged in the kernels, nowhere else: its bf16 dot
multiplies raw bits and its fp32 -> bf16 cast truncates, so bf16 operands and outputs are rounded to
nearest even by hand and multiplied in fp32 (EMU), which reproduces the GPU's arithmetic.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..options import ARCFACE_CLAMP

# @triton.jit returns interpreted functions when TRITON_INTERPRET=1 was set before triton was imported
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

MARGIN_CODES = {"none": 0, "cosface": 1, "arcface": 2}
# _margin writes the arcface clamp as the literal 1e-7 (a constexpr global would also do; a literal reads better)
assert ARCFACE_CLAMP == 1e-7, "update the literal in _margin"

# per-row statistics in aux (columns of the (B, NSTAT) block): c_iy, p_iy, q_i = 1 - p_iy, PC_i, SC_i
NSTAT = 5
# per-split partials of the forward workspace: running max, sum of exp, PC, SC, then O' (D)
NPART = 4
# per-row values the backward's dW kernel reads (columns of a (B, NROWV) buffer):
# 1/|x_i|, w_p, w_t s / C, dz_iy, dloss/dc_iy
NROWV = 5
# the same, as the kernels see them (triton kernels may read only constexpr globals)
_NSTAT = tl.constexpr(NSTAT)
_NPART = tl.constexpr(NPART)
_NROWV = tl.constexpr(NROWV)
ST_CY, ST_PY, ST_Q, ST_PC, ST_SC = (tl.constexpr(i) for i in range(NSTAT))
RV_INVNX, RV_WP, RV_WTS, RV_DZY, RV_DCY = (tl.constexpr(i) for i in range(NROWV))

# aux flag bits (aux.numel() % 8, see aux_layout)
AUX_O, AUX_PC, AUX_WSUM = 1, 2, 4


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _rne_bf16(v):
    """Round fp32 to the nearest bf16 (ties to even), kept in fp32. Only used under the Triton
    interpreter, whose fp32 -> bf16 cast truncates (the GPU's rounds to nearest)."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _operand(a, DT: tl.constexpr, EMU: tl.constexpr):
    """a as a matrix-product operand of dtype DT (0 fp32, 1 fp16, 2 bf16). EMU (interpreter only):
    the interpreter's bf16 dot multiplies raw bits, so bf16 operands are rounded exactly as the GPU
    would and handed to an fp32 dot, which gives the GPU's result (products of bf16 are exact in fp32)."""
    if DT == 2:
        if EMU:
            if a.dtype == tl.bfloat16:
                r = a.to(tl.float32)
            else:
                r = _rne_bf16(a.to(tl.float32))
        else:
            r = a.to(tl.bfloat16)
    elif DT == 1:
        r = a.to(tl.float16)
    else:
        r = a.to(tl.float32)
    return r


@triton.jit
def _mma(a, b, acc, DT: tl.constexpr, TF32: tl.constexpr, EMU: tl.constexpr):
    """acc + a @ b with fp32 accumulation, operands of dtype DT; fp32 operands in tf32 or IEEE."""
    a = _operand(a, DT, EMU)
    b = _operand(b, DT, EMU)
    if DT == 0:
        if TF32:
            r = tl.dot(a, b, acc, input_precision="tf32")
        else:
            r = tl.dot(a, b, acc, input_precision="ieee")
    else:
        r = tl.dot(a, b, acc)
    return r


@triton.jit
def _out(v, ptr, EMU: tl.constexpr):
    """v (fp32) ready to store through ptr: under the interpreter, bf16 outputs are rounded to nearest
    here (its own cast truncates)."""
    if EMU:
        if ptr.dtype.element_ty == tl.bfloat16:
            v = _rne_bf16(v)
    return v


@triton.jit
def _through_scratch(v, u, v_base, u_base, R: tl.constexpr, K: tl.constexpr):
    """v (R x K) and u (R,) written to a program-private scratch slot and read back after a barrier:
    the same values, but Triton no longer sees them flow from one matrix product into the next.
    Triton lays out a product whose result feeds another product (S -> p -> O here) with every warp
    along M; with 64 rows and 8 warps both warpgroups then compute all of S (seen in the compiled
    code: twice the HGMMA instructions). Through memory, S gets warps along N: each warpgroup computes
    half. Callers alternate two slots by iteration parity, so one barrier per iteration suffices: a
    thread writes slot k+2 only after passing the barrier of iteration k+1, which every thread
    reaches only after reading slot k."""
    off = tl.arange(0, R)[:, None] * K + tl.arange(0, K)[None, :]
    tl.store(v_base + off, v)
    tl.store(u_base + tl.arange(0, R), u)
    tl.debug_barrier()
    return tl.load(v_base + off), tl.load(u_base + tl.arange(0, R))


@triton.jit
def _through_scratch2d(v, v_base, R: tl.constexpr, K: tl.constexpr):
    """_through_scratch for a matrix alone."""
    off = tl.arange(0, R)[:, None] * K + tl.arange(0, K)[None, :]
    tl.store(v_base + off, v)
    tl.debug_barrier()
    return tl.load(v_base + off)


@triton.jit
def _prefetch_l1(base, rows, stride_row, D, BLOCK_D: tl.constexpr):
    """Hint the L1 cache to fetch the rows (clamped to valid ones by the caller) of a (rows x D) tile:
    one prefetch per 128-byte line of bf16 (64 elements), a couple per thread. The default tiles'
    scratch barrier stops Triton's software pipelining, so without this each tile's load waits on L2.
    Assumes rows of 2-byte elements with a unit D stride: the launchers enable it only then (_prefetch_ok).
    GPU only (the interpreter has no inline assembly)."""
    ptrs = base + rows[:, None] * stride_row + (tl.arange(0, BLOCK_D // 64) * 64)[None, :]
    ptrs = tl.where((tl.arange(0, BLOCK_D // 64) * 64 < D)[None, :], ptrs, base + rows[:, None] * stride_row)
    tl.inline_asm_elementwise("prefetch.global.L1 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _didx(i, D64: tl.constexpr):
    """A D-axis index ready to multiply a runtime D stride: int64 when D64 (the launchers set it when
    stride x (D - 1) reaches 2^31 elements, e.g. W stored (D, C) and passed as .T: Triton gives a stride
    below 2^31 an i32, so the product would wrap); contiguous rows keep 32-bit offsets."""
    if D64:
        i = i.to(tl.int64)
    return i


@triton.jit
def _log1p(v):
    """log(1 + v) for v in [0, 1], accurate for small v (Goldberg's trick: no libdevice needed, and
    it runs under the interpreter)."""
    w = 1.0 + v
    return tl.where(w == 1.0, v, tl.log(w) * tl.div_rn(v, tl.where(w == 1.0, 1.0, w - 1.0)))


@triton.jit
def _margin(c, MARGIN: tl.constexpr, m, cos_m, sin_m, th, mm):
    """f(c) and f'(c) of the target column (eager.margin_value_and_slope). arcface: cos(theta + m)
    = c~ cos m - sin(theta) sin m with c~ = clamp(c, -1 + 1e-7, 1 - 1e-7), sin(theta) = sqrt(1 - c~^2),
    derivative cos m + c~ sin m / sin(theta) at the clamped point; past c <= cos(pi - m) = th the
    monotonic fallback c - m sin m (mm) with slope 1."""
    one = tl.full(c.shape, 1.0, tl.float32)
    if MARGIN == 0:
        f = c
        fp = one
    elif MARGIN == 1:
        f = c - m
        fp = one
    else:
        cc = tl.minimum(tl.maximum(c, -1.0 + 1e-7), 1.0 - 1e-7)
        sin_t = tl.sqrt_rn(1.0 - cc * cc)
        phi = cc * cos_m - sin_t * sin_m
        dphi = cos_m + tl.div_rn(cc * sin_m, sin_t)
        hard = c > th
        f = tl.where(hard, phi, c - mm)
        fp = tl.where(hard, dphi, one)
    return f, fp


@triton.jit
def _target_info(t, ignore_index, C):
    """valid (not ignored), has a target column (valid and in range), bad (valid, out of range)."""
    valid = t != ignore_index
    in_range = (t >= 0) & (t < C)
    return valid, valid & in_range, valid & (~in_range)


# ----------------------------------------------------------------------------------------------
# small passes: row norms, column sums
# ----------------------------------------------------------------------------------------------
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
    acc = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + _didx(tl.arange(0, BLOCK_D), D64)
        v = tl.load(v_ptr + rows[:, None] * stride_n + d[None, :] * stride_d,
                    mask=rmask[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
        acc += tl.sum(v * v, 1)
    tl.store(out_ptr + rows, tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(acc), eps)), mask=rmask)


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


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_split_kernel(
    x_ptr, w_ptr, b_ptr, alpha_ptr, inv_nx_ptr, inv_nw_ptr, tgt_ptr, ws_ptr,  # pointers
    scr_p_ptr, scr_s_ptr,  # per-program scratch (CHAIN_BREAK): 2 slots of p (BLOCK_B x BLOCK_C), of scale
    B, C, D, ignore_index, cols_per_split,  # sizes; target rule; classes of one split
    stride_xb, stride_xd, stride_wc, stride_wd, stride_b, stride_t,  # input strides
    ws_stride_s, ws_stride_b,  # workspace strides (split, row); the row holds _NPART + D floats
    HAS_BIAS: tl.constexpr, NORM_W: tl.constexpr,
    ACC_O: tl.constexpr, ACC_PC: tl.constexpr, ACC_SC: tl.constexpr,  # what to accumulate besides (max, sum)
    S_DT: tl.constexpr, S_TF32: tl.constexpr, P_DT: tl.constexpr, P_TF32: tl.constexpr, EMU: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
    SINGLE_K: tl.constexpr, REUSE_W: tl.constexpr, CHAIN_BREAK: tl.constexpr, PREFETCH: tl.constexpr,
    D64: tl.constexpr,
):
    """One (row block, class split, D chunk): online logsumexp over the split's non-target columns,
    and the partial O' (the D chunk's columns), PC, SC, each relative to the split's running max."""
    pid_b = tl.program_id(0).to(tl.int64)  # int64 before any product with a stride
    pid_s = tl.program_id(1).to(tl.int64)
    pid_d = tl.program_id(2)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    inv_nx = tl.load(inv_nx_ptr + rows, mask=rmask, other=0.0)
    t = tl.load(tgt_ptr + rows * stride_t, mask=rmask, other=ignore_index)
    _, has_t, _ = _target_info(t, ignore_index, C)
    tcol = tl.where(has_t, t, -1)  # the column each row leaves out (the combine adds it with its margin)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    c_lo = pid_s * cols_per_split
    c_hi = tl.minimum(c_lo + cols_per_split, C)

    dk = _didx(tl.arange(0, BLOCK_K), D64)
    do = _didx(pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO), D64)
    x_rows = x_ptr + rows[:, None] * stride_xb
    if SINGLE_K:  # all of D in one tile: the row block's features stay on chip for the whole walk
        x_tile = tl.load(x_rows + dk[None, :] * stride_xd, mask=rmask[:, None] & (dk[None, :] < D), other=0.0)

    m = tl.full([BLOCK_B], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_B], tl.float32)
    pc = tl.zeros([BLOCK_B], tl.float32)
    sc = tl.zeros([BLOCK_B], tl.float32)
    o = tl.zeros([BLOCK_B, BLOCK_DO], tl.float32)
    prog = (tl.program_id(0).to(tl.int64) * tl.num_programs(1) + pid_s) * tl.num_programs(2) + pid_d
    it = 0
    for c0 in range(c_lo, c_hi, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < c_hi
        w_rows = w_ptr + cols[:, None] * stride_wc
        if PREFETCH:  # the next class tile's weights, into L1 while this one computes
            _prefetch_l1(w_ptr, tl.minimum(cols + BLOCK_C, c_hi - 1), stride_wc, D, BLOCK_K)
        s = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
        if SINGLE_K:
            w_tile = tl.load(w_rows + dk[None, :] * stride_wd, mask=cmask[:, None] & (dk[None, :] < D), other=0.0)
            s = _mma(x_tile, tl.trans(w_tile), s, S_DT, S_TF32, EMU)
        else:
            for k0 in range(0, D, BLOCK_K):
                kk = k0 + dk
                xk = tl.load(x_rows + kk[None, :] * stride_xd, mask=rmask[:, None] & (kk[None, :] < D), other=0.0)
                wk = tl.load(w_rows + kk[None, :] * stride_wd, mask=cmask[:, None] & (kk[None, :] < D), other=0.0)
                s = _mma(xk, tl.trans(wk), s, S_DT, S_TF32, EMU)
        # c = x_hat . W_hat: the raw product scaled by the fp32 inverse norms (no normalized copies)
        c = s * inv_nx[:, None]
        if NORM_W:
            inv_nw = tl.load(inv_nw_ptr + cols, mask=cmask, other=0.0)
            c = c * inv_nw[None, :]
        z = alpha * c
        if HAS_BIAS:
            z += tl.load(b_ptr + cols * stride_b, mask=cmask, other=0.0).to(tl.float32)[None, :]
        keep = cmask[None, :] & (cols[None, :] != tcol[:, None])
        z = tl.where(keep, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet: exp(-inf - 0) = 0
        scale = tl.exp(m - m_use)
        p = tl.exp(z - m_use[:, None])
        l = l * scale + tl.sum(p, 1)
        if ACC_PC:
            pc = pc * scale + tl.sum(tl.where(keep, p * c, 0.0), 1)
        if ACC_SC:
            sc += tl.sum(tl.where(keep, c, 0.0), 1)
        if ACC_O:
            pw = p
            if NORM_W:
                pw = p * inv_nw[None, :]  # p_ij W_hat_j = (p_ij / |W_j|) W_j
            pw = _operand(pw, P_DT, EMU)
            o_scale = scale
            if CHAIN_BREAK:
                slot = it % 2
                pw, o_scale = _through_scratch(pw, scale, scr_p_ptr + (prog * 2 + slot) * (BLOCK_B * BLOCK_C),
                                               scr_s_ptr + (prog * 2 + slot) * BLOCK_B, BLOCK_B, BLOCK_C)
            if REUSE_W:
                wo = w_tile
            else:
                wo = tl.load(w_rows + do[None, :] * stride_wd, mask=cmask[:, None] & (do[None, :] < D), other=0.0)
            o = o * o_scale[:, None]
            o = _mma(pw, wo, o, P_DT, P_TF32, EMU)
        m = m_new
        it += 1

    base = ws_ptr + pid_s * ws_stride_s + rows * ws_stride_b
    if pid_d == 0:
        tl.store(base + 0, m, mask=rmask)
        tl.store(base + 1, l, mask=rmask)
        tl.store(base + 2, pc, mask=rmask)
        tl.store(base + 3, sc, mask=rmask)
    if ACC_O:
        tl.store(base[:, None] + _NPART + do[None, :], o, mask=rmask[:, None] & (do[None, :] < D))


@triton.jit
def _fwd_combine_kernel(
    ws_ptr, x_ptr, w_ptr, b_ptr, alpha_ptr, inv_nx_ptr, inv_nw_ptr, tgt_ptr, bsum_ptr,  # inputs
    loss_ptr, lse_ptr, aux_ptr,  # outputs
    B, C, D, n_splits, ignore_index,  # sizes
    smoothing, inv_C, margin, cos_m, sin_m, th, mm,  # options
    stride_xb, stride_xd, stride_wc, stride_wd, stride_b, stride_t,  # input strides
    ws_stride_s, ws_stride_b, aux_o_off,  # workspace strides; where O' starts in aux
    HAS_BIAS: tl.constexpr, NORM_W: tl.constexpr, MARGIN: tl.constexpr, SMOOTH: tl.constexpr,
    ACC_O: tl.constexpr, ACC_PC: tl.constexpr, D64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per row: merge the splits, add the target column with its margin, write loss, lse and aux."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < B
    t = tl.load(tgt_ptr + rows * stride_t, mask=rmask, other=ignore_index)
    valid, has_t, bad = _target_info(t, ignore_index, C)
    ty = tl.where(has_t, t, 0)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    inv_nx = tl.load(inv_nx_ptr + rows, mask=rmask, other=0.0)

    # logsumexp of the non-target columns, merged over the splits
    mx = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for sp in range(0, n_splits):
        mx = tl.maximum(mx, tl.load(ws_ptr + sp * ws_stride_s + rows * ws_stride_b, mask=rmask, other=0.0))
    mx_use = tl.where(mx == float("-inf"), 0.0, mx)
    l_nt = tl.zeros([BLOCK_R], tl.float32)
    sc = tl.zeros([BLOCK_R], tl.float32)
    for sp in range(0, n_splits):
        base = ws_ptr + sp * ws_stride_s + rows * ws_stride_b
        m_s = tl.load(base, mask=rmask, other=0.0)
        l_nt += tl.exp(m_s - mx_use) * tl.load(base + 1, mask=rmask, other=0.0)
        sc += tl.load(base + 3, mask=rmask, other=0.0)
    lse_nt = mx_use + tl.log(l_nt)  # -inf when every column is the target's or masked

    # the target column: c_iy = x_hat_i . W_hat_y as one fp32 dot per row (reads B rows of W)
    dd = _didx(tl.arange(0, BLOCK_D), D64)
    dot = tl.zeros([BLOCK_R], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + dd
        dm = d[None, :] < D
        xr = tl.load(x_ptr + rows[:, None] * stride_xb + d[None, :] * stride_xd, mask=rmask[:, None] & dm,
                     other=0.0).to(tl.float32)
        wr = tl.load(w_ptr + ty[:, None] * stride_wc + d[None, :] * stride_wd, mask=has_t[:, None] & dm,
                     other=0.0).to(tl.float32)
        dot += tl.sum(xr * wr, 1)
    c_y = dot * inv_nx
    if NORM_W:
        c_y = c_y * tl.load(inv_nw_ptr + ty, mask=has_t, other=0.0)
    f_y, _ = _margin(c_y, MARGIN, margin, cos_m, sin_m, th, mm)
    z_y = alpha * f_y
    if HAS_BIAS:
        z_y += tl.load(b_ptr + ty * stride_b, mask=has_t, other=0.0).to(tl.float32)

    # lse = logaddexp(lse_nt, z_y) and loss_t = lse - z_y = -log p_y, both without cancellation:
    # with d = lse_nt - z_y and v = exp(-|d|) in [0, 1], lse = max + log1p(v), -log p_y = log1p(v) when
    # the target leads (d <= 0), d + log1p(v) otherwise; p_y and q = 1 - p_y are 1/(1+v) and v/(1+v).
    dlt = lse_nt - z_y
    v = tl.exp(-tl.abs(dlt))
    l1p = _log1p(v)
    lead = dlt <= 0.0
    lse_t = tl.where(lead, z_y, lse_nt) + l1p
    lse_t = tl.where(lse_nt == float("-inf"), z_y, lse_t)
    loss_t = tl.where(lead, l1p, dlt + l1p)
    # no non-target column (C = 1, or all masked by -inf): loss 0, unless the target's z is -inf too
    # (every logit -inf): then NaN, as torch's -inf - -inf (dlt is NaN there, and so is loss_t)
    loss_t = tl.where((lse_nt == float("-inf")) & (z_y > float("-inf")), 0.0, loss_t)
    loss_t = tl.where(z_y == float("inf"), float("nan"), loss_t)  # as eager: inf - inf
    p_y = tl.where(lead, tl.div_rn(1.0, 1.0 + v), tl.div_rn(v, 1.0 + v))
    q = tl.where(lead, tl.div_rn(v, 1.0 + v), tl.div_rn(1.0, 1.0 + v))
    lse = tl.where(has_t, lse_t, lse_nt)
    p_y = tl.where(has_t, p_y, 0.0)
    q = tl.where(has_t, q, 1.0)

    loss = loss_t
    if SMOOTH:
        # mean_j z_ij = (alpha (sum_{j != y} c_ij + f(c_iy)) + sum_j b_j) / C
        gsum = sc + tl.where(has_t, f_y, 0.0)
        zsum = alpha * gsum
        if HAS_BIAS:
            zsum += tl.load(bsum_ptr)
        loss = (1.0 - smoothing) * loss_t + smoothing * (lse - zsum * inv_C)
    loss = tl.where(valid, loss, 0.0)
    loss = tl.where(bad, float("nan"), loss)
    tl.store(loss_ptr + rows, loss, mask=rmask)
    tl.store(lse_ptr + rows, lse, mask=rmask)

    # each split's sums are relative to its own max m_s: its weight in p is exp(m_s - lse). A row whose
    # every logit is -inf has lse = -inf and p = exp(-inf - -inf) = NaN, so O' and PC are NaN there
    # (its gradients NaN even when ignored), as in eager.py and torch's log_softmax backward
    pc = tl.zeros([BLOCK_R], tl.float32)
    if ACC_PC:
        for sp in range(0, n_splits):
            base = ws_ptr + sp * ws_stride_s + rows * ws_stride_b
            f_s = tl.exp(tl.load(base, mask=rmask, other=0.0) - lse)
            pc += f_s * tl.load(base + 2, mask=rmask, other=0.0)
    st = aux_ptr + rows * _NSTAT
    tl.store(st + ST_CY, c_y, mask=rmask)
    tl.store(st + ST_PY, p_y, mask=rmask)
    tl.store(st + ST_Q, q, mask=rmask)
    tl.store(st + ST_PC, pc, mask=rmask)
    tl.store(st + ST_SC, sc, mask=rmask)
    if ACC_O:
        for d0 in range(0, D, BLOCK_D):
            d = d0 + dd
            dm = rmask[:, None] & (d[None, :] < D)
            acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
            for sp in range(0, n_splits):
                base = ws_ptr + sp * ws_stride_s + rows * ws_stride_b
                f_s = tl.exp(tl.load(base, mask=rmask, other=0.0) - lse)
                acc += f_s[:, None] * tl.load(base[:, None] + _NPART + d[None, :], mask=dm, other=0.0)
            tl.store(aux_ptr + aux_o_off + rows[:, None] * D + d[None, :], acc, mask=dm)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _bwd_rows_kernel(
    gl_ptr, gs_ptr, x_ptr, w_ptr, alpha_ptr, tgt_ptr, aux_ptr, wsum_ptr,  # inputs
    rowv_ptr, dx_ptr, da_ptr,  # outputs: per-row values for the dW pass, dx, per-row d alpha terms
    B, C, D, ignore_index,  # sizes
    smoothing, inv_C, eps, margin, cos_m, sin_m, th, mm,  # options
    stride_gl, stride_gs, stride_xb, stride_xd, stride_wc, stride_wd, stride_t,  # input strides
    aux_o_off,  # where O' starts in aux
    NORM_W: tl.constexpr, MARGIN: tl.constexpr, SMOOTH: tl.constexpr,
    NEED_X: tl.constexpr, NEED_ALPHA: tl.constexpr, EMU: tl.constexpr, D64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per row: the upstream weights, the target column's dz, dx (from O'), and d alpha's row term."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < B
    t = tl.load(tgt_ptr + rows * stride_t, mask=rmask, other=ignore_index)
    valid, has_t, bad = _target_info(t, ignore_index, C)
    ty = tl.where(has_t, t, 0)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    g_loss = tl.load(gl_ptr + rows * stride_gl, mask=rmask, other=0.0).to(tl.float32)
    g_lse = tl.load(gs_ptr + rows * stride_gs, mask=rmask, other=0.0).to(tl.float32)
    # ignored rows: their loss is the constant 0 (w_t = 0), their lse still has a gradient;
    # rows with an out-of-range target carry NaN, never a plausible gradient
    w_t = tl.where(valid, g_loss, 0.0)
    w_t = tl.where(bad, float("nan"), w_t)
    w_p = w_t + g_lse
    wts = w_t * smoothing * inv_C  # w_t s / C, the smoothing term of every column

    st = aux_ptr + rows * _NSTAT
    c_y = tl.load(st + ST_CY, mask=rmask, other=0.0)
    p_y = tl.load(st + ST_PY, mask=rmask, other=0.0)
    q = tl.load(st + ST_Q, mask=rmask, other=0.0)
    f_y, fp_y = _margin(c_y, MARGIN, margin, cos_m, sin_m, th, mm)
    # dz_iy = w_p p_y - w_t (1 - s + s/C) = -w_t q + g_lse p_y + w_t s (1 - 1/C), with q = 1 - p_y
    # from the non-target mass: exact for confident rows (p_y - 1 would round to 0 in fp32 or bf16)
    dz_y = -w_t * q + g_lse * p_y + w_t * smoothing * (1.0 - inv_C)
    dz_y = tl.where(has_t, dz_y, 0.0)
    dc_y = alpha * dz_y * fp_y  # dloss/dc_iy

    dd = _didx(tl.arange(0, BLOCK_D), D64)
    xsq = tl.zeros([BLOCK_R], tl.float32)
    wsq = tl.zeros([BLOCK_R], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + dd
        dm = d[None, :] < D
        xr = tl.load(x_ptr + rows[:, None] * stride_xb + d[None, :] * stride_xd, mask=rmask[:, None] & dm,
                     other=0.0).to(tl.float32)
        xsq += tl.sum(xr * xr, 1)
        if NEED_X:
            if NORM_W:
                wr = tl.load(w_ptr + ty[:, None] * stride_wc + d[None, :] * stride_wd, mask=has_t[:, None] & dm,
                             other=0.0).to(tl.float32)
                wsq += tl.sum(wr * wr, 1)
    x_norm = tl.sqrt_rn(xsq)
    inv_nx = tl.div_rn(1.0, tl.maximum(x_norm, eps))
    rv = rowv_ptr + rows * _NROWV
    tl.store(rv + RV_INVNX, inv_nx, mask=rmask)
    tl.store(rv + RV_WP, w_p, mask=rmask)
    tl.store(rv + RV_WTS, wts, mask=rmask)
    tl.store(rv + RV_DZY, dz_y, mask=rmask)
    tl.store(rv + RV_DCY, dc_y, mask=rmask)

    if NEED_ALPHA:
        # sum_j dz_ij g_ij (z = alpha g + b): w_p PC - w_t (s/C) SC + dz_y f(c_y)
        pc = tl.load(st + ST_PC, mask=rmask, other=0.0)
        sc = tl.load(st + ST_SC, mask=rmask, other=0.0)
        r = w_p * pc + tl.where(has_t, dz_y * f_y, 0.0)
        if SMOOTH:
            r -= wts * sc
        tl.store(da_ptr + rows, tl.where(rmask, r, 0.0), mask=rmask)

    if NEED_X:
        # dx_hat = alpha [w_p O' - w_t (s/C) Wsum + (w_t s/C + dz_y f'(c_y)) W_hat_y]   (has_t rows)
        co = alpha * w_p
        cy = tl.where(has_t, dc_y, 0.0)
        if SMOOTH:
            cy += tl.where(has_t, alpha * wts, 0.0)
        if NORM_W:
            cy = tl.div_rn(cy, tl.maximum(tl.sqrt_rn(wsq), eps))
        cs = -alpha * wts
        # normalization backward: dx = (dx_hat - x_hat (x_hat . dx_hat)) / |x| where |x| >= eps,
        # dx_hat / eps below (eager.normalize_rows_backward); two sweeps over D
        x_den = tl.maximum(x_norm, eps)
        proj = tl.zeros([BLOCK_R], tl.float32)
        for sweep in tl.static_range(2):
            for d0 in range(0, D, BLOCK_D):
                d = d0 + dd
                dm = rmask[:, None] & (d[None, :] < D)
                xr = tl.load(x_ptr + rows[:, None] * stride_xb + d[None, :] * stride_xd, mask=dm,
                             other=0.0).to(tl.float32)
                # a correctly rounded division of a correctly rounded norm, as eager: D = 1 gives
                # x_hat = +-1 exactly (sqrt_rn(fl(x^2)) = |x|) on the GPU as under the interpreter
                x_hat = tl.div_rn(xr, x_den[:, None])
                o = tl.load(aux_ptr + aux_o_off + rows[:, None] * D + d[None, :], mask=dm, other=0.0)
                wr = tl.load(w_ptr + ty[:, None] * stride_wc + d[None, :] * stride_wd,
                             mask=has_t[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
                g = co[:, None] * o + cy[:, None] * wr
                if SMOOTH:
                    g += cs[:, None] * tl.load(wsum_ptr + d, mask=d < D, other=0.0)[None, :]
                if sweep == 0:
                    proj += tl.sum(x_hat * g, 1)
                else:
                    dx = tl.div_rn(tl.where((x_norm >= eps)[:, None], g - x_hat * proj[:, None], g), x_den[:, None])
                    tl.store(dx_ptr + rows[:, None] * D + d[None, :], _out(dx, dx_ptr, EMU), mask=dm)


@triton.jit
def _bwd_dw_kernel(
    x_ptr, w_ptr, b_ptr, alpha_ptr, tgt_ptr, lse_ptr, rowv_ptr,  # inputs
    dw_ptr, db_ptr,  # outputs (dW contiguous (C, D) in W's dtype, db in the bias dtype)
    scr_p_ptr,  # per-program scratch (CHAIN_BREAK): 2 slots of the dW product's operand (BLOCK_C x BLOCK_B)
    B, C, D, ignore_index, eps, n_cblocks,  # sizes, target rule, eps, class blocks
    stride_xb, stride_xd, stride_wc, stride_wd, stride_b, stride_t, stride_lse,  # input strides
    HAS_BIAS: tl.constexpr, NORM_W: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
    S_DT: tl.constexpr, S_TF32: tl.constexpr, P_DT: tl.constexpr, P_TF32: tl.constexpr, EMU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
    SINGLE_K: tl.constexpr, REUSE_X: tl.constexpr, CHAIN_BREAK: tl.constexpr, PREFETCH: tl.constexpr,
    D64: tl.constexpr,
):
    """Persistent over class blocks (pid, pid + programs, ...), one D chunk per grid column. For each
    class block: walk every row block, recompute S, form dz (the target entry from the per-row value),
    accumulate dW_hat (its D chunk), db and w_hat . dw_hat; then the normalization backward of W."""
    pid_d = tl.program_id(1)
    prog = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + pid_d
    alpha = tl.load(alpha_ptr).to(tl.float32)
    cl = tl.arange(0, BLOCK_C)
    dk = _didx(tl.arange(0, BLOCK_K), D64)
    do = _didx(pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO), D64)
    it = 0
    for cb in range(tl.program_id(0).to(tl.int64), n_cblocks, tl.num_programs(0)):  # int64 induction
        c_lo = cb * BLOCK_C
        cols = c_lo + cl
        cmask = cols < C
        w_rows = w_ptr + cols[:, None] * stride_wc
        if SINGLE_K:  # the class block's weights stay on chip for the whole walk over the rows
            w_tile = tl.load(w_rows + dk[None, :] * stride_wd, mask=cmask[:, None] & (dk[None, :] < D), other=0.0)
        if NORM_W:
            # |W_j| from 64-wide slices (a second read of the block, from L2: a whole fp32 copy of the
            # tile in registers next to the accumulator would spill)
            wsq = tl.zeros([BLOCK_C], tl.float32)
            for k0 in range(0, D, 64):
                kk = k0 + _didx(tl.arange(0, 64), D64)
                wk = tl.load(w_rows + kk[None, :] * stride_wd, mask=cmask[:, None] & (kk[None, :] < D),
                             other=0.0).to(tl.float32)
                wsq += tl.sum(wk * wk, 1)
            w_norm = tl.sqrt_rn(wsq)
            inv_nw = tl.div_rn(1.0, tl.maximum(w_norm, eps))
        if HAS_BIAS:
            bias = tl.load(b_ptr + cols * stride_b, mask=cmask, other=0.0).to(tl.float32)

        acc = tl.zeros([BLOCK_C, BLOCK_DO], tl.float32)
        db = tl.zeros([BLOCK_C], tl.float32)
        proj = tl.zeros([BLOCK_C], tl.float32)
        for r0 in range(0, B, BLOCK_B):
            rows = r0 + tl.arange(0, BLOCK_B).to(tl.int64)
            rmask = rows < B
            x_rows = x_ptr + rows[:, None] * stride_xb
            if PREFETCH:  # the next row tile's features, into L1 while this one computes
                _prefetch_l1(x_ptr, tl.minimum(rows + BLOCK_B, B - 1), stride_xb, D, BLOCK_K)
            rv = rowv_ptr + rows * _NROWV
            inv_nx = tl.load(rv + RV_INVNX, mask=rmask, other=0.0)
            w_p = tl.load(rv + RV_WP, mask=rmask, other=0.0)
            wts = tl.load(rv + RV_WTS, mask=rmask, other=0.0)
            dz_y = tl.load(rv + RV_DZY, mask=rmask, other=0.0)
            dc_y = tl.load(rv + RV_DCY, mask=rmask, other=0.0)
            lse = tl.load(lse_ptr + rows * stride_lse, mask=rmask, other=0.0)
            t = tl.load(tgt_ptr + rows * stride_t, mask=rmask, other=ignore_index)
            _, has_t, _ = _target_info(t, ignore_index, C)
            # the target's column inside this class block, as a small int32 (-1: not in the block)
            t_rel = tl.where(has_t & (t >= c_lo) & (t < c_lo + BLOCK_C), t - c_lo, -1).to(tl.int32)

            # S = x W^T for (rows, classes): rows along the product's M (per-row vectors cost a few
            # registers), the class block's weights as its B operand (they stay in shared memory)
            s = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
            if SINGLE_K:
                x_tile = tl.load(x_rows + dk[None, :] * stride_xd, mask=rmask[:, None] & (dk[None, :] < D),
                                 other=0.0)
                s = _mma(x_tile, tl.trans(w_tile), s, S_DT, S_TF32, EMU)
            else:
                for k0 in range(0, D, BLOCK_K):
                    kk = k0 + dk
                    xk = tl.load(x_rows + kk[None, :] * stride_xd, mask=rmask[:, None] & (kk[None, :] < D),
                                 other=0.0)
                    wk = tl.load(w_rows + kk[None, :] * stride_wd, mask=cmask[:, None] & (kk[None, :] < D),
                                 other=0.0)
                    s = _mma(xk, tl.trans(wk), s, S_DT, S_TF32, EMU)
            c = s * inv_nx[:, None]
            if NORM_W:
                c = c * inv_nw[None, :]
            z = alpha * c
            if HAS_BIAS:
                z += bias[None, :]
            p = tl.exp(z - lse[:, None])
            # dz_ij = w_p p_ij - w_t s/C off the target column, the per-row dz_iy on it; padded rows: 0
            is_t = cl[None, :] == t_rel[:, None]
            dz = tl.where(is_t, dz_y[:, None], w_p[:, None] * p - wts[:, None])
            dz = tl.where(rmask[:, None], dz, 0.0)
            if NEED_B:
                db += tl.sum(dz, 0)
            if NEED_W:
                # dloss/dc_ij = alpha dz_ij, times f'(c_iy) on the target column (dc_y)
                dc = tl.where(is_t, dc_y[:, None], alpha * dz)
                dc = tl.where(rmask[:, None], dc, 0.0)
                if NORM_W:
                    proj += tl.sum(dc * c, 0)  # w_hat_j . dw_hat_j = sum_i dc_ij c_ij
                # dW_hat_j += sum_i dc_ij x_hat_i = sum_i (dc_ij / |x_i|) x_i: raw x rows, scaled derived operand
                a = tl.trans(_operand(dc * inv_nx[:, None], P_DT, EMU))
                if CHAIN_BREAK:
                    slot = it % 2
                    a = _through_scratch2d(a, scr_p_ptr + (prog * 2 + slot) * (BLOCK_B * BLOCK_C), BLOCK_C, BLOCK_B)
                if REUSE_X:
                    xo = x_tile
                else:
                    xo = tl.load(x_rows + do[None, :] * stride_xd, mask=rmask[:, None] & (do[None, :] < D),
                                 other=0.0)
                acc = _mma(a, xo, acc, P_DT, P_TF32, EMU)
            it += 1

        dmask = cmask[:, None] & (do[None, :] < D)
        if NEED_W:
            if NORM_W:
                # dW_j = (dw_hat_j - w_hat_j (w_hat_j . dw_hat_j)) / |W_j| where |W_j| >= eps, dw_hat_j / eps below
                shrink = tl.where(w_norm >= eps, proj * inv_nw * inv_nw, 0.0)
                wo = tl.load(w_rows + do[None, :] * stride_wd, mask=dmask, other=0.0).to(tl.float32)
                acc = acc * inv_nw[:, None] - shrink[:, None] * wo
            tl.store(dw_ptr + cols[:, None] * D + do[None, :], _out(acc, dw_ptr, EMU), mask=dmask)
        if NEED_B:
            if pid_d == 0:
                tl.store(db_ptr + cols, _out(db, db_ptr, EMU), mask=cmask)


# ----------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """Tile sizes of one main kernel. block_k >= D (padded) means one tile spans all of D
    (SINGLE_K); block_do is the D chunk of the O' / dW accumulator (grid dimension when < D)."""

    block_rows: int  # BLOCK_B of the forward, BLOCK_B (rows per step) of the dW pass
    block_cols: int  # BLOCK_C
    block_k: int
    block_do: int
    num_warps: int = 4
    num_stages: int = 2
    chain_break: bool = False  # p / dz through scratch (see _through_scratch)
    prefetch: bool = False  # L1 prefetch of the next tile (GPU, one tile over D, bf16/fp16 rows)
    # programs of this kernel one multiprocessor holds at once (sm_90, from the registers and shared
    # memory benchmarks/compile_report.py reports): sizes the forward grid to whole waves
    ctas_per_sm: int = 1


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def dot_plan(xdt: torch.dtype, wdt: torch.dtype):
    """(S operand dtype code, S in tf32, derived operand dtype code, derived in tf32); see the
    module docstring's "Precision"."""
    if xdt == wdt == torch.bfloat16:
        return 2, False, 2, False
    if xdt == wdt == torch.float16:
        return 1, False, 0, True
    if xdt == wdt == torch.float32:
        tf32 = torch.get_float32_matmul_precision() != "highest"
        return 0, tf32, 0, tf32
    return 0, True, 0, True


def on_gpu(device) -> bool:
    """Compiled kernels on a CUDA device (else the interpreter's small tiles)."""
    return torch.device(device).type == "cuda" and not INTERPRETED


def num_sms(device) -> int | None:
    """Multiprocessors of a CUDA device (host-side, cached by torch: no synchronization)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if on_gpu(device) else None


def _interpreter_config(D: int, C: int) -> Config:
    # small tiles; D > 64 takes the K-loop and D-chunk paths, so the CPU tests cover them. Large C
    # gets wide class tiles: the interpreter's cost is per operation, not per element.
    d_pad = _pow2(D)
    cols = 16 if C <= 1024 else min(2048, _pow2(C // 64))
    return Config(16, cols, d_pad if d_pad <= 64 else 32, d_pad if d_pad <= 64 else 64, chain_break=True)


# GPU tiles, chosen from what the compiler reports for sm_90 (benchmarks/compile_report.py: registers,
# spills, shared memory, HGMMA count) at B=1024, D=512; their speed is unmeasured. A D-wide fp32
# accumulator (64 x 512 = 128 KiB) takes half the register file, which fixes 64-row (or 64-class)
# tiles and 8 warps; see _through_scratch for why chain_break is on.
GPU_CONFIGS = {
    # bf16: S and the accumulator's product both on bf16 tensor cores, one tile spans all of D
    "fused": lambda d: Config(64, 64, d, d, num_warps=8, num_stages=2, chain_break=True),
    # the same with an L1 prefetch of the next tile (the scratch barrier stops software pipelining)
    "fused_prefetch": lambda d: Config(64, 64, d, d, num_warps=8, num_stages=2, chain_break=True, prefetch=True),
    # the same without the scratch: pipelined loads, but both warpgroups compute S
    "fused_chained": lambda d: Config(64, 64, d, d, num_warps=8, num_stages=2, chain_break=False),
    # one warpgroup (no redundant S, no scratch), a K loop of 64 and a 256-wide accumulator chunk per
    # program (S computed once per chunk: 3 GEMM-equivalents per pass), two programs per multiprocessor
    "split_d": lambda d: Config(64, 64, 64, min(d, 256), num_warps=4, num_stages=2, ctas_per_sm=2),
    # logsumexp only (no accumulator): the split kernel DESIGN.md measured at 1.02x cuBLAS's logits
    "lse": lambda d: Config(128, 256, 64, 16, num_warps=8, num_stages=3),
    "lse_fp16": lambda d: Config(128, 128, 64, 16, num_warps=8, num_stages=3),
    # fp32 operands: tf32 takes twice the shared memory of bf16; IEEE runs on the FMA units
    "tf32": lambda d: Config(64, 64, min(d, 64), min(d, 256), num_warps=8, num_stages=2),
    "ieee_fwd": lambda d: Config(32, 32, min(d, 32), min(d, 128), num_warps=4, num_stages=2, ctas_per_sm=3),
    "ieee_dw": lambda d: Config(32, 32, min(d, 32), min(d, 128), num_warps=8, num_stages=2),
}


def forward_config(D: int, xdt, wdt, acc_o: bool, gpu: bool, variant: str | None = None, C: int = 0) -> Config:
    """Tiles of _fwd_split_kernel (variant: a GPU_CONFIGS key, to time the alternatives)."""
    if not gpu:
        return _interpreter_config(D, C)
    d_pad = _pow2(D)
    if variant is not None:
        return GPU_CONFIGS[variant](d_pad)
    s_dt, _, p_dt, p_tf32 = dot_plan(xdt, wdt)
    if s_dt != 0 and not acc_o:
        return GPU_CONFIGS["lse" if s_dt == 2 else "lse_fp16"](d_pad)
    if s_dt == 2:
        return GPU_CONFIGS["fused" if d_pad <= 512 else "split_d"](d_pad)
    if p_dt == 0 and not p_tf32:
        return GPU_CONFIGS["ieee_fwd"](d_pad)
    return GPU_CONFIGS["tf32"](d_pad)


def dw_config(D: int, xdt, wdt, gpu: bool, variant: str | None = None, C: int = 0) -> Config:
    """Tiles of _bwd_dw_kernel (block_rows: rows per step of its walk, block_cols: its classes)."""
    if not gpu:
        return _interpreter_config(D, C)
    d_pad = _pow2(D)
    if variant is not None:
        return GPU_CONFIGS[variant](d_pad)
    s_dt, _, p_dt, p_tf32 = dot_plan(xdt, wdt)
    if s_dt == 2:
        return GPU_CONFIGS["fused" if d_pad <= 512 else "split_d"](d_pad)
    if p_dt == 0 and not p_tf32:
        return GPU_CONFIGS["ieee_dw"](d_pad)
    return GPU_CONFIGS["tf32"](d_pad)


WAVES = 2  # the forward grid: at most this many full waves of resident programs


def num_splits(B: int, C: int, cfg: Config, sms: int | None, n_d: int = 1) -> int:
    """Class splits of the forward grid (row blocks x splits x n_d D chunks): as many as fit in WAVES
    full waves of resident programs (sms x cfg.ctas_per_sm slots), rounded down, so that the grid never
    ends in a partial wave (every program does the same work: a partial wave costs a whole one); at
    least 1, never more than there are class tiles, none empty; 2 under the interpreter (sms None).
    E.g. B = 1024 with the 64-row bf16 tiles on 132 SMs: 16 splits, 256 programs for 264 slots.
    The workspace bound of the module docstring follows: n_splits <= max(1, 2 slots / row_blocks)."""
    row_blocks = triton.cdiv(B, cfg.block_rows)
    tiles = triton.cdiv(C, cfg.block_cols)
    want = 2 if sms is None else (WAVES * sms * cfg.ctas_per_sm) // (row_blocks * n_d)
    want = max(1, min(want, tiles))
    return triton.cdiv(tiles, triton.cdiv(tiles, want))


def d_chunks(D: int, cfg: Config, acc_o: bool) -> int:
    """D chunks of the forward's O' accumulator (its grid's third dimension)."""
    return triton.cdiv(D, min(cfg.block_do, _pow2(D))) if acc_o else 1


def forward_splits(B: int, C: int, D: int, acc_o: bool, cfg: Config, sms: int | None) -> int:
    """num_splits as the forward launcher computes it."""
    return num_splits(B, C, cfg, sms, d_chunks(D, cfg, acc_o))


def dw_programs(sms: int | None) -> int:
    """Programs of the persistent dW pass: one per multiprocessor (its tiles leave room for one),
    3 under the interpreter (so the tests walk several class blocks per program)."""
    return 3 if sms is None else sms


_P_TORCH = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}


def forward_workspace_bytes(B: int, C: int, D: int, acc_o: bool, cfg: Config, sms: int | None) -> int:
    """Bytes of the forward's split partials (the only workspace that grows with B x D)."""
    return forward_splits(B, C, D, acc_o, cfg, sms) * B * (NPART + (D if acc_o else 0)) * 4


# ----------------------------------------------------------------------------------------------
# aux: the forward's saved statistics
# ----------------------------------------------------------------------------------------------
def aux_layout(B: int, D: int, has_o: bool, has_pc: bool, has_wsum: bool):
    """aux is one fp32 vector: [B x NSTAT statistics | B x D O' (has_o) | D sum_j W_hat_j (has_wsum)],
    zero-padded to a multiple of 8, plus `code` (0..7) more elements that record what it holds
    (its numel % 8), so that the backward reads the layout from the shape alone.
    Returns (numel, offset of O', offset of Wsum)."""
    o_off = B * NSTAT
    ws_off = o_off + (B * D if has_o else 0)
    payload = ws_off + (D if has_wsum else 0)
    code = (AUX_O if has_o else 0) | (AUX_PC if has_pc else 0) | (AUX_WSUM if has_wsum else 0)
    return 8 * triton.cdiv(payload, 8) + code, o_off, ws_off


def aux_flags(B: int, D: int, aux: torch.Tensor):
    code = aux.numel() % 8
    flags = bool(code & AUX_O), bool(code & AUX_PC), bool(code & AUX_WSUM)
    if aux.dim() != 1 or aux.dtype != torch.float32 or aux.numel() != aux_layout(B, D, *flags)[0]:
        raise ValueError(
            f"aux of shape {tuple(aux.shape)} ({aux.dtype}) was not produced by the triton forward for B={B}, D={D}"
        )
    return flags


def forward_plan(label_smoothing: float, need_x: bool, need_alpha: bool):
    """(has_o, has_pc, has_wsum): what the forward prepares for the backward's hints."""
    return need_x, need_alpha, need_x and label_smoothing > 0


def aux_meta(x, weight, target, alpha, bias, normalize_weight, margin_type, margin, ignore_index,
             label_smoothing, eps, need_x, need_weight, need_bias, need_alpha):
    """An empty tensor shaped like the aux forward() returns (the fake kernel's aux)."""
    B, D = x.shape
    numel = aux_layout(B, D, *forward_plan(label_smoothing, need_x, need_alpha))[0]
    return x.new_empty((numel,), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _identity(kernel):
    return kernel


def _margin_args(margin_type: str, margin: float):
    """(MARGIN code, m, cos m, sin m, cos(pi - m), m sin m) as the kernels take them."""
    m = float(margin)
    return (MARGIN_CODES[margin_type], m, math.cos(m), math.sin(m), math.cos(math.pi - m), m * math.sin(m))


def _prefetch_ok(cfg: Config, single_k: bool, block_k: int, t: torch.Tensor) -> bool:
    """PREFETCH of the tensor t's rows (W in the forward, x in the dW pass): _prefetch_l1's lines are 64
    elements of 2 bytes along a unit D stride; compiled kernels only."""
    return (cfg.prefetch and single_k and block_k >= 64 and not INTERPRETED and t.stride(1) == 1
            and t.element_size() == 2)


def wide_d(D: int, *tensors) -> bool:
    """Whether a D-axis offset (index x D stride) of one of these (N, D) tensors can reach 2^31
    elements: the kernels' D64 (see _didx)."""
    return any(t is not None and t.stride(1) * (D - 1) >= 2**31 for t in tensors)


def inv_norms(v: torch.Tensor, eps: float, launch=_identity) -> torch.Tensor:
    """1 / max(|v_i|, eps) per row, fp32."""
    N, D = v.shape
    out = torch.empty((N,), device=v.device, dtype=torch.float32)
    if N == 0:
        return out
    BN, BD = 16 if (N <= 4096 or not INTERPRETED) else 1024, min(_pow2(D), 128)
    launch(_inv_norm_kernel)[(triton.cdiv(N, BN),)](v, out, N, D, eps, v.stride(0), v.stride(1),
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
        weight, inv_nw if inv_nw is not None else part, part, C, D, rows_per, weight.stride(0), weight.stride(1),
        NORM_W=inv_nw is not None, D64=wide_d(D, weight), BLOCK_C=BC, BLOCK_D=BD)
    return part.sum(dim=0)


def forward(x, weight, target, alpha, bias, normalize_weight, margin_type, margin, ignore_index,
            label_smoothing, eps, need_x, need_weight, need_bias, need_alpha, *, launch=_identity,
            config: Config | None = None, splits: int | None = None):
    """-> (loss (B,), lse (B,), aux) fp32. launch wraps each kernel (torch.library.wrap_triton inside
    the op); config / splits override the tile sizes and the class splits (tests)."""
    B, D = x.shape
    C = weight.shape[0]
    dev = x.device
    s = float(label_smoothing)
    has_o, has_pc, has_ws = forward_plan(s, need_x, need_alpha)
    numel, o_off, ws_off = aux_layout(B, D, has_o, has_pc, has_ws)
    loss = torch.empty((B,), device=dev, dtype=torch.float32)
    lse = torch.empty((B,), device=dev, dtype=torch.float32)
    aux = torch.zeros((numel,), device=dev, dtype=torch.float32)
    if B == 0:
        return loss, lse, aux

    gpu = on_gpu(dev)
    cfg = config or forward_config(D, x.dtype, weight.dtype, has_o, gpu, C=C)
    s_dt, s_tf32, p_dt, p_tf32 = dot_plan(x.dtype, weight.dtype)
    emu = INTERPRETED
    inv_nx = inv_norms(x, eps, launch)
    inv_nw = inv_norms(weight, eps, launch) if normalize_weight else inv_nx  # (unused when not normalizing)
    d_pad = _pow2(D)
    single_k = cfg.block_k >= d_pad
    block_k = d_pad if single_k else cfg.block_k
    block_do = min(cfg.block_do, d_pad)
    n_d = d_chunks(D, cfg, has_o)
    d64 = wide_d(D, x, weight)
    n_split = splits or num_splits(B, C, cfg, num_sms(dev), n_d)
    tiles = triton.cdiv(C, cfg.block_cols)
    cols_per_split = cfg.block_cols * triton.cdiv(tiles, n_split)
    n_split = triton.cdiv(C, cols_per_split)
    width = NPART + (D if has_o else 0)
    ws = torch.empty((n_split, B, width), device=dev, dtype=torch.float32)
    b_arg = bias if bias is not None else inv_nx
    stride_b = bias.stride(0) if bias is not None else 0
    grid = (triton.cdiv(B, cfg.block_rows), n_split, n_d)
    chain_break = cfg.chain_break and has_o
    n_prog = grid[0] * grid[1] * grid[2] if chain_break else 0
    scr_p = torch.empty((2 * n_prog, cfg.block_rows * cfg.block_cols), device=dev, dtype=_P_TORCH[p_dt])
    scr_s = torch.empty((2 * n_prog, cfg.block_rows), device=dev, dtype=torch.float32)
    launch(_fwd_split_kernel)[grid](
        x, weight, b_arg, alpha, inv_nx, inv_nw, target, ws, scr_p, scr_s,
        B, C, D, ignore_index, cols_per_split,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), stride_b, target.stride(0),
        ws.stride(0), ws.stride(1),
        HAS_BIAS=bias is not None, NORM_W=normalize_weight, ACC_O=has_o, ACC_PC=has_pc, ACC_SC=s > 0,
        S_DT=s_dt, S_TF32=s_tf32, P_DT=p_dt, P_TF32=p_tf32, EMU=emu,
        BLOCK_B=cfg.block_rows, BLOCK_C=cfg.block_cols, BLOCK_K=block_k, BLOCK_DO=block_do,
        SINGLE_K=single_k, REUSE_W=single_k and block_do == block_k, CHAIN_BREAK=chain_break,
        PREFETCH=_prefetch_ok(cfg, single_k, block_k, weight), D64=d64,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    bsum = bias.float().sum() if (bias is not None and s > 0) else inv_nx
    mcode, m, cos_m, sin_m, th, mm = _margin_args(margin_type, margin)
    BR, BD = 16, min(_pow2(D), 64 if INTERPRETED else 128)
    launch(_fwd_combine_kernel)[(triton.cdiv(B, BR),)](
        ws, x, weight, b_arg, alpha, inv_nx, inv_nw, target, bsum,
        loss, lse, aux,
        B, C, D, n_split, ignore_index,
        s, 1.0 / C, m, cos_m, sin_m, th, mm,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), stride_b, target.stride(0),
        ws.stride(0), ws.stride(1), o_off,
        HAS_BIAS=bias is not None, NORM_W=normalize_weight, MARGIN=mcode, SMOOTH=s > 0,
        ACC_O=has_o, ACC_PC=has_pc, D64=d64, BLOCK_R=BR, BLOCK_D=BD)
    if has_ws:
        aux[ws_off:ws_off + D] = column_sum(weight, inv_nw if normalize_weight else None, launch)
    return loss, lse, aux


def backward(grad_loss, grad_lse, x, weight, target, alpha, bias, lse, aux, normalize_weight, margin_type,
             margin, ignore_index, label_smoothing, eps, need_x, need_weight, need_bias, need_alpha, *,
             launch=_identity, config: Config | None = None, fwd_config: Config | None = None):
    """-> (dx, dW, db, dalpha), each in its input's dtype; empty tensors for what is not needed."""
    B, D = x.shape
    C = weight.shape[0]
    dev = x.device
    s = float(label_smoothing)
    need_bias = need_bias and bias is not None
    bdt = bias.dtype if bias is not None else x.dtype

    def outputs():
        return (torch.empty((B, D) if need_x else (0,), device=dev, dtype=x.dtype),
                torch.empty((C, D) if need_weight else (0,), device=dev, dtype=weight.dtype),
                torch.empty((C,) if need_bias else (0,), device=dev, dtype=bdt))

    if B == 0 or not (need_x or need_weight or need_bias or need_alpha):
        dx, dw, db = outputs()
        if need_weight:
            dw.zero_()
        if need_bias:
            db.zero_()
        dalpha = torch.zeros((), device=dev, dtype=alpha.dtype) if need_alpha else alpha.new_empty((0,))
        return dx, dw, db, dalpha

    has_o, has_pc, has_ws = aux_flags(B, D, aux)
    if (need_x and not has_o) or (need_alpha and not has_pc):
        # the forward ran without these hints: rerun it to get O' / PC (ops.py's contract). Before the
        # gradients are allocated: its split partials and scratch are freed when it returns, so they
        # never coexist with dW
        _, _, aux = forward(x, weight, target, alpha, bias, normalize_weight, margin_type, margin, ignore_index,
                            s, eps, need_x, False, False, need_alpha, launch=launch, config=fwd_config)
        has_o, has_pc, has_ws = aux_flags(B, D, aux)
    dx, dw, db = outputs()
    _, o_off, ws_off = aux_layout(B, D, has_o, has_pc, has_ws)
    if need_x and s > 0:
        if has_ws:
            wsum = aux[ws_off:ws_off + D]
        else:
            wsum = column_sum(weight, inv_norms(weight, eps, launch) if normalize_weight else None, launch)
    else:
        wsum = aux

    emu = INTERPRETED
    rowv = torch.empty((B, NROWV), device=dev, dtype=torch.float32)
    da = torch.empty((B,) if need_alpha else (0,), device=dev, dtype=torch.float32)
    mcode, m, cos_m, sin_m, th, mm = _margin_args(margin_type, margin)
    BR, BD = 16, min(_pow2(D), 64 if INTERPRETED else 128)
    launch(_bwd_rows_kernel)[(triton.cdiv(B, BR),)](
        grad_loss, grad_lse, x, weight, alpha, target, aux, wsum,
        rowv, dx if need_x else rowv, da if need_alpha else rowv,
        B, C, D, ignore_index,
        s, 1.0 / C, eps, m, cos_m, sin_m, th, mm,
        grad_loss.stride(0), grad_lse.stride(0), x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        target.stride(0), o_off,
        NORM_W=normalize_weight, MARGIN=mcode, SMOOTH=s > 0, NEED_X=need_x, NEED_ALPHA=need_alpha, EMU=emu,
        D64=wide_d(D, x, weight), BLOCK_R=BR, BLOCK_D=BD)

    if need_weight or need_bias:
        gpu = on_gpu(dev)
        cfg = config or dw_config(D, x.dtype, weight.dtype, gpu, C=C)
        s_dt, s_tf32, p_dt, p_tf32 = dot_plan(x.dtype, weight.dtype)
        d_pad = _pow2(D)
        single_k = cfg.block_k >= d_pad
        block_k = d_pad if single_k else cfg.block_k
        block_do = min(cfg.block_do, d_pad)
        n_d = triton.cdiv(D, block_do) if need_weight else 1
        n_cblocks = triton.cdiv(C, cfg.block_cols)
        programs = min(n_cblocks, dw_programs(num_sms(dev)))
        chain_break = cfg.chain_break and need_weight
        n_prog = programs * n_d if chain_break else 0
        scr_p = torch.empty((2 * n_prog, cfg.block_rows * cfg.block_cols), device=dev, dtype=_P_TORCH[p_dt])
        launch(_bwd_dw_kernel)[(programs, n_d)](
            x, weight, bias if bias is not None else rowv, alpha, target, lse, rowv,
            dw if need_weight else rowv, db if need_bias else rowv, scr_p,
            B, C, D, ignore_index, eps, n_cblocks,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            bias.stride(0) if bias is not None else 0, target.stride(0), lse.stride(0),
            HAS_BIAS=bias is not None, NORM_W=normalize_weight, NEED_W=need_weight, NEED_B=need_bias,
            S_DT=s_dt, S_TF32=s_tf32, P_DT=p_dt, P_TF32=p_tf32, EMU=emu,
            BLOCK_C=cfg.block_cols, BLOCK_B=cfg.block_rows, BLOCK_K=block_k, BLOCK_DO=block_do,
            SINGLE_K=single_k, REUSE_X=single_k and block_do == block_k, CHAIN_BREAK=chain_break,
            PREFETCH=_prefetch_ok(cfg, single_k, block_k, x), D64=wide_d(D, x, weight),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    dalpha = da.sum().to(alpha.dtype) if need_alpha else alpha.new_empty((0,))
    return dx, dw, db, dalpha
