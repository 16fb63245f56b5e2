"""The triton forward: _fwd_split_kernel (row blocks x class splits: online logsumexp and O'),
_fwd_combine_kernel (per row: merge the splits, the target column and its margin, loss / lse / aux),
and their launcher forward(). The derivation of every term is in this package's __init__ docstring."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .aux_layout import (_NPART, _NSTAT, NPART, ST_CY, ST_LSE2, ST_PC, ST_PY, ST_Q, ST_SC, ST_WIN, aux_layout,
                         forward_plan, layout_k)
from .common import (_LN2, _LOG2E, _didx, _identity, _log1p, _mma, _operand, _prefetch_l1, _subcenter_max,
                     _through_scratch, wide_d)
from .config import (P_TORCH, Config, d_chunks, forward_config, num_sms, num_splits, on_gpu, row_tiles, tile_meta,
                     tma_descriptor)
from .margin import NEGATIVES_CODES, _margin, _negative, _row_preamble, _target_info, margin_args, negative_rows
from .norms import column_sum, inv_norms


@triton.jit
def _fwd_split_kernel(
    x_ptr, w_ptr, b_ptr, alpha_ptr, inv_nx_ptr, inv_nw_ptr, tgt_ptr, ws_ptr,  # pointers
    neg_ptr,  # the non-target transform's (B, 2) fp32 [threshold, t] per row (NEG > 0); else unused
    w_desc,  # TMA: W's tensor descriptor (BLOCK_C x BLOCK_K blocks); else unused
    scr_p_ptr, scr_s_ptr,  # per-program scratch (CHAIN_BREAK): 2 slots of p (BLOCK_B x BLOCK_C), of scale
    B, C, D, ignore_index, cols_per_split,  # sizes (C classes, C x SUBC rows of W); target rule; classes of one split
    stride_xb, stride_xd, stride_wc, stride_wd, stride_b, stride_t,  # input strides
    ws_stride_s, ws_stride_b,  # workspace strides (split, row); the row holds _NPART + D floats
    HAS_BIAS: tl.constexpr, NORM_W: tl.constexpr,
    ACC_O: tl.constexpr, ACC_PC: tl.constexpr, ACC_SC: tl.constexpr,  # what to accumulate besides (max, sum)
    SUBC: tl.constexpr, ONES: tl.constexpr,  # sub-centers per class; ONES: weight 1 instead of p (see below)
    NEG: tl.constexpr,  # the non-target transform: 0 none, 1 mv, 2 curricular, 3 filter (margin._negative)
    S_DT: tl.constexpr, S_TF32: tl.constexpr, P_DT: tl.constexpr, P_TF32: tl.constexpr, EMU: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
    SINGLE_K: tl.constexpr, REUSE_TILE: tl.constexpr, CHAIN_BREAK: tl.constexpr, PREFETCH: tl.constexpr,
    TMA: tl.constexpr, D64: tl.constexpr,
):
    """One (row block, class split, D chunk): online logsumexp over the split's non-target columns,
    and the partial O' (the D chunk's columns), PC, SC, each relative to the split's running max.

    Sub-centers (SUBC = K > 1): per class tile, K products (sub-center k's rows of W, jK + k, at row
    stride K), their elementwise maximum and its argmax (win; ties to the lowest k), the logsumexp over
    the class cosines, and O' = sum_k (p masked to the columns k won) @ W_hat_k: K products again, W_k
    reloaded (a tile of all of D per sub-center cannot stay on chip). ONES (only with K > 1, label
    smoothing and the dX hint): no softmax, weight 1 on every non-target column, so O' becomes
    sum_{j != y_i} W_hat_{j, win(i, j)}, label smoothing's dX term (no longer one column sum).

    The non-target transform (NEG > 0): the cosine c (with its row factor 1/|x_i|, as for K > 1)
    becomes g = N(c) on the row's hard columns (c > its threshold) before the scale; PC and SC sum g
    (d alpha's and the smoothed loss's terms), O' weighs W_hat_j by p_ij N'(c_ij) (dloss/dc_ij), and
    ONES (with label smoothing and the dX hint, for any K) by N'(c_ij) alone."""
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
    # logits in log2 units, z2 = log2(e) z, so that p = exp2(z2 - m2) (exp would multiply by log2(e) per
    # element). K = 1: alpha, log2(e) and 1/|x_i| folded into one per-row scale rounded once from fp64,
    # z2_ij = (s_ij [/ |W_j|]) rs_i (+ log2(e) b_j): as many roundings per element as alpha (s / |x_i|)
    # had. K > 1 keeps the cosine (the maximum over the sub-centers is taken on it) and scales it by a2.
    a2 = (alpha.to(tl.float64) * _LOG2E).to(tl.float32)
    rs = (alpha.to(tl.float64) * _LOG2E * inv_nx.to(tl.float64)).to(tl.float32)
    c_lo = pid_s * cols_per_split
    c_hi = tl.minimum(c_lo + cols_per_split, C)
    if NEG > 0:
        n_thr = tl.load(neg_ptr + rows * 2, mask=rmask, other=float("inf"))
        n_t = tl.load(neg_ptr + rows * 2 + 1, mask=rmask, other=0.0)

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
        if PREFETCH:  # the next class tile's weights, into L1 while this one computes
            _prefetch_l1(w_ptr, tl.minimum(cols + BLOCK_C, c_hi - 1) * SUBC, stride_wc, D, BLOCK_K)
        # c = x_hat . W_hat: the raw product scaled by the fp32 inverse norms (no normalized copies);
        # with sub-centers the maximum over the class's K rows of W
        if SUBC == 1:
            w_rows = w_ptr + cols[:, None] * stride_wc
            s = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
            if SINGLE_K:
                if TMA:  # global -> shared memory by the copy engine; rows >= C and columns >= D read as 0 (a
                    # tile never crosses a split's end before C: splits are whole tiles)
                    w_tile = w_desc.load([tl.cast(c0, tl.int32), 0])
                else:
                    w_tile = tl.load(w_rows + dk[None, :] * stride_wd, mask=cmask[:, None] & (dk[None, :] < D),
                                     other=0.0)
                s = _mma(x_tile, tl.trans(w_tile), s, S_DT, S_TF32, EMU)
            else:
                for k0 in range(0, D, BLOCK_K):
                    kk = k0 + dk
                    xk = tl.load(x_rows + kk[None, :] * stride_xd, mask=rmask[:, None] & (kk[None, :] < D), other=0.0)
                    wk = tl.load(w_rows + kk[None, :] * stride_wd, mask=cmask[:, None] & (kk[None, :] < D), other=0.0)
                    s = _mma(xk, tl.trans(wk), s, S_DT, S_TF32, EMU)
            # c_ij = cs_ij / |x_i|: the row factor stays out of the per-element work (folded into rs; PC and
            # SC are sums over j, scaled by 1/|x_i| once after the loop)
            c = s
            if NORM_W:
                inv_nw = tl.load(inv_nw_ptr + cols, mask=cmask, other=0.0)
                c = c * inv_nw[None, :]
        else:
            c = tl.full([BLOCK_B, BLOCK_C], float("-inf"), tl.float32)
            if ACC_O:
                win = tl.zeros([BLOCK_B, BLOCK_C], tl.int32)
            for k in range(SUBC):  # a runtime loop: unrolled, the K products' tiles would be live at once
                w_rows = w_ptr + (cols * SUBC + k)[:, None] * stride_wc
                s = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
                if SINGLE_K:
                    wt = tl.load(w_rows + dk[None, :] * stride_wd, mask=cmask[:, None] & (dk[None, :] < D), other=0.0)
                    s = _mma(x_tile, tl.trans(wt), s, S_DT, S_TF32, EMU)
                else:
                    for k0 in range(0, D, BLOCK_K):
                        kk = k0 + dk
                        xk = tl.load(x_rows + kk[None, :] * stride_xd, mask=rmask[:, None] & (kk[None, :] < D),
                                     other=0.0)
                        wk = tl.load(w_rows + kk[None, :] * stride_wd, mask=cmask[:, None] & (kk[None, :] < D),
                                     other=0.0)
                        s = _mma(xk, tl.trans(wk), s, S_DT, S_TF32, EMU)
                c_k = s * inv_nx[:, None]
                if NORM_W:
                    c_k = c_k * tl.load(inv_nw_ptr + cols * SUBC + k, mask=cmask, other=0.0)[None, :]
                if ACC_O:  # the winner matters only to O' (p W_hat_{j, win})
                    c, win = _subcenter_max(c, win, c_k, k)
                else:
                    c, _no_win = _subcenter_max(c, c, c_k, k)
        if NEG > 0:  # g = N(c) of the true cosine (K = 1: with its row factor); slope N'(c) for O'
            if SUBC == 1:
                c = c * inv_nx[:, None]
            c, slope = _negative(c, n_thr, n_t, NEG)
        if ONES:
            keep = cmask[None, :] & (cols[None, :] != tcol[:, None])
            if NEG > 0:
                p = tl.where(keep, slope, 0.0)
            else:
                p = tl.where(keep, 1.0, 0.0)
            scale = tl.full([BLOCK_B], 1.0, tl.float32)
        else:
            keep = cmask[None, :] & (cols[None, :] != tcol[:, None])
            if ACC_SC and not ACC_O:  # the lse-only tiles: before z, so c's registers are free once z is
                sc += tl.sum(tl.where(keep, c, 0.0), 1)  # formed (after it, 688 B spilled per class tile)
            if SUBC == 1 and NEG == 0:
                z = c * rs[:, None]
            else:
                z = c * a2
            if HAS_BIAS:
                z += tl.load(b_ptr + cols * stride_b, mask=cmask, other=0.0).to(tl.float32)[None, :] * _LOG2E
            z = tl.where(keep, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, 1))  # the running max, log2 units
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet: exp2(-inf - 0) = 0
            scale = tl.exp2(m - m_use)
            p = tl.exp2(z - m_use[:, None])
            l = l * scale + tl.sum(p, 1)
            if ACC_PC:
                pc = pc * scale + tl.sum(tl.where(keep, p * c, 0.0), 1)
            if ACC_SC and ACC_O:  # (here, the O' tiles' loop is 25 instructions shorter than with the above)
                sc += tl.sum(tl.where(keep, c, 0.0), 1)
            m = m_new
        if ACC_O:
            if NEG > 0 and not ONES:  # dloss/dc_ij carries N'(c_ij)
                p = p * slope
            if SUBC == 1:
                pw = p
                if NORM_W:
                    pw = p * inv_nw[None, :]  # p_ij W_hat_j = (p_ij / |W_j|) W_j
                pw = _operand(pw, P_DT, EMU)
                o_scale = scale
                if CHAIN_BREAK:
                    slot = it % 2
                    pw, o_scale = _through_scratch(pw, scale, scr_p_ptr + (prog * 2 + slot) * (BLOCK_B * BLOCK_C),
                                                   scr_s_ptr + (prog * 2 + slot) * BLOCK_B, BLOCK_B, BLOCK_C)
                if REUSE_TILE:
                    wo = w_tile
                else:
                    wo = tl.load(w_rows + do[None, :] * stride_wd, mask=cmask[:, None] & (do[None, :] < D), other=0.0)
                o = o * o_scale[:, None]
                o = _mma(pw, wo, o, P_DT, P_TF32, EMU)
            else:
                for k in range(SUBC):  # p_ij W_hat_{j, win(i, j)} = sum_k [win = k] p_ij W_hat_{jK+k}
                    w_rows = w_ptr + (cols * SUBC + k)[:, None] * stride_wc
                    pw = tl.where(win == k, p, 0.0)
                    if NORM_W:
                        pw = pw * tl.load(inv_nw_ptr + cols * SUBC + k, mask=cmask, other=0.0)[None, :]
                    pw = _operand(pw, P_DT, EMU)
                    o_scale = scale
                    if CHAIN_BREAK:  # one scratch round trip per product; consecutive trips alternate slots
                        slot = (it * SUBC + k) % 2
                        pw, o_scale = _through_scratch(pw, scale,
                                                       scr_p_ptr + (prog * 2 + slot) * (BLOCK_B * BLOCK_C),
                                                       scr_s_ptr + (prog * 2 + slot) * BLOCK_B, BLOCK_B, BLOCK_C)
                    o = o * tl.where(k == 0, o_scale, 1.0)[:, None]
                    wo = tl.load(w_rows + do[None, :] * stride_wd, mask=cmask[:, None] & (do[None, :] < D), other=0.0)
                    o = _mma(pw, wo, o, P_DT, P_TF32, EMU)
        it += 1

    if SUBC == 1 and NEG == 0:  # the row factor of c_ij = cs_ij / |x_i| (NEG: already in g)
        pc = pc * inv_nx
        sc = sc * inv_nx
    base = ws_ptr + pid_s * ws_stride_s + rows * ws_stride_b
    if pid_d == 0:  # m in log2 units (the combine converts in fp64)
        tl.store(base + 0, m, mask=rmask)
        tl.store(base + 1, l, mask=rmask)
        tl.store(base + 2, pc, mask=rmask)
        tl.store(base + 3, sc, mask=rmask)
    if ACC_O:
        tl.store(base[:, None] + _NPART + do[None, :], o, mask=rmask[:, None] & (do[None, :] < D))


@triton.jit
def _split_weight(m2, lse64):
    """exp(m - lse), a split's weight in p, from its max m2 = log2(e) m (log2 units) and the fp64 lse;
    the difference formed in fp64 (no rounding of m2 ln 2 or of lse before the cancellation)."""
    return tl.exp((m2.to(tl.float64) * _LN2 - lse64).to(tl.float32))


@triton.jit
def _fwd_combine_kernel(
    ws_ptr, x_ptr, w_ptr, b_ptr, alpha_ptr, tgt_ptr, bsum_ptr,  # inputs
    mt_ptr, smooth_ptr,  # the margin table (float64, R x 5), the label smoothing (0-d)
    loss_ptr, lse_ptr, aux_ptr,  # outputs
    B, C, D, n_splits, ignore_index, inv_C, eps,  # sizes, options
    stride_xb, stride_xd, stride_wc, stride_wd, stride_b, stride_t,  # input strides
    stride_mr, stride_mc,  # margin table strides (row stride 0: one row for every row)
    ws_stride_s, ws_stride_b, aux_o_off,  # workspace strides; where O' starts in aux
    HAS_BIAS: tl.constexpr, NORM_W: tl.constexpr, MARGIN: tl.constexpr, DETACHED: tl.constexpr,
    SMOOTH: tl.constexpr, SUBC: tl.constexpr, ACC_O: tl.constexpr, ACC_PC: tl.constexpr, D64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per row: merge the splits, add the target column with its margin, write loss, lse and aux.

    Grid (row blocks, D chunks of BLOCK_D): each program merges its chunk of O' (the bulk of the bytes:
    n_splits x BLOCK_R x BLOCK_D fp32); the per-row scalars (the splits' maxima and sums, the target column)
    are computed by every chunk's program alike and written by chunk 0's."""
    if ACC_O:
        first = tl.program_id(1) == 0  # the program of D chunk 0 writes the per-row results
    else:
        first = True  # one chunk: a compile-time branch
    rows, rmask, valid, has_t, bad, ty, alpha = _row_preamble(tgt_ptr, alpha_ptr, B, C, ignore_index, stride_t,
                                                              BLOCK_R)

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
        l_nt += tl.exp2(m_s - mx_use) * tl.load(base + 1, mask=rmask, other=0.0)
        sc += tl.load(base + 3, mask=rmask, other=0.0)
    # the splits' maxima are in log2 units (exp2, see the split kernel): lse_nt back in natural units in fp64,
    # where it stays until lse and every quantity derived from it are formed (rounding mx ln 2 to fp32 would
    # put up to half an ulp of |lse| (3e-5 at alpha = 1000) into every p). -inf when every column is the
    # target's or masked
    lse_nt64 = mx_use.to(tl.float64) * _LN2 + tl.log(l_nt).to(tl.float64)
    lse_nt = lse_nt64.to(tl.float32)

    # the target column: c_iy = x_i . W_y / (max(|x_i|, eps) max(|W_y|, eps)) from one dot and the two
    # norms per row, all in fp64 and rounded to fp32 once (reads B rows of W): within half an ulp, because
    # the angular margin amplifies c's error (its slope's derivative ~ sin m2 / sin^3 theta grows near
    # c = -1 and c = 1), and c = 1 exactly where x is a multiple of W_y. Sub-centers: the maximum over
    # the class's K rows yK + k (compared in fp64; ties to the lowest k), its k recorded for the backward.
    dd = _didx(tl.arange(0, BLOCK_D), D64)
    for k in tl.static_range(SUBC):
        wy = ty * SUBC + k
        dot = tl.zeros([BLOCK_R], tl.float64)
        wsq = tl.zeros([BLOCK_R], tl.float64)
        if k == 0:
            xsq = tl.zeros([BLOCK_R], tl.float64)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + dd
            dm = d[None, :] < D
            xr = tl.load(x_ptr + rows[:, None] * stride_xb + d[None, :] * stride_xd, mask=rmask[:, None] & dm,
                         other=0.0).to(tl.float64)
            wr = tl.load(w_ptr + wy[:, None] * stride_wc + d[None, :] * stride_wd, mask=has_t[:, None] & dm,
                         other=0.0).to(tl.float64)
            dot += tl.sum(xr * wr, 1)
            if k == 0:
                xsq += tl.sum(xr * xr, 1)
            if NORM_W:
                wsq += tl.sum(wr * wr, 1)
        if k == 0:
            x_den = tl.maximum(tl.sqrt(xsq), eps)
        c_k = dot / x_den
        if NORM_W:
            c_k = c_k / tl.maximum(tl.sqrt(wsq), eps)
        if k == 0:
            c_best = c_k
            win = tl.zeros([BLOCK_R], tl.int32)
        else:
            c_best, win = _subcenter_max(c_best, win, c_k, k)
    c_y = c_best.to(tl.float32)
    f_y, _ = _margin(c_y, rows, rmask, mt_ptr, stride_mr, stride_mc, MARGIN, DETACHED)
    z_y = alpha * f_y
    if HAS_BIAS:
        z_y += tl.load(b_ptr + ty * stride_b, mask=has_t, other=0.0).to(tl.float32)

    # lse = logaddexp(lse_nt, z_y) and loss_t = lse - z_y = -log p_y, both without cancellation:
    # with d = lse_nt - z_y and v = exp(-|d|) in [0, 1], lse = max + log1p(v), -log p_y = log1p(v) when
    # the target leads (d <= 0), d + log1p(v) otherwise; p_y and q = 1 - p_y are 1/(1+v) and v/(1+v).
    dlt = (lse_nt64 - z_y.to(tl.float64)).to(tl.float32)
    v = tl.exp(-tl.abs(dlt))
    l1p = _log1p(v)
    lead = dlt <= 0.0
    lse_t64 = tl.where(lead, z_y.to(tl.float64), lse_nt64) + l1p.to(tl.float64)
    lse_t64 = tl.where(lse_nt == float("-inf"), z_y.to(tl.float64), lse_t64)
    loss_t = tl.where(lead, l1p, dlt + l1p)
    # no non-target column (C = 1, or all masked by -inf): loss 0, unless the target's z is -inf too
    # (every logit -inf): then NaN, as torch's -inf - -inf (dlt is NaN there, and so is loss_t)
    loss_t = tl.where((lse_nt == float("-inf")) & (z_y > float("-inf")), 0.0, loss_t)
    loss_t = tl.where(z_y == float("inf"), float("nan"), loss_t)  # as eager: inf - inf
    p_y = tl.where(lead, tl.div_rn(1.0, 1.0 + v), tl.div_rn(v, 1.0 + v))
    q = tl.where(lead, tl.div_rn(v, 1.0 + v), tl.div_rn(1.0, 1.0 + v))
    lse64 = tl.where(has_t, lse_t64, lse_nt64)
    lse = lse64.to(tl.float32)
    p_y = tl.where(has_t, p_y, 0.0)
    q = tl.where(has_t, q, 1.0)

    loss = loss_t
    if SMOOTH:
        smoothing = tl.load(smooth_ptr).to(tl.float32)  # rounded from float64 as eager rounds it
        # mean_j z_ij = (alpha (sum_{j != y} c_ij + f(c_iy)) + sum_j b_j) / C
        gsum = sc + tl.where(has_t, f_y, 0.0)
        zsum = alpha * gsum
        if HAS_BIAS:
            zsum += tl.load(bsum_ptr)
        loss = (1.0 - smoothing) * loss_t + smoothing * (lse - zsum * inv_C)
    loss = tl.where(valid, loss, 0.0)
    loss = tl.where(bad, float("nan"), loss)
    if first:
        tl.store(loss_ptr + rows, loss, mask=rmask)
        tl.store(lse_ptr + rows, lse, mask=rmask)

    # each split's sums are relative to its own max m_s: its weight in p is exp(m_s - lse). A row whose
    # every logit is -inf has lse = -inf and p = exp(-inf - -inf) = NaN, so O' and PC are NaN there
    # (its gradients NaN even when ignored), as in eager.py and torch's log_softmax backward
    if first:
        pc = tl.zeros([BLOCK_R], tl.float32)
        if ACC_PC:
            for sp in range(0, n_splits):
                base = ws_ptr + sp * ws_stride_s + rows * ws_stride_b
                f_s = _split_weight(tl.load(base, mask=rmask, other=0.0), lse64)
                pc += f_s * tl.load(base + 2, mask=rmask, other=0.0)
        st = aux_ptr + rows * _NSTAT
        tl.store(st + ST_CY, c_y, mask=rmask)
        tl.store(st + ST_PY, p_y, mask=rmask)
        tl.store(st + ST_Q, q, mask=rmask)
        tl.store(st + ST_PC, pc, mask=rmask)
        tl.store(st + ST_SC, sc, mask=rmask)
        tl.store(st + ST_WIN, win.to(tl.float32), mask=rmask)
        # lse in log2 units for the dW pass's exp2, rounded once from fp64: where one logit dominates a row
        # (lse64 = m2 ln 2 + a term below fp32's resolution) it is that logit's z2 exactly, so its p = 1 exactly
        tl.store(st + ST_LSE2, (lse64 * _LOG2E).to(tl.float32), mask=rmask)
    if ACC_O:  # this program's D chunk of O'
        d = tl.program_id(1) * BLOCK_D + dd
        dm = rmask[:, None] & (d[None, :] < D)
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        for sp in range(0, n_splits):
            base = ws_ptr + sp * ws_stride_s + rows * ws_stride_b
            f_s = _split_weight(tl.load(base, mask=rmask, other=0.0), lse64)
            acc += f_s[:, None] * tl.load(base[:, None] + _NPART + d[None, :], mask=dm, other=0.0)
        tl.store(aux_ptr + aux_o_off + rows[:, None] * D + d[None, :], acc, mask=dm)


def forward(x, weight, target, alpha, bias, margins, label_smoothing, negatives_table, normalize_weight, margin_kind,
            margin_detached, subcenters, ignore_index, eps, negatives, max_logits_bytes, need_x, need_weight,
            need_bias, need_alpha, *, launch=_identity, config: Config | None = None, splits: int | None = None):
    """-> (loss (B,), lse (B,), aux) fp32, the op's forward (contract.py's argument order). launch wraps
    each kernel (torch.library.wrap_triton inside the op); config / splits override the tile sizes and
    the class splits (tests). A config with gemm=True (the default on a GPU, config.default_path) runs
    the GEMM path instead (gemm_path.py), which keeps up to max_logits_bytes of logits in aux; the fused
    kernels keep no logits between the passes, so every budget bounds them (docs/memory_dial.md)."""
    B, D = x.shape
    K = subcenters
    C = weight.shape[0] // K
    dev = x.device
    smooth = label_smoothing is not None
    has_o, has_pc, has_ws = forward_plan(smooth, need_x, need_alpha)
    cfg = config or forward_config(D, x.dtype, weight.dtype, has_o, on_gpu(dev), C=C, subcenters=K)
    if cfg.gemm:
        from .gemm_path import forward as gemm_forward
        return gemm_forward(x, weight, target, alpha, bias, margins, label_smoothing, negatives_table,
                            normalize_weight, margin_kind, margin_detached, subcenters, ignore_index, eps, negatives,
                            max_logits_bytes, need_x, need_weight, need_bias, need_alpha, launch=launch, config=cfg)
    numel, o_off, ws_off = aux_layout(B, D, has_o, has_pc, has_ws, layout_k(K, negatives))
    loss = torch.empty((B,), device=dev, dtype=torch.float32)
    lse = torch.empty((B,), device=dev, dtype=torch.float32)
    aux = torch.zeros((numel,), device=dev, dtype=torch.float32)
    if B == 0:
        return loss, lse, aux

    inv_nx = inv_norms(x, eps, launch)
    inv_nw = inv_norms(weight, eps, launch) if normalize_weight else inv_nx  # (unused when not normalizing)
    d64 = wide_d(D, x, weight)
    b_arg = bias if bias is not None else inv_nx  # a placeholder pointer when there is no bias
    stride_b = bias.stride(0) if bias is not None else 0
    neg = NEGATIVES_CODES[negatives]
    neg_rows = (negative_rows(x, weight, target, margins, negatives_table, normalize_weight, margin_kind,
                              margin_detached, K, ignore_index, eps) if neg else inv_nx)

    def split_pass(acc_o: bool, acc_pc: bool, acc_sc: bool, ones: bool):
        """_fwd_split_kernel over every class; -> (its partials (n_splits, B, NPART [+ D]), n_splits)."""
        n_d = d_chunks(D, cfg, acc_o)
        n_split = splits or num_splits(B, C, cfg, num_sms(dev), n_d)
        tiles = triton.cdiv(C, cfg.block_cols)
        cols_per_split = cfg.block_cols * triton.cdiv(tiles, n_split)
        n_split = triton.cdiv(C, cols_per_split)
        ws = torch.empty((n_split, B, NPART + (D if acc_o else 0)), device=dev, dtype=torch.float32)
        grid = (triton.cdiv(B, cfg.block_rows), n_split, n_d)
        meta = tile_meta(cfg, D, x.dtype, weight.dtype, streamed=weight, chain_break=cfg.chain_break and acc_o,
                         rows_strided=K > 1)
        n_prog = grid[0] * grid[1] * grid[2] if meta["CHAIN_BREAK"] else 0
        scr_p = torch.empty((2 * n_prog, cfg.block_rows * cfg.block_cols), device=dev, dtype=P_TORCH[meta["P_DT"]])
        scr_s = torch.empty((2 * n_prog, cfg.block_rows), device=dev, dtype=torch.float32)
        launch(_fwd_split_kernel)[grid](
            x_ptr=x, w_ptr=weight, b_ptr=b_arg, alpha_ptr=alpha, inv_nx_ptr=inv_nx, inv_nw_ptr=inv_nw,
            tgt_ptr=target, ws_ptr=ws, neg_ptr=neg_rows, w_desc=tma_descriptor(weight, meta, "BLOCK_C"),
            scr_p_ptr=scr_p, scr_s_ptr=scr_s,
            B=B, C=C, D=D, ignore_index=ignore_index, cols_per_split=cols_per_split,
            stride_xb=x.stride(0), stride_xd=x.stride(1), stride_wc=weight.stride(0), stride_wd=weight.stride(1),
            stride_b=stride_b, stride_t=target.stride(0), ws_stride_s=ws.stride(0), ws_stride_b=ws.stride(1),
            HAS_BIAS=bias is not None, NORM_W=normalize_weight, ACC_O=acc_o, ACC_PC=acc_pc, ACC_SC=acc_sc,
            SUBC=K, ONES=ones, NEG=neg, D64=d64, **meta)
        return ws, n_split

    if has_ws and layout_k(K, negatives) > 1:
        # label smoothing's dX term with sub-centers, sum_{j != y_i} W_hat_{j, win(i, j)} per row (B x D in
        # aux): the split kernel with weight 1 instead of p, its partials summed over the splits (torch's
        # fixed-order reduction). One extra pass (2 GEMM-equivalents), only in this combination; it runs
        # first, so its partials are freed before the main pass allocates its own.
        ones_ws, _ = split_pass(True, False, False, True)
        aux[ws_off:ws_off + B * D] = ones_ws[:, :, NPART:].sum(dim=0).reshape(B * D)
        del ones_ws
    ws, n_split = split_pass(has_o, has_pc, smooth, False)

    combine(ws, n_split, x, weight, target, alpha, bias, margins, label_smoothing, normalize_weight, margin_kind,
            margin_detached, K, ignore_index, eps, loss, lse, aux, has_o, has_pc, o_off, inv_nx, launch)
    if has_ws and layout_k(K, negatives) == 1:
        aux[ws_off:ws_off + D] = column_sum(weight, inv_nw if normalize_weight else None, launch)
    return loss, lse, aux


def combine(ws, n_split, x, weight, target, alpha, bias, margins, label_smoothing, normalize_weight, margin_kind,
            margin_detached, K, ignore_index, eps, loss, lse, aux, has_o, has_pc, o_off, placeholder,
            launch=_identity):
    """_fwd_combine_kernel over the (n_split, B, NPART [+ D]) partials: loss, lse and aux's statistics (and O'
    when has_o). Shared by the fused forward and the GEMM path's (gemm_path.py, whose partials are its row
    kernel's). placeholder: any fp32 tensor on the device (a pointer never read)."""
    B, D = x.shape
    C = weight.shape[0] // K
    smooth = label_smoothing is not None
    b_arg = bias if bias is not None else placeholder
    stride_b = bias.stride(0) if bias is not None else 0
    bsum = bias.float().sum() if (bias is not None and smooth) else placeholder
    BR, BD = row_tiles(D)
    launch(_fwd_combine_kernel)[(triton.cdiv(B, BR), triton.cdiv(D, BD) if has_o else 1)](
        ws_ptr=ws, x_ptr=x, w_ptr=weight, b_ptr=b_arg, alpha_ptr=alpha, tgt_ptr=target, bsum_ptr=bsum,
        smooth_ptr=label_smoothing if smooth else placeholder,
        loss_ptr=loss, lse_ptr=lse, aux_ptr=aux,
        B=B, C=C, D=D, n_splits=n_split, ignore_index=ignore_index, inv_C=1.0 / C, eps=eps,
        stride_xb=x.stride(0), stride_xd=x.stride(1), stride_wc=weight.stride(0), stride_wd=weight.stride(1),
        stride_b=stride_b, stride_t=target.stride(0), ws_stride_s=ws.stride(0), ws_stride_b=ws.stride(1),
        aux_o_off=o_off, HAS_BIAS=bias is not None, NORM_W=normalize_weight, SMOOTH=smooth, SUBC=K,
        ACC_O=has_o, ACC_PC=has_pc, D64=wide_d(D, x, weight), BLOCK_R=BR, BLOCK_D=BD,
        **margin_args(margins, margin_kind, margin_detached, B, placeholder))
