"""The plain-torch formula of the loss, differentiated by torch autograd.

This is the reference every backend is tested against (``upcast=True``: the whole computation in
float64) and the baseline "eager torch in the input dtype" that defines the accuracy relation of
docs/conventions.md (``upcast=False``). It builds the full B x C logits matrix; it is not a backend.
Tests and benchmarks import it from here rather than re-deriving it (docs/conventions.md, "Reference in the package").
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .options import ARCFACE_CLAMP


def arcface_target(c: torch.Tensor, m: float) -> torch.Tensor:
    """f(c) = cos(arccos(c~) + m) while c > cos(pi - m), else c - m sin(m); c~ = clamp(c, -1+1e-7, 1-1e-7).

    The clamp is applied "straight through": the value uses c~ and the derivative is f'(c~)
    (= cos m + c~ sin m / sqrt(1 - c~^2)), which is what the contract asks (docs/design.md, "The operation": its derivative uses the
    same clamp) and what every backend computes by hand.
    """
    c_cl = c + (c.clamp(-1 + ARCFACE_CLAMP, 1 - ARCFACE_CLAMP) - c).detach()
    phi = torch.cos(torch.acos(c_cl) + m) if m != 0 else c_cl
    return torch.where(c > math.cos(math.pi - m), phi, c - m * math.sin(m))


def target_margin(c: torch.Tensor, margin_type: str, m: float) -> torch.Tensor:
    if margin_type == "none":
        return c
    if margin_type == "cosface":
        return c - m
    if margin_type == "arcface":
        return arcface_target(c, m)
    raise ValueError(f"unknown margin_type {margin_type!r}")


def l2_softmax_logits_ref(features, weight, target, alpha, bias=None, *, normalize_weight=False,
                          margin=0.0, margin_type="none", ignore_index=-100, eps=1e-12):
    """z (B x C): alpha * x_hat . W_hat_j + b_j, with the margin applied on each row's target column."""
    x_hat = F.normalize(features, dim=1, eps=eps)
    w_hat = F.normalize(weight, dim=1, eps=eps) if normalize_weight else weight
    cos = x_hat @ w_hat.T
    if margin_type != "none":
        valid = target != ignore_index
        t = torch.where(valid, target, 0)
        onehot = F.one_hot(t, weight.shape[0]).to(torch.bool) & valid[:, None]
        cos = torch.where(onehot, target_margin(cos, margin_type, margin), cos)
    z = alpha * cos
    if bias is not None:
        z = z + bias
    return z


def l2_softmax_loss_ref(features, weight, target, alpha=16.0, bias=None, *, normalize_weight=False,
                        margin=0.0, margin_type="none", reduction="mean", ignore_index=-100,
                        label_smoothing=0.0, eps=1e-12, upcast=True):
    """The loss by its definition (docs/design.md, "The operation"), through F.normalize and F.cross_entropy.

    upcast=True computes everything in float64 (the reference); upcast=False computes in the
    promoted input dtype, as a user writing it in plain torch would (the accuracy baseline).
    Returns the loss in the compute dtype.
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
    z = l2_softmax_logits_ref(features, weight, target, alpha, bias, normalize_weight=normalize_weight,
                              margin=margin, margin_type=margin_type, ignore_index=ignore_index, eps=eps)
    return F.cross_entropy(z, target, reduction=reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing)


def plain_formula(features, weight, target, alpha=16.0):
    """The one-liner users write today: F.cross_entropy(alpha * F.normalize(x) @ W.T, y).
    The baseline of the benchmarks."""
    return F.cross_entropy(alpha * F.normalize(features, dim=1) @ weight.T, target)
