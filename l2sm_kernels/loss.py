"""The public functional API: validate, pick a backend, run its op, reduce."""
from __future__ import annotations

import math
import numbers

import torch

from .backends import ops_for, resolve
from .options import FLOAT_DTYPES, L2SMOptions, check_alpha, check_reduction, compute_dtype


def alpha_lower_bound(num_classes: int, p: float = 0.9) -> float:
    """The paper's lower bound on alpha (Ranjan et al. 2017, eq. 5): log(p (C - 2) / (1 - p)), the
    smallest radius at which a feature can reach target-class probability p among C classes.
    16.0 for C = 1M and p = 0.9."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 3:
        raise ValueError(f"num_classes must be an int >= 3, got {num_classes!r}")
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    return math.log(p * (num_classes - 2) / (1 - p))


def _check_matrix(name: str, t, ndim: int, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {what}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_inputs(features, weight, target, bias, *, weight_name="weight", bias_name="bias",
                 classes="num_classes", allow_no_classes=False) -> None:
    """Ranks, shapes, dtypes and devices of the tensor arguments (features (B, D), weight (C, D),
    target (B,), bias (C,) or None); a TypeError / ValueError naming the argument otherwise."""
    _check_matrix("features", features, 2, "(batch, in_features)")
    _check_matrix(weight_name, weight, 2, f"({classes}, in_features)")
    B, D = features.shape
    C = weight.shape[0]
    if weight.shape[1] != D:
        raise ValueError(
            f"{weight_name} must have shape ({classes}, {D}) to match features of shape {tuple(features.shape)}, "
            f"got {tuple(weight.shape)}"
        )
    if C == 0 and not allow_no_classes:
        raise ValueError(f"{weight_name} must hold at least one class, got shape (0, D)")
    if D == 0:
        raise ValueError("features must have at least one feature dimension, got D = 0")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be an int64 tensor of class indices, got {target.dtype}")
    if target.dim() != 1 or target.shape[0] != B:
        raise ValueError(f"target must have shape ({B},) to match features, got {tuple(target.shape)}")
    if bias is not None:
        _check_matrix(bias_name, bias, 1, f"({classes},)")
        if bias.shape[0] != C:
            raise ValueError(f"{bias_name} must have shape ({C},) to match {weight_name}, got {tuple(bias.shape)}")
    for name, t in ((weight_name, weight), ("target", target), (bias_name, bias)):
        if t is not None and t.device != features.device:
            raise ValueError(f"{name} is on {t.device} but features are on {features.device}")


def _check_targets(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """A target outside [0, C) that is not ignore_index is an error, never a read out of bounds.
    CPU tensors: a ValueError naming the first offending row. CUDA tensors and torch.compile:
    an asynchronous device assert (no host synchronization, as torch's own cross_entropy does);
    the kernels also give such rows a NaN loss, so no plausible number comes out."""
    bad = ((target < 0) & (target != ignore_index)) | (target >= num_classes)
    if target.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"target[{i}] = {int(target[i])} is outside [0, {num_classes}) "
                f"and is not ignore_index={ignore_index}"
            )
    else:
        torch._assert_async(
            ~bad.any(), "l2sm_kernels: a target is outside [0, num_classes) and is not ignore_index"
        )


def _alpha_tensor(alpha, device, dtype) -> torch.Tensor:
    if isinstance(alpha, torch.Tensor):
        if alpha.dim() != 0:
            raise ValueError(f"alpha must be a Python number or a 0-d tensor, got shape {tuple(alpha.shape)}")
        if alpha.dtype not in FLOAT_DTYPES:
            raise TypeError(f"alpha must be a floating-point tensor, got {alpha.dtype}")
        if alpha.device != device:
            if alpha.device.type != "cpu":
                raise ValueError(f"alpha is on {alpha.device} but features are on {device}")
            alpha = alpha.to(device)  # a 0-d CPU scalar moves along (differentiably)
        return alpha
    return torch.full((), check_alpha(alpha), dtype=dtype, device=device)


def l2_softmax_loss(features, weight, target, alpha=16.0, bias=None, *, normalize_weight=False,
                    margin=0.0, margin_type="none", reduction="mean", ignore_index=-100,
                    label_smoothing=0.0, eps=1e-12, backend="auto"):
    """L2-constrained softmax cross-entropy, fused: never builds the B x C logits (except backend
    "eager", the verification fallback).

    z_ij = alpha * f(x_hat_i . W_hat_j) + b_j with x_hat = x / max(|x|, eps), W_hat = W normalized
    when normalize_weight (else W), f the target-column margin ("none", "cosface": c - m,
    "arcface": cos(arccos c + m)), then cross_entropy(z, target) with label_smoothing,
    ignore_index and reduction as torch.nn.functional.cross_entropy.

    Args:
        features: (B, D) float16 / bfloat16 / float32 / float64.
        weight: (C, D) class weights, any float dtype (may differ from features').
        target: (B,) int64 (int32 accepted) class indices in [0, C), or ignore_index.
        alpha: the hypersphere radius: a number > 0, or a 0-d tensor (may require grad; its value
            is used as is, without a host sync, so alpha <= 0 is then the formula applied as written).
        bias: optional (C,) class bias.
        backend: "auto", "eager", "cpu" or "triton" (see l2sm_kernels.available_backends()).

    Returns: the loss in float32 (float64 if features, weight or bias is float64); shape () for
        reduction "mean" / "sum", (B,) for "none" (0 on ignored rows). "mean" averages over rows
        whose target is not ignore_index and is NaN when there are none, as torch does.
    """
    opts = L2SMOptions(normalize_weight=normalize_weight, margin_type=margin_type, margin=margin,
                       ignore_index=ignore_index, label_smoothing=label_smoothing, eps=eps)
    check_reduction(reduction)
    check_inputs(features, weight, target, bias)
    device = features.device
    C = weight.shape[0]
    target = target.long()
    cdt = compute_dtype(features, weight, bias)
    alpha_t = _alpha_tensor(alpha, device, cdt)
    dtypes = {features.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    name = resolve(backend, device.type, dtypes)
    _check_targets(target, C, ignore_index)

    forward_op, _ = ops_for(name)
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and features.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad, grad_on and alpha_t.requires_grad)
    loss, _lse, _aux = forward_op(features, weight, target, alpha_t, bias, *opts.op_args(), *needs)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (target != ignore_index).sum()
