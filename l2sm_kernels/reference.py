"""The plain-torch formula of the loss, differentiated by torch autograd.

This is the reference every backend is tested against (``upcast=True``: the whole computation in
float64) and the baseline "eager torch in the input dtype" that defines the accuracy relation of
docs/conventions.md (``upcast=False``). It builds the full B x C logits matrix; it is not a backend.
Tests and benchmarks import it from here rather than re-deriving it (docs/conventions.md, "Reference
in the package"). It is written from the definition (docs/design.md, "The operation", "The margins"):
arccos and cos for the angular margin and the switch point compared as angles, not the backends'
expansion and cosine threshold, so that a shared bug cannot hide.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .options import ARCFACE_CLAMP, L2SMOptions


def margin_function(c: torch.Tensor, m2, m3, fallback: bool = True) -> torch.Tensor:
    """f(c) = cos(arccos(c~) + m2) - m3 while arccos(c) + m2 < pi, else c - m2 sin(m2) - m3, with
    c~ = clamp(c, -1 + 1e-7, 1 - 1e-7); where m2 = 0 (or absent, None) f(c) = c - m3 exactly.
    m2, m3: None, numbers, or tensors broadcasting against c. fallback=False: the angular form on
    every c where m2 != 0 (InsightFace's CombinedMarginLoss has no fallback past pi).

    The clamp is applied "straight through": the value uses c~ and the derivative is f'(c~), which is
    what the contract asks (the derivative uses the same clamp) and what every backend computes by hand.
    """
    m3 = 0.0 if m3 is None else m3
    if m2 is None:
        return c - m3
    m2 = m2 if isinstance(m2, torch.Tensor) else torch.full((), float(m2), dtype=c.dtype, device=c.device)
    m2 = m2.to(c.dtype)
    c_cl = c + (c.clamp(-1 + ARCFACE_CLAMP, 1 - ARCFACE_CLAMP) - c).detach()
    angular = torch.cos(torch.acos(c_cl) + m2) - m3
    theta = torch.acos(c.detach().clamp(-1.0, 1.0))
    hard = (m2 != 0) & ((theta + m2 < math.pi) | (not fallback))
    fallback = c - m2 * torch.sin(m2) - m3
    return torch.where(hard, angular, fallback)


def target_margin(c: torch.Tensor, opts: L2SMOptions, rows=slice(None)) -> torch.Tensor:
    """f(c) of the options' margin on the target cosines c (B,) (rows: which rows' per-row margins
    apply, for callers that pass a subset); "detached" keeps the value and takes f' as 1."""
    m2, m3 = opts.margin_parts()
    pick = lambda v: v[rows] if isinstance(v, torch.Tensor) and v.dim() == 1 else v  # noqa: E731
    m2, m3 = pick(m2), pick(m3)
    if isinstance(m3, torch.Tensor):
        m3 = m3.to(c.dtype)
    f = margin_function(c, m2, m3, opts.margin_fallback)
    if opts.margin_grad == "detached":
        f = c + (f - c).detach()
    return f


def class_cosines(x_hat: torch.Tensor, w_hat: torch.Tensor, subcenters: int = 1) -> torch.Tensor:
    """(B, C): x_hat . W_hat, the maximum over each class's K sub-centers (rows [jK, jK + K) of W);
    the gradient flows to the winning sub-center (torch.max returns the first, i.e. lowest, index
    among ties)."""
    cos = x_hat @ w_hat.T
    if subcenters == 1:
        return cos
    B, CK = cos.shape
    return cos.view(B, CK // subcenters, subcenters).max(dim=2).values


def non_target_transform(cos: torch.Tensor, target_col: torch.Tensor, has_target: torch.Tensor,
                         f_t: torch.Tensor, kind: str, t) -> torch.Tensor:
    """The non-target transform (docs/design.md, "The non-target transforms") of the cosines cos
    (B, C), written from the papers:

    - "mv" (MV-Softmax, Wang et al. 2020, the fixed variant): a negative is "mis-classified" when
      cos(theta_j) > f(m, theta_y), the margined target; then h(t, cos) = t cos + t - 1.
    - "curricular" (CurricularFace, Huang et al. 2020): hard when cos(theta_j) > cos(theta_y + m);
      then N(t, cos) = cos (t + cos).
    - "filter" (InsightFace's inter-class filtering): cos > t -> 0.
    Only j != y_i; rows without a target (has_target False) have no f_i, so no hard column for "mv"
    and "curricular" (every column is a negative for "filter"). The mask is built from detached
    values (a constant) and t is detached: the gradient on a hard entry is t, t + 2 cos, 0."""
    if kind == "none":
        return cos
    t = t.detach() if isinstance(t, torch.Tensor) else t
    c = cos.detach()
    if kind == "filter":
        thr = (t.to(c.dtype).expand(c.shape[0]) if isinstance(t, torch.Tensor)
               else torch.full_like(c[:, 0], float(t)))
    else:
        thr = torch.where(has_target, f_t.detach(), torch.full_like(f_t, math.inf))
    cols = torch.arange(c.shape[1], device=c.device)
    is_target = has_target[:, None] & (cols[None, :] == target_col[:, None])
    hard = (c > thr[:, None]) & ~is_target
    if kind == "mv":
        new = t * cos + t - 1
    elif kind == "curricular":
        new = cos * (t + cos)
    elif kind == "filter":
        new = torch.zeros_like(cos)
    else:
        raise ValueError(f"unknown negatives {kind!r}")
    return torch.where(hard, new, cos)


def l2_softmax_logits_ref(features, weight, target, alpha, bias=None, *, normalize_weight=False,
                          margin=0.0, margin_type="none", ignore_index=-100, eps=1e-12, subcenters=1,
                          margin_grad="exact", margin_fallback=True, negatives="none", negatives_t=None):
    """z (B x C): alpha * max_k x_hat . W_hat_{jK+k} + b_j, with the margin applied on each row's
    target column and the non-target transform on the others."""
    opts = L2SMOptions(normalize_weight=normalize_weight, margin_type=margin_type, margin=margin,
                       ignore_index=ignore_index, eps=eps, subcenters=subcenters, margin_grad=margin_grad,
                       margin_fallback=margin_fallback, negatives=negatives, negatives_t=negatives_t)
    x_hat = F.normalize(features, dim=1, eps=eps)
    w_hat = F.normalize(weight, dim=1, eps=eps) if normalize_weight else weight
    cos = class_cosines(x_hat, w_hat, subcenters)
    valid = (target != ignore_index) & (target >= 0) & (target < cos.shape[1])
    col = torch.where(valid, target, torch.zeros_like(target))[:, None]
    c_t = cos.gather(1, col).squeeze(1)
    f_t = torch.where(valid, target_margin(c_t, opts), c_t) if opts.margin_kind != "none" else c_t
    t = opts.negatives_t
    if isinstance(t, torch.Tensor):
        t = t.to(cos.dtype)
    cos = non_target_transform(cos, col[:, 0], valid, f_t, opts.negatives, t)
    if opts.margin_kind != "none":
        cols = torch.arange(cos.shape[1], device=cos.device)
        cos = torch.where(valid[:, None] & (cols[None, :] == col), f_t[:, None], cos)
    z = alpha * cos
    if bias is not None:
        z = z + bias
    return z


def l2_softmax_loss_ref(features, weight, target, alpha=16.0, bias=None, *, normalize_weight=False,
                        margin=0.0, margin_type="none", reduction="mean", ignore_index=-100,
                        label_smoothing=0.0, eps=1e-12, subcenters=1, margin_grad="exact", margin_fallback=True,
                        negatives="none", negatives_t=None, upcast=True):
    """The loss by its definition (docs/design.md, "The operation"), through F.normalize and F.cross_entropy.

    upcast=True computes everything in float64 (the reference); upcast=False computes in the
    promoted input dtype, as a user writing it in plain torch would (the accuracy baseline).
    Per-row margins (tensors) are used as given (upcast to float64 with upcast=True); a label
    smoothing tensor is read on the host. Returns the loss in the compute dtype.
    """
    tensors = [features, weight] + ([bias] if bias is not None else [])
    if upcast:
        dt = torch.float64
    else:
        dt = features.dtype
        for t in tensors[1:]:
            dt = torch.promote_types(dt, t.dtype)
    features, weight = features.to(dt), weight.to(dt)
    bias = bias.to(dt) if bias is not None else None
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.to(dt)
    if isinstance(margin, torch.Tensor):
        margin = margin.to(dt)
    elif isinstance(margin, (tuple, list)):
        margin = tuple(m.to(dt) if isinstance(m, torch.Tensor) else m for m in margin)
    if isinstance(label_smoothing, torch.Tensor):
        label_smoothing = float(label_smoothing)
    if isinstance(negatives_t, torch.Tensor):
        negatives_t = negatives_t.detach().to(dt)
    z = l2_softmax_logits_ref(features, weight, target, alpha, bias, normalize_weight=normalize_weight,
                              margin=margin, margin_type=margin_type, ignore_index=ignore_index, eps=eps,
                              subcenters=subcenters, margin_grad=margin_grad, margin_fallback=margin_fallback,
                              negatives=negatives, negatives_t=negatives_t)
    return F.cross_entropy(z, target, reduction=reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing)


def plain_formula(features, weight, target, alpha=16.0):
    """The one-liner users write today: F.cross_entropy(alpha * F.normalize(x) @ W.T, y).
    The baseline of the benchmarks."""
    return F.cross_entropy(alpha * F.normalize(features, dim=1) @ weight.T, target)
