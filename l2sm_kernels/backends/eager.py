"""Backend "eager": the op's forward and its hand-written backward in plain torch.

This is the verification fallback: it runs on any device and dtype (float64 included, for
gradcheck) and is written to be read against docs/design.md ("The operation", "The backward"), not
to be fast. It materializes the B x C logits (B x CK cosines with sub-centers) in the compute dtype
(float32, or float64 for float64 inputs); the fused backends do not.

Notation (docs/design.md, "The operation"): x_hat = x / max(|x|, eps), W_hat likewise when
normalize_weight, c_ij = max_k x_hat_i . W_hat_{jK+k} (K sub-centers per class, K = 1: the plain
product), g_ij = c_ij off the target column and f(c_iy) on it (docs/design.md, "The margins"),
z = alpha g + b, p = softmax_j(z), lse = logsumexp_j(z), loss_i = (1 - s)(lse_i - z_iy) + s (lse_i - mean_j z_ij).
"""
from __future__ import annotations

import math

import torch

from ..margins import COS_M2, M3, NEG_T, NEG_THRESHOLD, OFFSET, SIN_M2, THRESHOLD
from ..options import ARCFACE_CLAMP, compute_dtype


def normalize_rows(v: torch.Tensor, eps: float):
    """(v / max(|v|, eps), |v| (B, 1)), in v's dtype (callers pass fp32 / fp64).

    The norm is accumulated in float64 for float32 rows: a float32 sum of squares overflows once
    |v| > ~1.8e19, which would turn such a row into a zero vector (the norm itself fits float32)."""
    wide = torch.float64 if v.dtype == torch.float32 else v.dtype
    norm = torch.linalg.vector_norm(v, dim=1, keepdim=True, dtype=wide).to(v.dtype)
    return v / norm.clamp_min(eps), norm


def normalize_rows_backward(grad_hat: torch.Tensor, v_hat: torch.Tensor, norm: torch.Tensor, eps: float):
    """d/dv of v_hat = v / max(|v|, eps).

    Where |v| >= eps: d v_hat = (I - v_hat v_hat^T) / |v|, so dv = (g - v_hat (v_hat . g)) / |v|.
    Where |v| < eps the denominator is the constant eps: dv = g / eps (v_hat = v / eps there, and the
    projection term is absent). Both match autograd through F.normalize (clamp_min passes the
    gradient where |v| >= eps). A zero row lands in the second branch: finite, no NaN.
    """
    proj = (v_hat * grad_hat).sum(dim=1, keepdim=True)
    return torch.where(norm >= eps, (grad_hat - v_hat * proj) / norm.clamp_min(eps), grad_hat / eps)


def margin_value_and_slope(c: torch.Tensor, kind: str, table, detached: bool):
    """f(c) and f'(c) of the target column (docs/design.md, "The margins"), from the margin table
    (margins.margin_table: one row, or one per row of c) rounded to c's dtype.

    angular: cos(theta + m2) - m3 = c~ cos m2 - sin(theta) sin m2 - m3 with sin(theta) = sqrt(1 - c~^2),
    d/dc = cos m2 + c~ sin m2 / sin(theta) at the clamped c~; where c <= th (arccos(c) + m2 >= pi, or
    m2 = 0) the fallback c - (m2 sin m2 + m3) with slope 1. detached: the slope is taken as 1."""
    one = torch.ones_like(c)
    if kind == "none":
        return c, one
    tab = table.to(c.dtype)
    if kind == "additive":
        value, slope = c - tab[:, M3], one
    else:
        cos_m, sin_m = tab[:, COS_M2], tab[:, SIN_M2]
        cc = c.clamp(-1 + ARCFACE_CLAMP, 1 - ARCFACE_CLAMP)
        sin_t = torch.sqrt(1 - cc * cc)
        phi = cc * cos_m - sin_t * sin_m - tab[:, M3]
        dphi = cos_m + cc * sin_m / sin_t
        hard = c > tab[:, THRESHOLD]
        value = torch.where(hard, phi, c - tab[:, OFFSET])
        slope = torch.where(hard, dphi, one)
    return value, (one if detached else slope)


def negatives_value_and_slope(c: torch.Tensor, f_t: torch.Tensor, has_t: torch.Tensor, col: torch.Tensor,
                              kind: str, table):
    """The non-target transform N(c) and its slope N'(c) on every column of c (B, C) but the target's
    (docs/design.md, "The non-target transforms"), from the (R, 2) table [t, threshold] rounded to
    c's dtype. Row i's threshold is the table's, or where that is NaN its margined target cosine f_i
    (f_t), or +inf on a row without a target (no hard column). Hard = c_ij > threshold_i, j != y_i:
        mv          t c + t - 1,  slope t
        curricular  c (t + c),    slope t + 2c
        filter      0,            slope 0
    The mask is a constant and t has no gradient; elsewhere N(c) = c with slope 1. Returns (N(c), N'(c))
    or (c, None) for "none"."""
    if kind == "none":
        return c, None
    tab = table.to(c.dtype)
    t, thr = tab[:, NEG_T][:, None], tab[:, NEG_THRESHOLD]
    own = torch.where(has_t, f_t, torch.full_like(f_t, math.inf))
    thr = torch.where(torch.isnan(thr), own, thr)[:, None]
    is_t = has_t[:, None] & (torch.arange(c.shape[1], device=c.device)[None, :] == col[:, None])
    hard = (c > thr) & ~is_t
    one = torch.ones_like(c)
    if kind == "mv":
        value, slope = t * c + t - 1, t.expand_as(c)
    elif kind == "curricular":
        value, slope = c * (t + c), t + 2 * c
    elif kind == "filter":
        value, slope = torch.zeros_like(c), torch.zeros_like(c)
    else:
        raise ValueError(f"negatives must be one of ('none', 'mv', 'curricular', 'filter'), got {kind!r}")
    return torch.where(hard, value, c), torch.where(hard, slope, one)


def _targets(target: torch.Tensor, num_classes: int, ignore_index: int):
    """valid rows, rows with an out-of-range target (never read: they get NaN), safe column index."""
    valid = target != ignore_index
    in_range = (target >= 0) & (target < num_classes)
    bad = valid & ~in_range
    col = torch.where(valid & in_range, target, torch.zeros_like(target))
    return valid, bad, col


def _logits(x, weight, target, alpha, bias, margins, negatives_table, normalize_weight, kind, detached, K,
            ignore_index, eps, negatives):
    dt = compute_dtype(x, weight, bias)
    x_hat, x_norm = normalize_rows(x.to(dt), eps)
    if normalize_weight:
        w_hat, w_norm = normalize_rows(weight.to(dt), eps)
    else:
        w_hat, w_norm = weight.to(dt), None
    cos_all = x_hat @ w_hat.T  # (B, C K)
    B, C = x.shape[0], weight.shape[0] // K
    if K > 1:
        cos, win = cos_all.view(B, C, K).max(dim=2)  # class cosine, winning sub-center (first on ties)
    else:
        cos, win = cos_all, None
    valid, bad, col = _targets(target, C, ignore_index)
    c_t = cos.gather(1, col[:, None]).squeeze(1)
    f_t, slope_t = margin_value_and_slope(c_t, kind, margins, detached)
    # rows without a (valid) target have no margin: their lse is over the plain logits
    has_t = valid & ~bad
    f_t, slope_t = torch.where(has_t, f_t, c_t), torch.where(has_t, slope_t, torch.ones_like(slope_t))
    # the non-target transform (its threshold f_i known before the class pass), then f on the target
    g, slope_nt = negatives_value_and_slope(cos, f_t, has_t, col, negatives, negatives_table)
    # g: N(c) with f(c) on the target column (rows without a target keep N(c) at their dummy column 0)
    g = g.scatter(1, col[:, None], torch.where(has_t, f_t, g.gather(1, col[:, None]).squeeze(1))[:, None])
    a = alpha.to(dt)
    z = a * g
    if bias is not None:
        z = z + bias.to(dt)
    return dict(dt=dt, x_hat=x_hat, x_norm=x_norm, w_hat=w_hat, w_norm=w_norm, g=g, z=z, win=win, K=K,
                valid=valid, bad=bad, col=col, slope_t=slope_t, slope_nt=slope_nt, a=a)


def _without_autocast(fn):
    """The kernels take their inputs' dtypes as given: autocast must not recast the ops inside."""
    import functools

    @functools.wraps(fn)
    def wrapped(first, *args):
        with torch.autocast(device_type=first.device.type, enabled=False):
            return fn(first, *args)

    return wrapped


@_without_autocast
def forward(x, weight, target, alpha, bias, margins, label_smoothing, negatives_table, normalize_weight, margin_kind,
            margin_detached, subcenters, ignore_index, eps, negatives, max_logits_bytes, need_x, need_weight,
            need_bias, need_alpha):
    """-> (loss (B,), lse (B,), aux (0,)), in the compute dtype. Ignored rows: loss 0; rows whose
    target is out of range (and not ignore_index): loss NaN (the public API raises before getting
    here). The backward recomputes everything from lse, so aux is empty. max_logits_bytes is ignored:
    this backend builds the B x C logits in each pass whatever the budget (docs/memory_dial.md)."""
    L = _logits(x, weight, target, alpha, bias, margins, negatives_table, normalize_weight, margin_kind,
                margin_detached, subcenters, ignore_index, eps, negatives)
    z = L["z"]
    lse = torch.logsumexp(z, dim=1)
    z_t = z.gather(1, L["col"][:, None]).squeeze(1)
    loss = lse - z_t
    if label_smoothing is not None:
        s = label_smoothing.to(L["dt"])
        loss = (1 - s) * loss + s * (lse - z.mean(dim=1))
    loss = torch.where(L["valid"], loss, torch.zeros_like(loss))
    loss = torch.where(L["bad"], torch.full_like(loss, math.nan), loss)
    return loss, lse, lse.new_empty((0,))


@_without_autocast
def backward(grad_loss, grad_lse, x, weight, target, alpha, bias, margins, label_smoothing, negatives_table, lse,
             aux, normalize_weight, margin_kind, margin_detached, subcenters, ignore_index, eps, negatives,
             max_logits_bytes, need_x, need_weight, need_bias, need_alpha):
    """-> (dx, dW, db, dalpha), each in its input's dtype; an empty tensor for each one not needed."""
    L = _logits(x, weight, target, alpha, bias, margins, negatives_table, normalize_weight, margin_kind,
                margin_detached, subcenters, ignore_index, eps, negatives)
    dt, z, col = L["dt"], L["z"], L["col"]
    C = z.shape[1]
    s = label_smoothing.to(dt) if label_smoothing is not None else torch.zeros((), dtype=dt, device=z.device)
    # per-row upstream weights: w_t of the target / smoothing terms (the loss's), w_p of p (loss and
    # lse). Ignored rows: their loss is the constant 0, so w_t = 0; their lse still has a gradient.
    # Rows with an out-of-range target carry NaN (never a plausible gradient).
    zero = torch.zeros((), dtype=dt, device=z.device)
    w_t = torch.where(L["valid"], grad_loss.to(dt), zero)
    w_t = torch.where(L["bad"], torch.full_like(w_t, math.nan), w_t)
    w_p = w_t + grad_lse.to(dt)
    # dz_ij = w_p p_ij - w_t ((1 - s) [j = y_i] + s / C)
    p = torch.exp(z - lse.to(dt)[:, None])
    dz = w_p[:, None] * p - (w_t * (s / C))[:, None]
    dz = dz.scatter_add(1, col[:, None], (-(1 - s) * w_t)[:, None])

    def empty(dtype):  # a fresh one each: outputs of a custom op must not alias each other
        return torch.empty(0, device=x.device, dtype=dtype)

    dx = dw = db = dalpha = None
    if need_bias:
        db = dz.sum(dim=0).to(bias.dtype)
    if need_alpha:
        dalpha = (dz * L["g"]).sum().to(alpha.dtype)  # z = alpha g + b
    if need_x or need_weight:
        # dloss/dc = alpha dz, times N'(c) off the target column (the non-target transform's slope:
        # t, t + 2c or 0 on hard entries, 1 elsewhere) and f'(c) on it
        dc = L["a"] * dz
        if L["slope_nt"] is not None:
            dc = dc * L["slope_nt"]
        dc_t = dc.gather(1, col[:, None]).squeeze(1) * L["slope_t"]
        dc = dc.scatter(1, col[:, None], dc_t[:, None])
        if L["K"] > 1:  # each class's gradient goes to its winning sub-center, the others get none
            B = dc.shape[0]
            dc = torch.zeros(B, C, L["K"], dtype=dt, device=dc.device).scatter_(
                2, L["win"][:, :, None], dc[:, :, None]).view(B, C * L["K"])
        if need_x:
            dx_hat = dc @ L["w_hat"]
            dx = normalize_rows_backward(dx_hat, L["x_hat"], L["x_norm"], eps).to(x.dtype)
        if need_weight:
            dw_hat = dc.T @ L["x_hat"]
            if normalize_weight:
                dw_hat = normalize_rows_backward(dw_hat, L["w_hat"], L["w_norm"], eps)
            dw = dw_hat.to(weight.dtype)
    return (
        dx if dx is not None else empty(x.dtype),
        dw if dw is not None else empty(weight.dtype),
        db if db is not None else empty(bias.dtype if bias is not None else x.dtype),
        dalpha if dalpha is not None else empty(alpha.dtype),
    )
