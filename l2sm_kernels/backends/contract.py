"""The op boundary: one forward/backward pair of torch.library ops per backend, same schema for all.

    l2sm::{backend}_forward(x, weight, target, alpha, bias?, margins?, label_smoothing?, negatives_table?,
                            <options>, <needs>) -> (loss, lse, aux)
    l2sm::{backend}_backward(grad_loss, grad_lse, x, weight, target, alpha, bias?, margins?, label_smoothing?,
                             negatives_table?, lse, aux, <options>, <needs>)
        -> (grad_x, grad_weight, grad_bias, grad_alpha)

Contract every implementation honours (docs/design.md, "The operation"):
- x (B, D), weight (C K, D) (K = subcenters: rows [jK, jK + K) are class j's sub-centers; class j's
  cosine is their maximum, ties to the lowest row), bias (C,) or None: float16 / bfloat16 / float32 /
  float64, any strides, dtypes may differ. target (B,) int64. alpha: 0-d floating tensor (on x's device).
- margins: None (margin_kind "none") or the (R, 5) float64 table of margins.margin_table, R = 1 (one
  margin for every row) or B (per-row margins); the target column's logit is alpha f(c) + b with f of
  docs/design.md, "The margins". label_smoothing: None (no smoothing) or a 0-d float64 tensor s.
  negatives_table: None (negatives "none") or the (R, 2) float64 [t, threshold] table of
  margins.negatives_table: the non-target transform of docs/design.md, "The non-target transforms"
  (on j != y_i with c_ij > threshold_i, a NaN threshold meaning the row's margined target cosine
  f(c_iy); rows without a valid target have no f: no hard column). None of the three has a gradient.
- loss (B,): per-row loss, 0 on rows whose target == ignore_index, NaN on rows whose target is
  outside [0, C) (never read out of bounds). lse (B,): logsumexp_j z_ij. Both in compute_dtype()
  (float64 if any of x, weight, bias is float64, else float32).
- aux: backend-defined per-row statistics the backward wants besides lse (for example
  O_i = sum_j p_ij W_hat_j, which gives dX without a second pass over the classes). Its shape and
  dtype are a function of the inputs' metadata and <needs> (the backend's aux_meta); backends that
  need nothing return an empty (0,) tensor of the compute dtype.
- <needs> = need_x, need_weight, need_bias, need_alpha. In the forward they are hints: which
  gradients the public API expects to be asked for (all False under no_grad), so the forward may
  prepare aux for them. The backward's flags say which gradients to compute; it must honour them
  even where the forward's hints were False (then aux may lack what it wants: recompute it). The
  backward returns an empty (numel 0) tensor for each gradient not asked for, at no cost.
- grad_loss (B,), grad_lse (B,): the upstream gradients of each row's loss and of its lse
  (reductions happen outside the op). Both outputs are differentiable:
      dz_ij = (grad_loss_i + grad_lse_i) p_ij - grad_loss_i ((1 - s) [j = y_i] + s / C),
  with grad_loss_i taken as 0 on ignored rows (their loss is the constant 0; their lse is not).
  A differentiable lse is what class-parallel training composes with (a rank's lse over its shard
  enters the global logsumexp). The autograd formula passes zeros for an unused output.
  Returned gradients are in their input's dtype. Nothing is written into any input.
- <options> = normalize_weight, margin_kind ("none" | "additive" | "angular": which part of the table
  applies), margin_detached (the gradient w.r.t. the target cosine as if f'(c) = 1), subcenters (K),
  ignore_index, eps, negatives ("none" | "mv" | "curricular" | "filter"), max_logits_bytes: see
  options.L2SMOptions.op_args().
- max_logits_bytes (None: the backend's default; else >= 0, already checked): the most bytes of logits
  the forward may keep for the backward (docs/memory_dial.md). A backend that keeps logits returns
  them inside aux (so that autograd saves them; aux's size is then a function of the metadata and this
  budget, as aux_meta says); one that keeps none ignores it (eager builds the logits anyway; the
  fused triton kernels keep nothing, so any budget bounds them).

Per backend the forward op's autograd formula calls its own backward op; the backward op itself has
no derivative (double backward raises a clear error).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..options import compute_dtype

NAMESPACE = "l2sm"

_OPTS = ("bool normalize_weight, str margin_kind, bool margin_detached, int subcenters, int ignore_index, float eps, "
         "str negatives, int? max_logits_bytes")
_NEEDS = "bool need_x, bool need_weight, bool need_bias, bool need_alpha"
_INPUTS = ("Tensor x, Tensor weight, Tensor target, Tensor alpha, Tensor? bias, Tensor? margins, "
           "Tensor? label_smoothing, Tensor? negatives_table")
FORWARD_SCHEMA = f"({_INPUTS}, {_OPTS}, {_NEEDS}) -> (Tensor, Tensor, Tensor)"
BACKWARD_SCHEMA = (
    f"(Tensor grad_loss, Tensor grad_lse, {_INPUTS}, Tensor lse, Tensor aux, {_OPTS}, {_NEEDS}) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)
# Number of input tensors, of option arguments and of need flags, in the order of both schemas.
N_INPUTS = 8
N_OPTS = 8
N_NEEDS = 4


def forward_name(backend: str) -> str:
    return f"{NAMESPACE}::{backend}_forward"


def backward_name(backend: str) -> str:
    return f"{NAMESPACE}::{backend}_backward"


def empty_aux(x, weight, target, alpha, bias, *rest):
    """The aux of backends that save nothing besides lse: an empty tensor of the compute dtype."""
    return x.new_empty((0,), dtype=compute_dtype(x, weight, bias))


def _make_fake_forward(aux_meta):
    def fake_forward(x, weight, target, alpha, bias, *rest):
        dt = compute_dtype(x, weight, bias)
        B = x.shape[0]
        aux = aux_meta(x, weight, target, alpha, bias, *rest)
        return x.new_empty((B,), dtype=dt), x.new_empty((B,), dtype=dt), aux

    return fake_forward


def _fake_backward(grad_loss, grad_lse, x, weight, target, alpha, bias, margins, label_smoothing, negatives_table,
                   lse, aux, *rest):
    need_x, need_weight, need_bias, need_alpha = rest[N_OPTS:]
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else x.new_empty((0,)),
        torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else weight.new_empty((0,)),
        torch.empty_like(bias) if need_bias else x.new_empty((0,), dtype=bias.dtype if bias is not None else x.dtype),
        torch.empty_like(alpha) if need_alpha else alpha.new_empty((0,)),
    )


def _make_autograd(backward_op):
    def setup_context(ctx, inputs, output):
        ctx.opts = tuple(inputs[N_INPUTS:N_INPUTS + N_OPTS])
        loss, lse, aux = output
        ctx.mark_non_differentiable(aux)
        # no zero-filled gradient for aux (its size is the backend's: with the memory dial it holds kept
        # logits, up to B x C values) nor for an unused loss / lse: backward gets None and handles it
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*inputs[:N_INPUTS], lse, aux)

    def backward(ctx, grad_loss, grad_lse, grad_aux):
        saved = ctx.saved_tensors
        inputs, (lse, aux) = saved[:N_INPUTS], saved[N_INPUTS:]
        bias = inputs[4]
        need = ctx.needs_input_grad
        needs = (need[0], need[1], bias is not None and need[4], need[3])
        if grad_loss is None and grad_lse is None:
            return (None,) * (N_INPUTS + N_OPTS + N_NEEDS)
        grad_loss = torch.zeros_like(lse) if grad_loss is None else grad_loss
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
        gx, gw, gb, ga = backward_op(grad_loss, grad_lse, *inputs, lse, aux, *ctx.opts, *needs)
        # x, weight, target, alpha, bias; the margins, the label smoothing and the negatives' table get none
        return (gx if needs[0] else None, gw if needs[1] else None, None, ga if needs[3] else None,
                gb if needs[2] else None) + (None,) * (N_INPUTS - 5 + N_OPTS + N_NEEDS)

    return setup_context, backward


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "l2sm_kernels: double backward is not supported (the loss's backward op has no derivative); "
        "do not differentiate the gradients of l2_softmax_loss (create_graph=True)"
    )


def _no_double_backward_setup(ctx, inputs, output):
    pass


def register_backend_ops(backend: str, forward_op, backward_op, aux_meta=empty_aux) -> None:
    """Attach the shared fake (meta) kernels and autograd formula to one backend's op pair.
    forward_op / backward_op: the op objects (a CustomOpDef, or torch.ops.l2sm.<name>.default for
    ops defined in C++). aux_meta(forward's arguments) -> an empty tensor shaped like the aux the
    backend's forward returns."""
    torch.library.register_fake(forward_op)(_make_fake_forward(aux_meta))
    torch.library.register_fake(backward_op)(_fake_backward)
    setup_context, backward = _make_autograd(backward_op)
    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)
    torch.library.register_autograd(backward_op, _no_double_backward, setup_context=_no_double_backward_setup)


def define_python_backend(backend: str, forward_impl: Callable, backward_impl: Callable, aux_meta=empty_aux):
    """Define l2sm::{backend}_forward / _backward as Python custom ops with the shared schemas,
    implemented by forward_impl / backward_impl, and register fake + autograd. Returns the pair."""
    fwd = torch.library.custom_op(forward_name(backend), forward_impl, mutates_args=(), schema=FORWARD_SCHEMA)
    bwd = torch.library.custom_op(backward_name(backend), backward_impl, mutates_args=(), schema=BACKWARD_SCHEMA)
    register_backend_ops(backend, fwd, bwd, aux_meta)
    return fwd, bwd


# Filled in by each backend module as it registers: backend name -> (forward op, backward op).
OPS: dict[str, tuple] = {}
