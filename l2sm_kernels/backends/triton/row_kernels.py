"""The GEMM path's Triton row kernels (gemm_path.py runs them between library GEMMs) and their launchers:

  _chunk_stats_kernel   pass 1, per class chunk: reads the chunk's cosines (B x n K, a library GEMM's output),
                        the maximum over sub-centers, the non-target logits and merges each row's statistics
                        (running max, sum of exp, PC, SC; the fused split kernel's partials) online, over the
                        chunks, into a bounded (S, B, NPART) buffer that _fwd_combine_kernel then finishes
  _chunk_dz_kernel      pass 2, per class chunk: the same cosines -> dloss/dc (dz with the target column's
                        margin slope, alpha), written in place (or beside a kept chunk), and db
  _normalize_rows_kernel      v_hat = v / max(|v|, eps) cast to the products' dtype (x once, W per chunk)
  _normalize_backward_kernel  dv = (g - v_hat (v_hat . g)) / max(|v|, eps) (g / eps below eps), cast

Every option the row kernels apply lives in three device functions: _class_cosines (sub-centers: the maximum
and its winner), _nontarget_cos (the non-target transform negatives: g = N(c) and N'(c) on the row's hard
columns, margin._negative, as the fused kernels) and _nontarget_z2 (alpha, bias: the non-target logit in log2
units). A new transform of the non-target logits goes into those (both passes read them); the target column
is the combine's and the rows kernel's (loss_forward.py / loss_backward.py), shared with the fused path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .aux_layout import _NROWV, RV_DCY, RV_DZY, RV_LSE2, RV_WIN, RV_WP, RV_WTS
from .common import _LOG2E, INTERPRETED, _didx, _identity, _out, _subcenter_max, wide_d
from .config import _pow2
from .margin import _negative, _target_info
from .norms import _row_norms


@triton.jit
def _class_cosines(s_ptr, rows, rmask, cols, cmask, stride_sr, SUBC: tl.constexpr):
    """The class cosines of a (rows x chunk-relative classes) tile of a chunk buffer whose row holds
    class j's K sub-center cosines at columns jK .. jK + K - 1: their maximum (ties to the lowest k, NaN
    propagates, as the fused kernels' _subcenter_max) and its k (0 when K = 1), in fp32."""
    m = rmask[:, None] & cmask[None, :]
    base = s_ptr + rows[:, None] * stride_sr
    c = tl.load(base + (cols * SUBC)[None, :], mask=m, other=0.0).to(tl.float32)
    win = tl.zeros(c.shape, tl.int32)
    for k in tl.static_range(1, SUBC):
        c_k = tl.load(base + (cols * SUBC + k)[None, :], mask=m, other=0.0).to(tl.float32)
        c, win = _subcenter_max(c, win, c_k, k)
    return c, win


@triton.jit
def _nontarget_cos(c, neg_ptr, rows, rmask, NEG: tl.constexpr):
    """The non-target transform of class cosines c (rows x classes): (g, dg/dc) = (N(c), N'(c)) on each row's
    hard columns (c > its threshold), (c, 1) elsewhere and when NEG == 0 (none). neg_ptr: the (B, 2) fp32
    [threshold, t] rows of margin.negative_rows; masked rows get threshold +inf (no hard column). The target
    column is transformed too and then dropped by the caller (its logit is the combine's)."""
    if NEG > 0:
        thr = tl.load(neg_ptr + rows * 2, mask=rmask, other=float("inf"))
        t = tl.load(neg_ptr + rows * 2 + 1, mask=rmask, other=0.0)
        return _negative(c, thr, t, NEG)
    return c, tl.full(c.shape, 1.0, tl.float32)


@triton.jit
def _nontarget_z2(c, gcols, cmask, b_ptr, stride_b, a2, HAS_BIAS: tl.constexpr):
    """A non-target logit in log2 units, z2 = log2(e) (alpha c + b) = c a2 + log2(e) b, a2 = alpha log2(e)
    rounded once (the fused kernels' K > 1 form; gcols: the global class indices). Both passes compute the
    non-target logits here, so the statistics of pass 1 and the softmax of pass 2 agree."""
    z = c * a2
    if HAS_BIAS:
        z += tl.load(b_ptr + gcols * stride_b, mask=cmask, other=0.0).to(tl.float32)[None, :] * _LOG2E
    return z


@triton.jit
def _chunk_stats_kernel(
    s_ptr, b_ptr, alpha_ptr, tgt_ptr, ws_ptr,  # pointers: chunk cosines (B, n K), bias, alpha, target, partials
    neg_ptr,  # the non-target transform's (B, 2) fp32 [threshold, t] per row (NEG > 0); else unused
    B, C, c0, n_cols, cols_per_split, ignore_index,  # sizes: the chunk is classes [c0, c0 + n_cols)
    stride_sr, stride_b, stride_t, ws_stride_s, ws_stride_b,  # strides
    HAS_BIAS: tl.constexpr, SUBC: tl.constexpr, FIRST: tl.constexpr,
    NEG: tl.constexpr,  # the non-target transform: 0 none, 1 mv, 2 curricular, 3 filter (margin._negative)
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One (row block, column split) of a chunk: the online logsumexp over the split's non-target classes,
    PC = sum p c and SC = sum c, continued from the split's running partials of the earlier chunks (FIRST:
    the first chunk starts them) and stored back: the split kernel's partials (max in log2 units, the others
    relative to it), so _fwd_combine_kernel merges the S splits as it merges the fused path's. With a
    non-target transform, PC and SC sum g = N(c) (d alpha's and the smoothed loss's terms), as the fused
    split kernel's."""
    pid_r = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < B
    t = tl.load(tgt_ptr + rows * stride_t, mask=rmask, other=ignore_index)
    _, has_t, _ = _target_info(t, ignore_index, C)
    tcol = tl.where(has_t, t - c0, -1)  # chunk-relative target column (the combine adds it with its margin)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    a2 = (alpha.to(tl.float64) * _LOG2E).to(tl.float32)
    lo = pid_s * cols_per_split
    hi = tl.minimum(lo + cols_per_split, n_cols)
    base = ws_ptr + pid_s * ws_stride_s + rows * ws_stride_b
    if FIRST:
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_R], tl.float32)
        pc = tl.zeros([BLOCK_R], tl.float32)
        sc = tl.zeros([BLOCK_R], tl.float32)
    else:
        m = tl.load(base + 0, mask=rmask, other=float("-inf"))
        l = tl.load(base + 1, mask=rmask, other=0.0)
        pc = tl.load(base + 2, mask=rmask, other=0.0)
        sc = tl.load(base + 3, mask=rmask, other=0.0)
    for j0 in range(lo, hi, BLOCK_C):
        cols = j0 + tl.arange(0, BLOCK_C)
        cmask = cols < hi
        c, _win = _class_cosines(s_ptr, rows, rmask, cols, cmask, stride_sr, SUBC)
        c, _slope = _nontarget_cos(c, neg_ptr, rows, rmask, NEG)
        keep = cmask[None, :] & (cols[None, :] != tcol[:, None])
        sc += tl.sum(tl.where(keep, c, 0.0), 1)
        z = _nontarget_z2(c, c0 + cols, cmask, b_ptr, stride_b, a2, HAS_BIAS)
        z = tl.where(keep, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet: exp2(-inf - 0) = 0
        scale = tl.exp2(m - m_use)
        p = tl.exp2(z - m_use[:, None])
        l = l * scale + tl.sum(p, 1)
        pc = pc * scale + tl.sum(tl.where(keep, p * c, 0.0), 1)
        m = m_new
    tl.store(base + 0, m, mask=rmask)
    tl.store(base + 1, l, mask=rmask)
    tl.store(base + 2, pc, mask=rmask)
    tl.store(base + 3, sc, mask=rmask)


@triton.jit
def _chunk_dz_kernel(
    s_ptr, g_ptr, b_ptr, alpha_ptr, tgt_ptr, rowv_ptr, db_ptr,  # chunk cosines in, dloss/dc out (may alias)
    neg_ptr,  # the non-target transform's (B, 2) fp32 [threshold, t] per row (NEG > 0); else unused
    B, C, c0, n_cols, ignore_index,  # sizes: the chunk is classes [c0, c0 + n_cols)
    stride_sr, stride_gr, stride_b, stride_t,  # strides
    HAS_BIAS: tl.constexpr, NEED_B: tl.constexpr, SUBC: tl.constexpr, NEG: tl.constexpr, EMU: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One block of the chunk's classes, walking every row block (so db is one fixed-order column sum):
    p = exp2(z2 - lse2), dz = w_p p - w_t s/C off the target column and the rows kernel's dz_iy on it,
    then dloss/dc = alpha dz (dc_iy = alpha dz_iy f'(c_iy) on the target column) written to g at the
    winning sub-center (0 at the others; the target column's winner is the forward's). A program reads
    all K columns of its classes before writing them, so g may be the chunk buffer itself. With a
    non-target transform the logit is alpha N(c) + b and dloss/dc = alpha dz N'(c) off the target column."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < n_cols
    alpha = tl.load(alpha_ptr).to(tl.float32)
    a2 = (alpha.to(tl.float64) * _LOG2E).to(tl.float32)
    db = tl.zeros([BLOCK_C], tl.float32)
    for r0 in range(0, B, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        rmask = rows < B
        rv = rowv_ptr + rows * _NROWV
        w_p = tl.load(rv + RV_WP, mask=rmask, other=0.0)
        wts = tl.load(rv + RV_WTS, mask=rmask, other=0.0)
        dz_y = tl.load(rv + RV_DZY, mask=rmask, other=0.0)
        dc_y = tl.load(rv + RV_DCY, mask=rmask, other=0.0)
        lse2 = tl.load(rv + RV_LSE2, mask=rmask, other=0.0)
        t = tl.load(tgt_ptr + rows * stride_t, mask=rmask, other=ignore_index)
        _, has_t, _ = _target_info(t, ignore_index, C)
        t_rel = tl.where(has_t & (t >= c0) & (t < c0 + n_cols), t - c0, -1)
        c, win = _class_cosines(s_ptr, rows, rmask, cols, cmask, stride_sr, SUBC)
        c, slope = _nontarget_cos(c, neg_ptr, rows, rmask, NEG)
        z = _nontarget_z2(c, c0 + cols, cmask, b_ptr, stride_b, a2, HAS_BIAS)
        p = tl.exp2(z - lse2[:, None])
        is_t = cols[None, :] == t_rel[:, None]
        live = rmask[:, None] & cmask[None, :]
        dz = tl.where(is_t, dz_y[:, None], w_p[:, None] * p - wts[:, None])
        dz = tl.where(live, dz, 0.0)
        if NEED_B:
            db += tl.sum(dz, 0)
        if NEG > 0:  # dz/dc_ij = alpha N'(c_ij) off the target column
            dc = tl.where(is_t, dc_y[:, None], alpha * dz * slope)
        else:
            dc = tl.where(is_t, dc_y[:, None], alpha * dz)
        dc = tl.where(live, dc, 0.0)
        out = g_ptr + rows[:, None] * stride_gr
        if SUBC == 1:
            tl.store(out + cols[None, :], _out(dc, g_ptr, EMU), mask=live)
        else:
            win_y = tl.load(rv + RV_WIN, mask=rmask, other=0.0).to(tl.int32)
            win = tl.where(is_t, win_y[:, None], win)
            for k in tl.static_range(SUBC):
                tl.store(out + (cols * SUBC + k)[None, :], _out(tl.where(win == k, dc, 0.0), g_ptr, EMU), mask=live)
    if NEED_B:
        tl.store(db_ptr + c0 + cols, _out(db, db_ptr, EMU), mask=cmask)


@triton.jit
def _normalize_rows_kernel(
    v_ptr, out_ptr,  # pointers: (N, D) input, (N, D) output (contiguous)
    N, D, eps,  # sizes, eps
    stride_n, stride_d,  # strides of v
    NORM: tl.constexpr, D64: tl.constexpr, EMU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out_i = v_i / max(|v_i|, eps) (NORM; else v_i), a correctly rounded division of the norm taken in
    fp64 (norms.py), cast to out's dtype (the products' operand dtype; bf16 rounded to nearest)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    if NORM:
        den = tl.maximum(_row_norms(v_ptr + rows * stride_n, rmask, D, stride_d, D64, BLOCK_D), eps)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + _didx(tl.arange(0, BLOCK_D), D64)
        dm = rmask[:, None] & (d[None, :] < D)
        v = tl.load(v_ptr + rows[:, None] * stride_n + d[None, :] * stride_d, mask=dm, other=0.0).to(tl.float32)
        if NORM:
            v = tl.div_rn(v, den[:, None])
        tl.store(out_ptr + rows[:, None] * D + d[None, :], _out(v, out_ptr, EMU), mask=dm)


@triton.jit
def _normalize_backward_kernel(
    v_ptr, g_ptr, out_ptr,  # pointers: (N, D) input v, gradient w.r.t. v_hat (contiguous), output (contiguous)
    N, D, eps,  # sizes, eps
    stride_n, stride_d,  # strides of v
    NORM: tl.constexpr, D64: tl.constexpr, EMU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dv = (g - v_hat (v_hat . g)) / |v| where |v| >= eps, g / eps below (eager.normalize_rows_backward);
    NORM off: dv = g. Two sweeps over D; out may be g itself (each element is read before it is written,
    by the same program)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    if NORM:
        norm = _row_norms(v_ptr + rows * stride_n, rmask, D, stride_d, D64, BLOCK_D)
        den = tl.maximum(norm, eps)
        proj = tl.zeros([BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + _didx(tl.arange(0, BLOCK_D), D64)
            dm = rmask[:, None] & (d[None, :] < D)
            v_hat = tl.div_rn(tl.load(v_ptr + rows[:, None] * stride_n + d[None, :] * stride_d, mask=dm,
                                      other=0.0).to(tl.float32), den[:, None])
            g0 = tl.load(g_ptr + rows[:, None] * D + d[None, :], mask=dm, other=0.0).to(tl.float32)
            proj += tl.sum(v_hat * g0, 1)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + _didx(tl.arange(0, BLOCK_D), D64)
        dm = rmask[:, None] & (d[None, :] < D)
        g = tl.load(g_ptr + rows[:, None] * D + d[None, :], mask=dm, other=0.0).to(tl.float32)
        if NORM:
            v_hat = tl.div_rn(tl.load(v_ptr + rows[:, None] * stride_n + d[None, :] * stride_d, mask=dm,
                                      other=0.0).to(tl.float32), den[:, None])
            g = tl.div_rn(tl.where((norm >= eps)[:, None], g - v_hat * proj[:, None], g), den[:, None])
        tl.store(out_ptr + rows[:, None] * D + d[None, :], _out(g, out_ptr, EMU), mask=dm)


# ------------------------------------------------------------------------------------------ launchers
def _norm_tiles(N: int, D: int) -> tuple[int, int]:
    return (16 if (N <= 4096 or not INTERPRETED) else 256), min(_pow2(D), 128)


def normalize_rows(v: torch.Tensor, out: torch.Tensor, eps: float, normalize: bool, launch=_identity) -> torch.Tensor:
    """out (contiguous (N, D), the operand dtype) = v / max(|v|, eps) per row (normalize), else v, cast."""
    N, D = v.shape
    if N:
        BN, BD = _norm_tiles(N, D)
        launch(_normalize_rows_kernel)[(triton.cdiv(N, BN),)](
            v_ptr=v, out_ptr=out, N=N, D=D, eps=eps, stride_n=v.stride(0), stride_d=v.stride(1), NORM=normalize,
            D64=wide_d(D, v), EMU=INTERPRETED, BLOCK_N=BN, BLOCK_D=BD)
    return out


def normalize_backward(v: torch.Tensor, g: torch.Tensor, out: torch.Tensor, eps: float, normalize: bool,
                       launch=_identity) -> torch.Tensor:
    """out (contiguous, v's gradient dtype) = the normalization backward of g (contiguous) at v."""
    N, D = v.shape
    if N:
        BN, BD = _norm_tiles(N, D)
        launch(_normalize_backward_kernel)[(triton.cdiv(N, BN),)](
            v_ptr=v, g_ptr=g, out_ptr=out, N=N, D=D, eps=eps, stride_n=v.stride(0), stride_d=v.stride(1),
            NORM=normalize, D64=wide_d(D, v), EMU=INTERPRETED, BLOCK_N=BN, BLOCK_D=BD)
    return out


def chunk_stats(s, bias, alpha, target, ws, *, C, c0, n_cols, ignore_index, subcenters, first, block_rows,
                block_cols, num_warps=4, launch=_identity, neg_rows=None, neg=0):
    """_chunk_stats_kernel over a chunk (s: (B, n_cols K) cosines) into the (S, B, NPART) partials. neg: the
    non-target transform's code (margin.NEGATIVES_CODES), neg_rows its (B, 2) rows (margin.negative_rows)."""
    n_split = ws.shape[0]
    B = s.shape[0]
    cols_per_split = block_cols * triton.cdiv(triton.cdiv(n_cols, block_cols), n_split)
    launch(_chunk_stats_kernel)[(triton.cdiv(B, block_rows), n_split)](
        s_ptr=s, b_ptr=bias if bias is not None else ws, alpha_ptr=alpha, tgt_ptr=target, ws_ptr=ws,
        neg_ptr=neg_rows if neg else ws,
        B=B, C=C, c0=c0, n_cols=n_cols, cols_per_split=cols_per_split, ignore_index=ignore_index,
        stride_sr=s.stride(0), stride_b=bias.stride(0) if bias is not None else 0, stride_t=target.stride(0),
        ws_stride_s=ws.stride(0), ws_stride_b=ws.stride(1), HAS_BIAS=bias is not None, SUBC=subcenters,
        FIRST=first, NEG=neg, BLOCK_R=block_rows, BLOCK_C=block_cols, num_warps=num_warps)


def chunk_dz(s, g, bias, alpha, target, rowv, db, *, C, c0, n_cols, ignore_index, subcenters, block_rows,
             block_cols, num_warps=4, launch=_identity, neg_rows=None, neg=0):
    """_chunk_dz_kernel over a chunk: g (B, n_cols K) = dloss/dc from the cosines s (g may be s); db's
    entries [c0, c0 + n_cols) when db is given. Its grid is the chunk's class blocks only (each walks every
    row), so the class block is a quarter of block_cols: 512 programs for a 32768-class chunk at 256."""
    block_cols = max(16, block_cols // 4)
    B = s.shape[0]
    launch(_chunk_dz_kernel)[(triton.cdiv(n_cols, block_cols),)](
        s_ptr=s, g_ptr=g, b_ptr=bias if bias is not None else rowv, alpha_ptr=alpha, tgt_ptr=target, rowv_ptr=rowv,
        db_ptr=db if db is not None else rowv, neg_ptr=neg_rows if neg else rowv,
        B=B, C=C, c0=c0, n_cols=n_cols, ignore_index=ignore_index,
        stride_sr=s.stride(0), stride_gr=g.stride(0), stride_b=bias.stride(0) if bias is not None else 0,
        stride_t=target.stride(0), HAS_BIAS=bias is not None, NEED_B=db is not None, SUBC=subcenters, NEG=neg,
        EMU=INTERPRETED, BLOCK_R=block_rows, BLOCK_C=block_cols, num_warps=num_warps)
