"""The triton backward: _bwd_rows_kernel (per row: the upstream weights, the target column's dz, dX
from the forward's O', d alpha's row terms) and _bwd_dw_kernel (persistent over class blocks:
recompute S, form dz, accumulate dW and db, W's normalization backward), and their launcher
backward(). The derivation of every term is in this package's __init__ docstring."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .aux_layout import (_NROWV, _NSTAT, NROWV, RV_DCY, RV_DZY, RV_INVNX, RV_LSE2, RV_RS, RV_WIN, RV_WP, RV_WTS,
                         ST_CY, ST_LSE2, ST_PC, ST_PY, ST_Q, ST_SC, ST_WIN, aux_flags, aux_layout, layout_k)
from .common import (_LOG2E, INTERPRETED, _didx, _identity, _mma, _operand, _out, _prefetch_l1, _subcenter_max,
                     _through_scratch2d, wide_d)
from .config import P_TORCH, Config, dw_config, dw_programs, num_sms, on_gpu, row_tiles, tile_meta, tma_descriptor
from .loss_forward import forward
from .margin import NEGATIVES_CODES, _margin, _negative, _row_preamble, _target_info, margin_args, negative_rows
from .norms import _row_norms, inv_norms


@triton.jit
def _bwd_rows_kernel(
    gl_ptr, gs_ptr, x_ptr, w_ptr, alpha_ptr, tgt_ptr, aux_ptr, wsum_ptr,  # inputs
    mt_ptr, smooth_ptr,  # the margin table (float64, R x 5), the label smoothing (0-d)
    rowv_ptr, dx_ptr, da_ptr,  # outputs: per-row values for the dW pass, dx, per-row d alpha terms
    B, C, D, ignore_index,  # sizes
    inv_C, eps,  # options
    stride_gl, stride_gs, stride_xb, stride_xd, stride_wc, stride_wd, stride_t,  # input strides
    stride_mr, stride_mc,  # margin table strides (row stride 0: one row for every row)
    aux_o_off,  # where O' starts in aux
    NORM_W: tl.constexpr, MARGIN: tl.constexpr, DETACHED: tl.constexpr, SMOOTH: tl.constexpr, SUBC: tl.constexpr,
    NEED_X: tl.constexpr, NEED_ALPHA: tl.constexpr, EMU: tl.constexpr, D64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ROWSUM: tl.constexpr,  # the smoothing term is the forward's per-row sum (K > 1 or a non-target transform)
):
    """Per row: the upstream weights, the target column's dz, dx (from O'), and d alpha's row term."""
    rows, rmask, valid, has_t, bad, ty, alpha = _row_preamble(tgt_ptr, alpha_ptr, B, C, ignore_index, stride_t,
                                                              BLOCK_R)
    g_loss = tl.load(gl_ptr + rows * stride_gl, mask=rmask, other=0.0).to(tl.float32)
    g_lse = tl.load(gs_ptr + rows * stride_gs, mask=rmask, other=0.0).to(tl.float32)
    # ignored rows: their loss is the constant 0 (w_t = 0), their lse still has a gradient;
    # rows with an out-of-range target carry NaN, never a plausible gradient
    w_t = tl.where(valid, g_loss, 0.0)
    w_t = tl.where(bad, float("nan"), w_t)
    w_p = w_t + g_lse
    smoothing = 0.0
    if SMOOTH:
        smoothing = tl.load(smooth_ptr).to(tl.float32)  # rounded from float64 as eager rounds it
    wts = w_t * smoothing * inv_C  # w_t s / C, the smoothing term of every column

    st = aux_ptr + rows * _NSTAT
    c_y = tl.load(st + ST_CY, mask=rmask, other=0.0)
    p_y = tl.load(st + ST_PY, mask=rmask, other=0.0)
    q = tl.load(st + ST_Q, mask=rmask, other=0.0)
    f_y, fp_y = _margin(c_y, rows, rmask, mt_ptr, stride_mr, stride_mc, MARGIN, DETACHED)
    # dz_iy = w_p p_y - w_t (1 - s + s/C) = -w_t q + g_lse p_y + w_t s (1 - 1/C), with q = 1 - p_y
    # from the non-target mass: exact for confident rows (p_y - 1 would round to 0 in fp32 or bf16)
    dz_y = -w_t * q + g_lse * p_y + w_t * smoothing * (1.0 - inv_C)
    dz_y = tl.where(has_t, dz_y, 0.0)
    dc_y = alpha * dz_y * fp_y  # dloss/dc_iy
    wy = ty  # the row of W the target column's cosine came from
    if SUBC > 1:  # its winning sub-center's, as the forward recorded it
        win = tl.load(st + ST_WIN, mask=rmask, other=0.0)
        wy = ty * SUBC + win.to(tl.int64)

    dd = _didx(tl.arange(0, BLOCK_D), D64)
    x_norm = _row_norms(x_ptr + rows * stride_xb, rmask, D, stride_xd, D64, BLOCK_D)
    inv_nx = tl.div_rn(1.0, tl.maximum(x_norm, eps))
    rv = rowv_ptr + rows * _NROWV
    tl.store(rv + RV_INVNX, inv_nx, mask=rmask)
    tl.store(rv + RV_WP, w_p, mask=rmask)
    tl.store(rv + RV_WTS, wts, mask=rmask)
    tl.store(rv + RV_DZY, dz_y, mask=rmask)
    tl.store(rv + RV_DCY, dc_y, mask=rmask)
    if SUBC > 1:
        tl.store(rv + RV_WIN, win, mask=rmask)
    # the dW pass's p = exp2(z2 - lse2), z2 = log2(e) z: its row scale, rounded once from fp64 as the forward's
    # (the same z2 where 1/|x_i| is), and the forward's lse2
    tl.store(rv + RV_RS, (alpha.to(tl.float64) * _LOG2E * inv_nx.to(tl.float64)).to(tl.float32), mask=rmask)
    tl.store(rv + RV_LSE2, tl.load(st + ST_LSE2, mask=rmask, other=0.0), mask=rmask)

    if NEED_ALPHA:
        # sum_j dz_ij g_ij (z = alpha g + b): w_p PC - w_t (s/C) SC + dz_y f(c_y)
        pc = tl.load(st + ST_PC, mask=rmask, other=0.0)
        sc = tl.load(st + ST_SC, mask=rmask, other=0.0)
        r = w_p * pc + tl.where(has_t, dz_y * f_y, 0.0)
        if SMOOTH:
            r -= wts * sc
        tl.store(da_ptr + rows, tl.where(rmask, r, 0.0), mask=rmask)

    if NEED_X:
        # dx_hat = alpha [w_p O' - w_t (s/C) S' + dz_y f'(c_y) W_hat_y]   (has_t rows), with S' the
        # smoothing term over the non-target columns: K = 1, the column sum Wsum less W_hat_y (so
        # W_hat_y's coefficient gains w_t s/C); K > 1, the forward's per-row sum over the winners
        co = alpha * w_p
        cy = tl.where(has_t, dc_y, 0.0)
        if SMOOTH and not ROWSUM:
            cy += tl.where(has_t, alpha * wts, 0.0)
        if NORM_W:
            w_norm = _row_norms(w_ptr + wy * stride_wc, has_t, D, stride_wd, D64, BLOCK_D)
            cy = tl.div_rn(cy, tl.maximum(w_norm, eps))
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
                # x_hat = +-1 exactly (sqrt(fl(x^2)) = |x|) on the GPU as under the interpreter
                x_hat = tl.div_rn(xr, x_den[:, None])
                o = tl.load(aux_ptr + aux_o_off + rows[:, None] * D + d[None, :], mask=dm, other=0.0)
                wr = tl.load(w_ptr + wy[:, None] * stride_wc + d[None, :] * stride_wd,
                             mask=has_t[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
                g = co[:, None] * o + cy[:, None] * wr
                if SMOOTH:
                    if not ROWSUM:
                        g += cs[:, None] * tl.load(wsum_ptr + d, mask=d < D, other=0.0)[None, :]
                    else:
                        g += cs[:, None] * tl.load(wsum_ptr + rows[:, None] * D + d[None, :], mask=dm, other=0.0)
                if sweep == 0:
                    proj += tl.sum(x_hat * g, 1)
                else:
                    dx = tl.div_rn(tl.where((x_norm >= eps)[:, None], g - x_hat * proj[:, None], g), x_den[:, None])
                    tl.store(dx_ptr + rows[:, None] * D + d[None, :], _out(dx, dx_ptr, EMU), mask=dm)


@triton.jit
def _bwd_dw_kernel(
    x_ptr, w_ptr, b_ptr, alpha_ptr, tgt_ptr, rowv_ptr, inv_nw_ptr,  # inputs (inv_nw: K > 1 only)
    neg_ptr,  # the non-target transform's (B, 2) fp32 [threshold, t] per row (NEG > 0); else unused
    x_desc,  # TMA: x's tensor descriptor (BLOCK_B x BLOCK_K blocks); else unused
    dw_ptr, db_ptr,  # outputs (dW contiguous (C K, D) in W's dtype, db in the bias dtype)
    scr_p_ptr,  # per-program scratch (CHAIN_BREAK): 2 slots of the dW product's operand (BLOCK_C x BLOCK_B)
    B, C, D, ignore_index, eps, n_blocks, n_sub,  # sizes, target rule, eps, blocks (class blocks x n_sub)
    stride_xb, stride_xd, stride_wc, stride_wd, stride_b, stride_t,  # input strides
    HAS_BIAS: tl.constexpr, NORM_W: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr, SUBC: tl.constexpr,
    PROJ_TILE: tl.constexpr,  # this program's D chunk is all of D: W's normalization backward from the dW_hat row
    PROJ_ROW: tl.constexpr,  # the same with W as stored (wider rows, see PROJ_TILE_MAX_D); neither: sum_i dc c
    S_DT: tl.constexpr, S_TF32: tl.constexpr, P_DT: tl.constexpr, P_TF32: tl.constexpr, EMU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
    SINGLE_K: tl.constexpr, REUSE_TILE: tl.constexpr, CHAIN_BREAK: tl.constexpr, PREFETCH: tl.constexpr,
    TMA: tl.constexpr, D64: tl.constexpr,
    NEG: tl.constexpr,  # the non-target transform: 0 none, 1 mv, 2 curricular, 3 filter (margin._negative)
):
    """Persistent over blocks (pid, pid + programs, ...), one D chunk per grid column. For each class
    block: walk every row block, recompute S, form dz (the target entry from the per-row value),
    accumulate dW_hat (its D chunk), db and w_hat . dw_hat; then the normalization backward of W.

    Sub-centers (SUBC = K > 1): a block is (class block, sub-center kk), n_sub = K of them per class
    block when dW is asked for: it owns W's rows jK + kk and accumulates only the entries whose class
    kk won. Knowing the winner takes all K cosines, so each row tile recomputes K products (each
    W_k tile from L2; the inverse norms from the launcher's 1/|W| buffer) for the one dW product: the
    pass costs K S + 1 dW per class and sub-center, see the package docstring. The target column takes
    the forward's winner (the rows kernel's RV_WIN), the others the recomputed one."""
    pid_d = tl.program_id(1)
    prog = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + pid_d
    alpha = tl.load(alpha_ptr).to(tl.float32)
    a2 = (alpha.to(tl.float64) * _LOG2E).to(tl.float32)  # alpha log2(e): the logits in log2 units (exp2)
    cl = tl.arange(0, BLOCK_C)
    dk = _didx(tl.arange(0, BLOCK_K), D64)
    do = _didx(pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO), D64)
    it = 0
    for blk in range(tl.program_id(0).to(tl.int64), n_blocks, tl.num_programs(0)):  # int64 induction
        if SUBC == 1:
            cb = blk
        else:
            cb = blk // n_sub
            kk = blk % n_sub  # the sub-center whose rows this block owns
        c_lo = cb * BLOCK_C
        cols = c_lo + cl
        cmask = cols < C
        own = cols  # the rows of W (and dW) this block owns
        if SUBC > 1:
            own = cols * SUBC + kk
        w_rows = w_ptr + own[:, None] * stride_wc
        if SINGLE_K and SUBC == 1:  # the class block's weights stay on chip for the whole walk over the rows
            w_tile = tl.load(w_rows + dk[None, :] * stride_wd, mask=cmask[:, None] & (dk[None, :] < D), other=0.0)
        if NORM_W:
            # |W_j| from 64-wide slices (a second read of the block, from L2: a whole fp32 copy of the
            # tile in registers next to the accumulator would spill), squares summed in fp64
            w_norm = _row_norms(w_ptr + own * stride_wc, cmask, D, stride_wd, D64, 64)
            inv_nw = tl.div_rn(1.0, tl.maximum(w_norm, eps))
        if HAS_BIAS:
            bias = tl.load(b_ptr + cols * stride_b, mask=cmask, other=0.0).to(tl.float32) * _LOG2E  # log2 units

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
            # p = exp2(z2 - lse2) with z2 = log2(e) z (see the forward; the rows kernel rounded lse2 and the row
            # scale rs from fp64); K = 1 folds alpha log2(e) / |x_i| into rs (c_ij = cs_ij / |x_i| is never
            # formed) and alpha / |x_i| into ra, the factor from dz to the dW product's operand
            lse2 = tl.load(rv + RV_LSE2, mask=rmask, other=0.0)
            if SUBC == 1:
                rs = tl.load(rv + RV_RS, mask=rmask, other=0.0)
                ra = alpha * inv_nx
            t = tl.load(tgt_ptr + rows * stride_t, mask=rmask, other=ignore_index)
            _, has_t, _ = _target_info(t, ignore_index, C)
            # the target's column inside this class block, as a small int32 (-1: not in the block)
            t_rel = tl.where(has_t & (t >= c_lo) & (t < c_lo + BLOCK_C), t - c_lo, -1).to(tl.int32)

            # S = x W^T for (rows, classes): rows along the product's M (per-row vectors cost a few
            # registers), the class block's weights as its B operand (they stay in shared memory)
            if SINGLE_K:
                if TMA:  # global -> shared memory by the copy engine; rows >= B and columns >= D read as 0
                    x_tile = x_desc.load([tl.cast(r0, tl.int32), 0])
                else:
                    x_tile = tl.load(x_rows + dk[None, :] * stride_xd, mask=rmask[:, None] & (dk[None, :] < D),
                                     other=0.0)
            if SUBC == 1:
                s = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
                if SINGLE_K:
                    s = _mma(x_tile, tl.trans(w_tile), s, S_DT, S_TF32, EMU)
                else:
                    for k0 in range(0, D, BLOCK_K):
                        kd = k0 + dk
                        xk = tl.load(x_rows + kd[None, :] * stride_xd, mask=rmask[:, None] & (kd[None, :] < D),
                                     other=0.0)
                        wk = tl.load(w_rows + kd[None, :] * stride_wd, mask=cmask[:, None] & (kd[None, :] < D),
                                     other=0.0)
                        s = _mma(xk, tl.trans(wk), s, S_DT, S_TF32, EMU)
                c = s  # cs: the cosine times |x_i|
                if NORM_W:
                    c = c * inv_nw[None, :]
                if NEG > 0:  # g = N(cosine): with the row factor; u below carries N'(c)
                    n_thr = tl.load(neg_ptr + rows * 2, mask=rmask, other=float("inf"))
                    n_t = tl.load(neg_ptr + rows * 2 + 1, mask=rmask, other=0.0)
                    g_n, slope = _negative(c * inv_nx[:, None], n_thr, n_t, NEG)
                    z = g_n * a2
                else:
                    z = c * rs[:, None]
            else:
                # the class cosine is the maximum over the K sub-centers; mine: sub-center kk is the winner
                c = tl.full([BLOCK_B, BLOCK_C], float("-inf"), tl.float32)
                mine = tl.zeros([BLOCK_B, BLOCK_C], tl.int1)
                for k in range(SUBC):  # a runtime loop: unrolled, the K products' tiles would be live at once
                    wk_rows = w_ptr + (cols * SUBC + k)[:, None] * stride_wc
                    s = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
                    if SINGLE_K:
                        wt = tl.load(wk_rows + dk[None, :] * stride_wd, mask=cmask[:, None] & (dk[None, :] < D),
                                     other=0.0)
                        s = _mma(x_tile, tl.trans(wt), s, S_DT, S_TF32, EMU)
                    else:
                        for k0 in range(0, D, BLOCK_K):
                            kd = k0 + dk
                            xk = tl.load(x_rows + kd[None, :] * stride_xd,
                                         mask=rmask[:, None] & (kd[None, :] < D), other=0.0)
                            wk = tl.load(wk_rows + kd[None, :] * stride_wd,
                                         mask=cmask[:, None] & (kd[None, :] < D), other=0.0)
                            s = _mma(xk, tl.trans(wk), s, S_DT, S_TF32, EMU)
                    c_k = s * inv_nx[:, None]
                    if NORM_W:
                        c_k = c_k * tl.load(inv_nw_ptr + cols * SUBC + k, mask=cmask, other=0.0)[None, :]
                    c, mine = _subcenter_max(c, mine, c_k, kk == k)
                if NEG > 0:
                    n_thr = tl.load(neg_ptr + rows * 2, mask=rmask, other=float("inf"))
                    n_t = tl.load(neg_ptr + rows * 2 + 1, mask=rmask, other=0.0)
                    g_n, slope = _negative(c, n_thr, n_t, NEG)
                    z = g_n * a2
                else:
                    z = c * a2
            if HAS_BIAS:
                z += bias[None, :]
            p = tl.exp2(z - lse2[:, None])
            # dz_ij = w_p p_ij - w_t s/C off the target column, the per-row dz_iy on it; padded rows: 0
            is_t = cl[None, :] == t_rel[:, None]
            dz = tl.where(is_t, dz_y[:, None], w_p[:, None] * p - wts[:, None])
            dz = tl.where(rmask[:, None], dz, 0.0)
            if NEED_B:
                db += tl.sum(dz, 0)
            if NEED_W:
                # dloss/dc_ij = alpha dz_ij, times f'(c_iy) on the target column (dc_y);
                # dW_hat_j += sum_i dc_ij x_hat_i = sum_i u_ij x_i with u_ij = dc_ij / |x_i|: raw x rows
                if SUBC == 1:
                    dzs = dz
                    if NEG > 0:
                        dzs = dz * slope
                    u = tl.where(is_t, (dc_y * inv_nx)[:, None], dzs * ra[:, None])
                    u = tl.where(rmask[:, None], u, 0.0)
                    if NORM_W and not (PROJ_TILE or PROJ_ROW):
                        # w_hat_j . dw_hat_j = sum_i dc_ij c_ij = sum_i u_ij cs_ij, when D is split over programs
                        proj += tl.sum(u * c, 0)
                else:
                    dzs = dz
                    if NEG > 0:
                        dzs = dz * slope
                    dc = tl.where(is_t, dc_y[:, None], alpha * dzs)
                    dc = tl.where(rmask[:, None], dc, 0.0)
                    # only where sub-center kk won reaches this block's rows; the target column's
                    # winner is the forward's (exact dots), the others' the recomputed products'
                    win_y = tl.load(rv + RV_WIN, mask=rmask, other=0.0).to(tl.int32)
                    dc = tl.where(tl.where(is_t, (win_y == kk)[:, None], mine), dc, 0.0)
                    if NORM_W and not (PROJ_TILE or PROJ_ROW):
                        # w_hat_j . dw_hat_j = sum_i dc_ij c_ij (the entries kk won, where c_ij is sub-center
                        # kk's cosine; on a target column whose recomputed winner differs from the forward's,
                        # the two tie within the rounding)
                        proj += tl.sum(dc * c, 0)
                    u = dc * inv_nx[:, None]
                a = tl.trans(_operand(u, P_DT, EMU))
                if CHAIN_BREAK:
                    slot = it % 2
                    a = _through_scratch2d(a, scr_p_ptr + (prog * 2 + slot) * (BLOCK_B * BLOCK_C), BLOCK_C, BLOCK_B)
                if REUSE_TILE:
                    xo = x_tile
                else:
                    xo = tl.load(x_rows + do[None, :] * stride_xd, mask=rmask[:, None] & (do[None, :] < D),
                                 other=0.0)
                acc = _mma(a, xo, acc, P_DT, P_TF32, EMU)
            it += 1

        dmask = cmask[:, None] & (do[None, :] < D)
        if NEED_W:
            if NORM_W:
                # dW_j = (dw_hat_j - w_hat_j (w_hat_j . dw_hat_j)) / |W_j| where |W_j| >= eps, dw_hat_j / eps
                # below (eager.normalize_rows_backward), every factor in range at huge |W_j| (1 / |W_j|^2
                # would be 0 in fp32 past |W_j| ~ 1e19)
                wo = tl.load(w_rows + do[None, :] * stride_wd, mask=dmask, other=0.0).to(tl.float32)
                if PROJ_TILE:
                    # w_hat_j correctly rounded and w_hat_j . dw_hat_j from the finished row, as eager: the
                    # two terms cancel exactly where they should (D = 1: w_hat = +-1, dW = 0)
                    w_hat = tl.div_rn(wo, tl.maximum(w_norm, eps)[:, None])
                    pj = tl.where(w_norm >= eps, tl.sum(w_hat * acc, 1), 0.0)
                    acc = (acc - w_hat * pj[:, None]) * inv_nw[:, None]
                else:
                    if PROJ_ROW:  # w_hat_j . dw_hat_j = (W_j . dw_hat_j) / |W_j|: no accumulator in the walk
                        proj = tl.sum(wo * acc, 1) * inv_nw
                    shrink = tl.where(w_norm >= eps, proj * inv_nw, 0.0)
                    acc = (acc - shrink[:, None] * wo) * inv_nw[:, None]
            tl.store(dw_ptr + own[:, None] * D + do[None, :], _out(acc, dw_ptr, EMU), mask=dmask)
        if NEED_B:
            if pid_d == 0:
                if SUBC == 1:
                    tl.store(db_ptr + cols, _out(db, db_ptr, EMU), mask=cmask)
                else:  # db is the class's: the block of sub-center 0 stores it
                    tl.store(db_ptr + cols, _out(db, db_ptr, EMU), mask=cmask & (kk == 0))


def row_values(grad_loss, grad_lse, x, weight, target, alpha, margins, label_smoothing, aux, normalize_weight,
               margin_kind, margin_detached, K, ignore_index, eps, need_x, need_alpha, dx, wsum, o_off,
               launch=_identity, rowsum=None):
    """_bwd_rows_kernel: -> (rowv (B, NROWV), da (B,) or empty); dx from O' when need_x (the fused path; the
    GEMM path passes need_x=False and forms dX from its GEMMs). Shared by both backward paths. rowsum: label
    smoothing's dX term is the forward's per-row sum (aux_layout.layout_k > 1: sub-centers or a non-target
    transform); None: K > 1."""
    B, D = x.shape
    C = weight.shape[0] // K
    dev = x.device
    smooth = label_smoothing is not None
    rowv = torch.empty((B, NROWV), device=dev, dtype=torch.float32)
    da = torch.empty((B,) if need_alpha else (0,), device=dev, dtype=torch.float32)
    BR, BD = row_tiles(D)
    launch(_bwd_rows_kernel)[(triton.cdiv(B, BR),)](
        gl_ptr=grad_loss, gs_ptr=grad_lse, x_ptr=x, w_ptr=weight, alpha_ptr=alpha, tgt_ptr=target, aux_ptr=aux,
        wsum_ptr=wsum, smooth_ptr=label_smoothing if smooth else rowv, rowv_ptr=rowv,
        dx_ptr=dx if need_x else rowv, da_ptr=da if need_alpha else rowv,
        B=B, C=C, D=D, ignore_index=ignore_index, inv_C=1.0 / C, eps=eps,
        stride_gl=grad_loss.stride(0), stride_gs=grad_lse.stride(0), stride_xb=x.stride(0), stride_xd=x.stride(1),
        stride_wc=weight.stride(0), stride_wd=weight.stride(1), stride_t=target.stride(0), aux_o_off=o_off,
        NORM_W=normalize_weight, SMOOTH=smooth, SUBC=K, NEED_X=need_x, NEED_ALPHA=need_alpha,
        EMU=INTERPRETED, D64=wide_d(D, x, weight), BLOCK_R=BR, BLOCK_D=BD, ROWSUM=(K > 1) if rowsum is None else rowsum,
        **margin_args(margins, margin_kind, margin_detached, B, rowv))
    return rowv, da


# W's normalization backward takes w_hat . dw_hat from the finished row (PROJ_TILE, exact cancellation as eager)
# where one program holds all of D in a tile of at most this width: at D = 512 the correctly rounded w_hat tile
# next to the accumulator doubled the epilogue's spills (sm_90, all options: 784 bytes against 352). Wider rows
# held by one program take it from the finished row with W as stored, (W_j . dw_hat_j) / |W_j| (PROJ_ROW; equal
# up to rounding): accumulating sum_i dc_ij c_ij during the walk instead kept one more per-class vector live
# across the row loop, which spilled there (all options, bf16, D = 512: 148 bytes per row tile, 56 without it).
# Rows split over programs (D chunks) still accumulate it.
PROJ_TILE_MAX_D = 128


def backward(grad_loss, grad_lse, x, weight, target, alpha, bias, margins, label_smoothing, negatives_table, lse, aux,
             normalize_weight, margin_kind, margin_detached, subcenters, ignore_index, eps, negatives, max_logits_bytes,
             need_x, need_weight, need_bias, need_alpha, *, launch=_identity, config: Config | None = None,
             fwd_config: Config | None = None):
    """-> (dx, dW, db, dalpha), each in its input's dtype; empty tensors for what is not needed
    (contract.py's argument order). A config with gemm=True (the default on a GPU) runs the GEMM path's
    backward (gemm_path.py), which reads what its forward kept from aux."""
    B, D = x.shape
    K = subcenters
    C = weight.shape[0] // K
    dev = x.device
    cfg = config or dw_config(D, x.dtype, weight.dtype, on_gpu(dev), C=C)
    if cfg.gemm:
        from .gemm_path import backward as gemm_backward
        return gemm_backward(grad_loss, grad_lse, x, weight, target, alpha, bias, margins, label_smoothing,
                             negatives_table, lse, aux, normalize_weight, margin_kind, margin_detached, subcenters,
                             ignore_index, eps, negatives, max_logits_bytes, need_x, need_weight, need_bias, need_alpha,
                             launch=launch, config=cfg)
    smooth = label_smoothing is not None
    need_bias = need_bias and bias is not None
    bdt = bias.dtype if bias is not None else x.dtype

    def outputs():
        return (torch.empty((B, D) if need_x else (0,), device=dev, dtype=x.dtype),
                torch.empty(tuple(weight.shape) if need_weight else (0,), device=dev, dtype=weight.dtype),
                torch.empty((C,) if need_bias else (0,), device=dev, dtype=bdt))

    if B == 0 or not (need_x or need_weight or need_bias or need_alpha):
        dx, dw, db = outputs()
        if need_weight:
            dw.zero_()
        if need_bias:
            db.zero_()
        dalpha = torch.zeros((), device=dev, dtype=alpha.dtype) if need_alpha else alpha.new_empty((0,))
        return dx, dw, db, dalpha

    LK = layout_k(K, negatives)
    neg = NEGATIVES_CODES[negatives]
    has_o, has_pc, has_ws = aux_flags(B, D, aux, LK)
    if (need_x and not (has_o and (has_ws or not smooth))) or (need_alpha and not has_pc):
        # the forward ran without these hints: rerun it to get O' (and the smoothing term) / PC (the op
        # contract allows it). Before the gradients are allocated: its split partials and scratch are freed
        # when it returns, so they never coexist with dW
        _, _, aux = forward(x, weight, target, alpha, bias, margins, label_smoothing, negatives_table,
                            normalize_weight, margin_kind, margin_detached, K, ignore_index, eps, negatives,
                            max_logits_bytes, need_x, False, False, need_alpha, launch=launch, config=fwd_config)
        has_o, has_pc, has_ws = aux_flags(B, D, aux, LK)
    dx, dw, db = outputs()
    _, o_off, ws_off = aux_layout(B, D, has_o, has_pc, has_ws, LK)
    wsum = aux[ws_off:] if (need_x and smooth) else aux  # (a placeholder pointer when SMOOTH is off)

    rowv, da = row_values(grad_loss, grad_lse, x, weight, target, alpha, margins, label_smoothing, aux,
                          normalize_weight, margin_kind, margin_detached, K, ignore_index, eps, need_x, need_alpha,
                          dx, wsum, o_off, launch, rowsum=LK > 1)
    d64 = wide_d(D, x, weight)

    if need_weight or need_bias:
        meta = tile_meta(cfg, D, x.dtype, weight.dtype, streamed=x, chain_break=cfg.chain_break and need_weight)
        n_d = triton.cdiv(D, meta["BLOCK_DO"]) if need_weight else 1
        n_sub = K if need_weight else 1  # sub-centers: one block per (class block, sub-center) for dW
        n_blocks = triton.cdiv(C, cfg.block_cols) * n_sub
        programs = min(n_blocks, dw_programs(num_sms(dev)))
        n_prog = programs * n_d if meta["CHAIN_BREAK"] else 0
        scr_p = torch.empty((2 * n_prog, cfg.block_rows * cfg.block_cols), device=dev, dtype=P_TORCH[meta["P_DT"]])
        # K > 1 with normalize_weight: every sub-center's 1/|W| for the recomputed cosines (C K floats)
        inv_nw = inv_norms(weight, eps, launch) if (normalize_weight and K > 1) else rowv
        neg_rows = (negative_rows(x, weight, target, margins, negatives_table, normalize_weight, margin_kind,
                                  margin_detached, K, ignore_index, eps) if neg else rowv)
        launch(_bwd_dw_kernel)[(programs, n_d)](
            x_ptr=x, w_ptr=weight, b_ptr=bias if bias is not None else rowv, alpha_ptr=alpha, tgt_ptr=target,
            rowv_ptr=rowv, inv_nw_ptr=inv_nw, neg_ptr=neg_rows, x_desc=tma_descriptor(x, meta, "BLOCK_B"),
            dw_ptr=dw if need_weight else rowv,
            db_ptr=db if need_bias else rowv, scr_p_ptr=scr_p, B=B, C=C, D=D, ignore_index=ignore_index, eps=eps,
            n_blocks=n_blocks, n_sub=n_sub,
            stride_xb=x.stride(0), stride_xd=x.stride(1), stride_wc=weight.stride(0), stride_wd=weight.stride(1),
            stride_b=bias.stride(0) if bias is not None else 0, stride_t=target.stride(0),
            HAS_BIAS=bias is not None, NORM_W=normalize_weight, NEED_W=need_weight, NEED_B=need_bias, SUBC=K,
            PROJ_TILE=n_d == 1 and meta["BLOCK_DO"] <= PROJ_TILE_MAX_D, PROJ_ROW=n_d == 1, D64=d64, NEG=neg, **meta)

    dalpha = da.sum().to(alpha.dtype) if need_alpha else alpha.new_empty((0,))
    return dx, dw, db, dalpha
