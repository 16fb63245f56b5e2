"""The target column's margin and the target rules, as the kernels compute them (device functions),
the per-row preamble both per-row kernels share, and the host-side checks and launch arguments of the
margin table and the label smoothing."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...margins import COS_M2, M3, OFFSET, SIN_M2, THRESHOLD
from ...options import ARCFACE_CLAMP, MARGIN_KINDS

MARGIN_CODES = {kind: i for i, kind in enumerate(MARGIN_KINDS)}  # none 0, additive 1, angular 2
assert MARGIN_CODES == {"none": 0, "additive": 1, "angular": 2}
# _margin writes the angular clamp as the literal 1e-7 (a constexpr global would also do; a literal reads better)
assert ARCFACE_CLAMP == 1e-7, "update the literal in _margin"
# the table's columns, as the kernels see them
_MT_COS, _MT_SIN, _MT_TH, _MT_OFF, _MT_M3 = (tl.constexpr(i) for i in (COS_M2, SIN_M2, THRESHOLD, OFFSET, M3))


@triton.jit
def _target_info(t, ignore_index, C):
    """valid (not ignored), has a target column (valid and in range), bad (valid, out of range)."""
    valid = t != ignore_index
    in_range = (t >= 0) & (t < C)
    return valid, valid & in_range, valid & (~in_range)


@triton.jit
def _row_preamble(tgt_ptr, alpha_ptr, B, C, ignore_index, stride_t, BLOCK_R: tl.constexpr):
    """The opening of the per-row kernels (_fwd_combine_kernel, _bwd_rows_kernel): this program's
    rows (int64) and their mask, the target rules (_target_info), the safe target column ty (0 where
    there is none: loads through it are masked by has_t) and alpha."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < B
    t = tl.load(tgt_ptr + rows * stride_t, mask=rmask, other=ignore_index)
    valid, has_t, bad = _target_info(t, ignore_index, C)
    ty = tl.where(has_t, t, 0)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    return rows, rmask, valid, has_t, bad, ty, alpha


@triton.jit
def _margin(c, rows, rmask, mt_ptr, stride_mr, stride_mc, MARGIN: tl.constexpr, DETACHED: tl.constexpr):
    """f(c) and f'(c) of the target column (eager.margin_value_and_slope), from each row's entry of the
    float64 margin table (margins.margin_table; stride_mr = 0 for a single row), rounded to fp32 here
    as eager rounds the table to its compute dtype. additive: c - m3. angular: cos(theta + m2) - m3
    = c~ cos m2 - sin(theta) sin m2 - m3 with c~ = clamp(c, -1 + 1e-7, 1 - 1e-7), sin(theta) =
    sqrt(1 - c~^2), slope cos m2 + c~ sin m2 / sin(theta) at the clamped point, where c > th; the
    monotonic fallback c - (m2 sin m2 + m3) with slope 1 where c <= th (the strict comparison of the
    unclamped c with the threshold rounded to fp32, as eager). DETACHED: the slope is taken as 1."""
    one = tl.full(c.shape, 1.0, tl.float32)
    if MARGIN == 0:
        f = c
        fp = one
    else:
        row = mt_ptr + rows * stride_mr
        m3 = tl.load(row + _MT_M3 * stride_mc, mask=rmask, other=0.0).to(tl.float32)
        if MARGIN == 1:
            f = c - m3
            fp = one
        else:
            cos_m = tl.load(row + _MT_COS * stride_mc, mask=rmask, other=0.0).to(tl.float32)
            sin_m = tl.load(row + _MT_SIN * stride_mc, mask=rmask, other=0.0).to(tl.float32)
            th = tl.load(row + _MT_TH * stride_mc, mask=rmask, other=0.0).to(tl.float32)
            off = tl.load(row + _MT_OFF * stride_mc, mask=rmask, other=0.0).to(tl.float32)
            cc = tl.minimum(tl.maximum(c, -1.0 + 1e-7), 1.0 - 1e-7)
            sin_t = tl.sqrt_rn(1.0 - cc * cc)
            phi = cc * cos_m - sin_t * sin_m - m3
            dphi = cos_m + tl.div_rn(cc * sin_m, sin_t)
            hard = c > th
            f = tl.where(hard, phi, c - off)
            fp = tl.where(hard, dphi, one)
    if DETACHED:
        fp = one
    return f, fp


def margin_args(margins, margin_kind: str, margin_detached: bool, B: int, placeholder) -> dict:
    """The margin's launch arguments of the per-row kernels: the table's pointer and strides (row
    stride 0 for a single row, which every row shares), MARGIN (the kind's code) and DETACHED."""
    code = MARGIN_CODES[margin_kind]
    if code == 0:
        return dict(mt_ptr=placeholder, stride_mr=0, stride_mc=0, MARGIN=0, DETACHED=bool(margin_detached))
    return dict(mt_ptr=margins, stride_mr=margins.stride(0) if margins.shape[0] == B else 0,
                stride_mc=margins.stride(1), MARGIN=code, DETACHED=bool(margin_detached))


def check_margin_inputs(x, margins, label_smoothing, margin_kind: str) -> None:
    """The margin table and the label smoothing as the op takes them (contract.py), else an error
    naming the argument. Only metadata is read (no host synchronization)."""
    B = x.shape[0]
    if margin_kind not in MARGIN_CODES:
        raise ValueError(f"margin_kind must be one of {tuple(MARGIN_CODES)}, got {margin_kind!r}")
    if margins is None:
        if margin_kind != "none":
            raise ValueError(f"margin_kind={margin_kind!r} needs the margins table, got None")
    else:
        if margins.dim() != 2 or margins.shape[1] != 5 or margins.shape[0] not in (1, B):
            raise ValueError(f"margins must be the (1, 5) or ({B}, 5) table of margins.margin_table, "
                             f"got shape {tuple(margins.shape)}")
        if not margins.is_floating_point() or margins.device != x.device:
            raise ValueError(f"margins must be a floating tensor on {x.device}, got {margins.dtype} on "
                             f"{margins.device}")
    if label_smoothing is not None and (label_smoothing.dim() != 0 or not label_smoothing.is_floating_point()
                                        or label_smoothing.device != x.device):
        raise ValueError(f"label_smoothing must be a 0-d floating tensor on {x.device}, got "
                         f"{label_smoothing.dtype} of shape {tuple(label_smoothing.shape)} on {label_smoothing.device}")



NEGATIVES_CODES = {"none": 0, "mv": 1, "curricular": 2, "filter": 3}


def check_negatives_inputs(x, negatives_table, negatives: str) -> None:
    """The non-target transform's table (margins.negatives_table) as the op takes it, else an error
    naming the argument. Only metadata is read (no host synchronization)."""
    B = x.shape[0]
    if negatives not in NEGATIVES_CODES:
        raise ValueError(f"negatives must be one of {tuple(NEGATIVES_CODES)}, got {negatives!r}")
    if negatives == "none":
        return
    if negatives_table is None:
        raise ValueError(f"negatives={negatives!r} needs the negatives table, got None")
    if (negatives_table.dim() != 2 or negatives_table.shape[1] != 2 or negatives_table.shape[0] not in (1, B)
            or not negatives_table.is_floating_point() or negatives_table.device != x.device):
        raise ValueError(f"negatives_table must be the floating (1, 2) or ({B}, 2) table of margins.negatives_table "
                         f"on {x.device}, got {negatives_table.dtype} of shape {tuple(negatives_table.shape)} on "
                         f"{negatives_table.device}")


@triton.jit
def _negative(c, thr, t, NEG: tl.constexpr):
    """The non-target transform of cosines c (BLOCK_B x BLOCK_C) with per-row thresholds thr and t
    (docs/design.md, "The non-target transforms"): (N(c), N'(c)); hard = c > thr (the mask is a
    constant, t has no gradient): mv t c + t - 1 (slope t), curricular c (t + c) (t + 2c), filter 0 (0)."""
    hard = c > thr[:, None]
    if NEG == 1:
        v = t[:, None] * c + t[:, None] - 1.0
        s = tl.zeros_like(c) + t[:, None]
    elif NEG == 2:
        v = c * (t[:, None] + c)
        s = t[:, None] + 2.0 * c
    else:
        v = tl.zeros_like(c)
        s = tl.zeros_like(c)
    return tl.where(hard, v, c), tl.where(hard, s, 1.0)


def negative_rows(x, weight, target, margins, negatives_table, normalize_weight: bool, margin_kind: str,
                  margin_detached: bool, K: int, ignore_index: int, eps: float):
    """(B, 2) fp32 [threshold, t] per row for the kernels: the table's threshold, or where it is NaN the
    row's margined target cosine f(c_iy) (c_iy from one fp64 dot per row, as the combine kernel forms
    it, the maximum over the K sub-centers), +inf on rows without a valid target. torch ops on B rows
    (no host synchronization)."""
    from ..eager import margin_value_and_slope

    B, D = x.shape
    C = weight.shape[0] // K
    tab = negatives_table.to(torch.float32)
    t, thr = tab[:, 0].expand(B), tab[:, 1].expand(B)
    valid = (target != ignore_index) & (target >= 0) & (target < C)
    col = torch.where(valid, target, torch.zeros_like(target))
    xd = x.double()
    xn = torch.linalg.vector_norm(xd, dim=1).clamp_min(eps)
    idx = (col[:, None] * K + torch.arange(K, device=x.device)[None, :]).reshape(-1)
    w = weight.index_select(0, idx).double().view(B, K, D)
    dot = (w * xd[:, None, :]).sum(-1) / xn[:, None]
    if normalize_weight:
        dot = dot / torch.linalg.vector_norm(w, dim=-1).clamp_min(eps)
    c = dot.max(dim=1).values.to(torch.float32)
    f, _ = margin_value_and_slope(c, margin_kind, margins, margin_detached)
    own = torch.where(valid, f, torch.full_like(f, float("inf")))
    return torch.stack([torch.where(torch.isnan(thr), own, thr), t], dim=1).contiguous()
