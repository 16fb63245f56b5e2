"""The op boundary: one forward/backward pair of torch.library ops per backend, same schema for all.

    l2sm::{backend}_forward(x, weight, target, alpha, bias?, <options>) -> (loss, lse)
    l2sm::{backend}_backward(grad_loss, x, weight, target, alpha, bias?, lse, <options>,
                             need_x, need_weight, need_bias, need_alpha)
        -> (grad_x, grad_weight, grad_bias, grad_alpha)

Contract every implementation honours (DESIGN.md "The operation"):
- x (B, D), weight (C, D), bias (C,) or None: float16 / bfloat16 / float32 / float64, any strides,
  dtypes may differ. target (B,) int64. alpha: 0-d floating tensor (on x's device).
- loss (B,): per-row loss, 0 on rows whose target == ignore_index, NaN on rows whose target is
  outside [0, C) (never read out of bounds). lse (B,): logsumexp_j z_ij. Both in compute_dtype()
  (float64 if any of x, weight, bias is float64, else float32).
- grad_loss (B,): the upstream gradient of each row's loss (reductions happen outside the op).
  Returned gradients are in their input's dtype; a gradient whose need_* is False is an empty
  (numel 0) tensor and costs nothing. Nothing is written into any input.
- <options> = normalize_weight, margin_type ("none" | "cosface" | "arcface"), margin,
  ignore_index, label_smoothing, eps: see options.L2SMOptions.

Per backend the forward op's autograd formula calls its own backward op; the backward op itself has
no derivative (double backward raises a clear error).
"""
from __future__ import annotations

from typing import Callable

import torch

from .options import compute_dtype

NAMESPACE = "l2sm"

_OPTS = "bool normalize_weight, str margin_type, float margin, int ignore_index, float label_smoothing, float eps"
FORWARD_SCHEMA = (
    f"(Tensor x, Tensor weight, Tensor target, Tensor alpha, Tensor? bias, {_OPTS}) -> (Tensor, Tensor)"
)
BACKWARD_SCHEMA = (
    f"(Tensor grad_loss, Tensor x, Tensor weight, Tensor target, Tensor alpha, Tensor? bias, Tensor lse, {_OPTS}, "
    "bool need_x, bool need_weight, bool need_bias, bool need_alpha) -> (Tensor, Tensor, Tensor, Tensor)"
)
# Number of option arguments that follow the tensors in both schemas.
N_OPTS = 6


def forward_name(backend: str) -> str:
    return f"{NAMESPACE}::{backend}_forward"


def backward_name(backend: str) -> str:
    return f"{NAMESPACE}::{backend}_backward"


def _fake_forward(x, weight, target, alpha, bias, *opts):
    dt = compute_dtype(x, weight, bias)
    B = x.shape[0]
    return x.new_empty((B,), dtype=dt), x.new_empty((B,), dtype=dt)


def _fake_backward(grad_loss, x, weight, target, alpha, bias, lse, *rest):
    need_x, need_weight, need_bias, need_alpha = rest[N_OPTS:]
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else x.new_empty((0,)),
        torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else weight.new_empty((0,)),
        torch.empty_like(bias) if need_bias else x.new_empty((0,), dtype=bias.dtype if bias is not None else x.dtype),
        torch.empty_like(alpha) if need_alpha else alpha.new_empty((0,)),
    )


def _make_autograd(backward_op):
    def setup_context(ctx, inputs, output):
        x, weight, target, alpha, bias = inputs[:5]
        ctx.opts = tuple(inputs[5:])
        loss, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(x, weight, target, alpha, bias, lse)

    def backward(ctx, grad_loss, grad_lse):
        x, weight, target, alpha, bias = ctx.saved_tensors[:5]
        lse = ctx.saved_tensors[5]
        need = ctx.needs_input_grad
        need_x, need_w, need_a = need[0], need[1], need[3]
        need_b = bias is not None and need[4]
        if grad_loss is None:  # only lse was used downstream: lse is not differentiable
            return (None,) * (5 + N_OPTS)
        gx, gw, gb, ga = backward_op(grad_loss, x, weight, target, alpha, bias, lse, *ctx.opts,
                                     need_x, need_w, need_b, need_a)
        return (gx if need_x else None, gw if need_w else None, None, ga if need_a else None,
                gb if need_b else None) + (None,) * N_OPTS

    return setup_context, backward


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "l2sm_kernels: double backward is not supported (the loss's backward op has no derivative); "
        "do not differentiate the gradients of l2_softmax_loss (create_graph=True)"
    )


def _no_double_backward_setup(ctx, inputs, output):
    pass


def register_backend_ops(backend: str, forward_op, backward_op) -> None:
    """Attach the shared fake (meta) kernels and autograd formula to one backend's op pair.
    forward_op / backward_op: the op objects (a CustomOpDef, or torch.ops.l2sm.<name>.default for
    ops defined in C++)."""
    torch.library.register_fake(forward_op)(_fake_forward)
    torch.library.register_fake(backward_op)(_fake_backward)
    setup_context, backward = _make_autograd(backward_op)
    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)
    torch.library.register_autograd(backward_op, _no_double_backward, setup_context=_no_double_backward_setup)


def define_python_backend(backend: str, forward_impl: Callable, backward_impl: Callable):
    """Define l2sm::{backend}_forward / _backward as Python custom ops with the shared schemas,
    implemented by forward_impl / backward_impl, and register fake + autograd. Returns the pair."""
    fwd = torch.library.custom_op(forward_name(backend), forward_impl, mutates_args=(), schema=FORWARD_SCHEMA)
    bwd = torch.library.custom_op(backward_name(backend), backward_impl, mutates_args=(), schema=BACKWARD_SCHEMA)
    register_backend_ops(backend, fwd, bwd)
    return fwd, bwd


# Filled in by each backend module as it registers: backend name -> (forward op, backward op).
OPS: dict[str, tuple] = {}
