"""Backend "eager": the op's forward and its hand-written backward in plain torch.

This is the verification fallback: it runs on any device and dtype (float64 included, for
gradcheck) and is written to be read against docs/design.md ("The operation", "The backward"), not to be fast. It materializes the B x C
logits in the compute dtype (float32, or float64 for float64 inputs); the fused backends do not.

Notation (docs/design.md, "The operation"): x_hat = x / max(|x|, eps), W_hat likewise when normalize_weight, c = x_hat W_hat^T,
g_ij = c_ij off the target column and f(c_iy) on it, z = alpha g + b, p = softmax_j(z),
lse = logsumexp_j(z), loss_i = (1 - s)(lse_i - z_iy) + s (lse_i - mean_j z_ij).
"""
from __future__ import annotations

import math

import torch

from ..options import ARCFACE_CLAMP, compute_dtype


def normalize_rows(v: torch.Tensor, eps: float):
    """(v / max(|v|, eps), |v| (B, 1)), in v's dtype (callers pass fp32 / fp64)."""
    norm = torch.linalg.vector_norm(v, dim=1, keepdim=True)
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


def margin_value_and_slope(c: torch.Tensor, margin_type: str, m: float):
    """f(c) and f'(c) for the target column (docs/design.md, "The operation")."""
    if margin_type == "none":
        return c, torch.ones_like(c)
    if margin_type == "cosface":
        return c - m, torch.ones_like(c)
    # arcface: cos(theta + m) = c~ cos m - sin(theta) sin m with sin(theta) = sqrt(1 - c~^2);
    # d/dc = cos m + c~ sin m / sin(theta) (the derivative at the clamped point, see reference.py).
    cc = c.clamp(-1 + ARCFACE_CLAMP, 1 - ARCFACE_CLAMP)
    sin_t = torch.sqrt(1 - cc * cc)
    phi = cc * math.cos(m) - sin_t * math.sin(m)
    dphi = math.cos(m) + cc * math.sin(m) / sin_t
    hard = c > math.cos(math.pi - m)  # beyond pi - m, cos(theta + m) is no longer monotonic
    value = torch.where(hard, phi, c - m * math.sin(m))
    slope = torch.where(hard, dphi, torch.ones_like(c))
    return value, slope


def _targets(target: torch.Tensor, num_classes: int, ignore_index: int):
    """valid rows, rows with an out-of-range target (never read: they get NaN), safe column index."""
    valid = target != ignore_index
    in_range = (target >= 0) & (target < num_classes)
    bad = valid & ~in_range
    col = torch.where(valid & in_range, target, torch.zeros_like(target))
    return valid, bad, col


def _logits(x, weight, target, alpha, bias, normalize_weight, margin_type, margin, ignore_index, eps):
    dt = compute_dtype(x, weight, bias)
    x_hat, x_norm = normalize_rows(x.to(dt), eps)
    if normalize_weight:
        w_hat, w_norm = normalize_rows(weight.to(dt), eps)
    else:
        w_hat, w_norm = weight.to(dt), None
    cos = x_hat @ w_hat.T
    valid, bad, col = _targets(target, weight.shape[0], ignore_index)
    c_t = cos.gather(1, col[:, None]).squeeze(1)
    f_t, slope_t = margin_value_and_slope(c_t, margin_type, margin)
    # rows without a (valid) target have no margin: their lse is over the plain logits
    has_t = valid & ~bad
    f_t, slope_t = torch.where(has_t, f_t, c_t), torch.where(has_t, slope_t, torch.ones_like(slope_t))
    g = cos.scatter(1, col[:, None], f_t[:, None])  # g: c with f(c) on the target column
    a = alpha.to(dt)
    z = a * g
    if bias is not None:
        z = z + bias.to(dt)
    return dict(dt=dt, x_hat=x_hat, x_norm=x_norm, w_hat=w_hat, w_norm=w_norm, g=g, z=z,
                valid=valid, bad=bad, col=col, slope_t=slope_t, a=a)


def _without_autocast(fn):
    """The kernels take their inputs' dtypes as given: autocast must not recast the ops inside."""
    import functools

    @functools.wraps(fn)
    def wrapped(first, *args):
        with torch.autocast(device_type=first.device.type, enabled=False):
            return fn(first, *args)

    return wrapped


@_without_autocast
def forward(x, weight, target, alpha, bias, normalize_weight, margin_type, margin, ignore_index,
            label_smoothing, eps, need_x, need_weight, need_bias, need_alpha):
    """-> (loss (B,), lse (B,), aux (0,)), in the compute dtype. Ignored rows: loss 0; rows whose
    target is out of range (and not ignore_index): loss NaN (the public API raises before getting
    here). The backward recomputes everything from lse, so aux is empty."""
    s = label_smoothing
    L = _logits(x, weight, target, alpha, bias, normalize_weight, margin_type, margin, ignore_index, eps)
    z = L["z"]
    lse = torch.logsumexp(z, dim=1)
    z_t = z.gather(1, L["col"][:, None]).squeeze(1)
    loss = (1 - s) * (lse - z_t)
    if s > 0:
        loss = loss + s * (lse - z.mean(dim=1))
    loss = torch.where(L["valid"], loss, torch.zeros_like(loss))
    loss = torch.where(L["bad"], torch.full_like(loss, math.nan), loss)
    return loss, lse, lse.new_empty((0,))


@_without_autocast
def backward(grad_loss, grad_lse, x, weight, target, alpha, bias, lse, aux, normalize_weight, margin_type, margin,
             ignore_index, label_smoothing, eps, need_x, need_weight, need_bias, need_alpha):
    """-> (dx, dW, db, dalpha), each in its input's dtype; an empty tensor for each one not needed."""
    s = label_smoothing
    C = weight.shape[0]
    L = _logits(x, weight, target, alpha, bias, normalize_weight, margin_type, margin, ignore_index, eps)
    dt, z, col = L["dt"], L["z"], L["col"]
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
        # dloss/dc = alpha dz, times f'(c) on the target column
        dc = L["a"] * dz
        dc_t = dc.gather(1, col[:, None]).squeeze(1) * L["slope_t"]
        dc = dc.scatter(1, col[:, None], dc_t[:, None])
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
