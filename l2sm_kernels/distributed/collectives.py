"""The collectives of the class-parallel loss: the features gathered with their gradients scattered
back (_GatherFeatures), the per-row statistics summed over the ranks (_SumOverRanks), and the
row-gather / row-scatter helpers for ranks with uneven batch sizes (docs/design.md, "Class-parallel
training")."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

# How the feature gradients go back to their owners on gloo. "all_reduce" (then each rank takes its
# rows, twice the volume) works with every torch version; "reduce_scatter" needs gloo's reduce_scatter
# (torch 2.13's gloo has it; older ones may not). NCCL and other backends always use reduce_scatter.
# The tests run both.
GLOO_FEATURE_GRAD = "all_reduce"

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _gather_rows(t: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    """All-gather the first dimension of t (rank r holds sizes[r] rows) -> (sum(sizes), ...)."""
    world, bmax = len(sizes), max(sizes)
    if t.shape[0] != bmax:
        t = torch.cat([t, t.new_zeros((bmax - t.shape[0],) + tuple(t.shape[1:]))])
    out = t.new_empty((world * bmax,) + tuple(t.shape[1:]))
    _all_gather_single(out, t.contiguous(), group=group)
    if all(s == bmax for s in sizes):
        return out
    return torch.cat([out[r * bmax: r * bmax + s] for r, s in enumerate(sizes)])


def _scatter_rows_sum(g: torch.Tensor, sizes: Sequence[int], rank: int, group) -> torch.Tensor:
    """The adjoint of _gather_rows: sum over ranks of g (sum(sizes), ...), this rank's rows."""
    world, bmax = len(sizes), max(sizes)
    if not all(s == bmax for s in sizes):
        padded = g.new_zeros((world * bmax,) + tuple(g.shape[1:]))
        start = 0
        for r, s in enumerate(sizes):
            padded[r * bmax: r * bmax + s] = g[start: start + s]
            start += s
        g = padded
    g = g.contiguous()
    if dist.get_backend(group) == "gloo" and GLOO_FEATURE_GRAD != "reduce_scatter":
        g = g.clone()
        dist.all_reduce(g, group=group)
        return g[rank * bmax: rank * bmax + sizes[rank]]
    out = g.new_empty((bmax,) + tuple(g.shape[1:]))
    _reduce_scatter_single(out, g, group=group)
    return out[: sizes[rank]]


class _GatherFeatures(torch.autograd.Function):
    """(x_r, alpha) -> (X = all rows of every rank in x's dtype, for the op; the same in the compute
    dtype cdt when that differs (else an empty tensor), for the torch-op terms; alpha).

    Backward: the gradients of both copies are added in cdt, summed over the ranks and each rank
    keeps its rows (reduce-scatter, in cdt: for fp16 / bf16 features the sum is rounded to their
    dtype once, at the end); alpha's gradient is summed over the ranks. One node for all, so every
    rank runs the backward collectives in the same order."""

    @staticmethod
    def forward(ctx, x, alpha, sizes, rank, group, cdt):
        ctx.sizes, ctx.rank, ctx.group, ctx.cdt, ctx.xdtype = sizes, rank, group, cdt, x.dtype
        X = _gather_rows(x, sizes, group)
        Xc = X.to(cdt) if X.dtype != cdt else X.new_empty((0,))
        return X, Xc, alpha.clone()

    @staticmethod
    def backward(ctx, grad_x, grad_xc, grad_alpha):
        gx = ga = None
        if ctx.needs_input_grad[0]:
            g = grad_x.to(ctx.cdt)
            if grad_xc.numel():
                g = g + grad_xc
            gx = _scatter_rows_sum(g, ctx.sizes, ctx.rank, ctx.group).to(ctx.xdtype)
        if ctx.needs_input_grad[1]:
            ga = grad_alpha.clone()
            dist.all_reduce(ga, group=ctx.group)
        return gx, ga, None, None, None, None


class _SumOverRanks(torch.autograd.Function):
    """all-reduce(SUM) whose backward is the identity: every rank differentiates the same function
    of the sum, so each rank's upstream gradient already is d loss / d (its own summand)."""

    @staticmethod
    def forward(ctx, t, group):
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad):
        return grad, None
