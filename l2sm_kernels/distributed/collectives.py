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


def _scatter_rows_sum(g: torch.Tensor, sizes: Sequence[int], rank: int, group, async_op: bool = False):
    """The adjoint of _gather_rows: sum over ranks of g (sum(sizes), ...), this rank's rows. The sum
    is taken in g's dtype. async_op: returns (rows, work) with the collective started; the rows are
    valid after work.wait() (on CUDA that makes the current stream wait: no host sync)."""
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
        work = dist.all_reduce(g, group=group, async_op=async_op)
        out = g[rank * bmax: rank * bmax + sizes[rank]]
    else:
        buf = g.new_empty((bmax,) + tuple(g.shape[1:]))
        work = _reduce_scatter_single(buf, g, group=group, async_op=async_op)
        out = buf[: sizes[rank]]
    return (out, work) if async_op else out


class _PendingRowSum:
    """The overlapped feature-gradient reduction (overlap_grad_reduce=True): the shard op's backward
    starts the reduce-scatter of its dX contribution (start) before it computes dW, and
    _GatherFeatures' backward waits for it (wait). One per call, shared by the two nodes."""

    def __init__(self, sizes, rank, group, dtype):
        self.sizes, self.rank, self.group, self.dtype = sizes, rank, group, dtype
        self.rows = self.work = None

    @property
    def started(self) -> bool:
        return self.work is not None

    def start(self, g: torch.Tensor) -> None:
        self.rows, self.work = _scatter_rows_sum(g.to(self.dtype), self.sizes, self.rank, self.group, async_op=True)

    def wait(self) -> torch.Tensor:
        self.work.wait()
        rows, self.rows, self.work = self.rows, None, None
        return rows


class _GatherFeatures(torch.autograd.Function):
    """(x_r, alpha) -> (X = all rows of every rank in x's dtype, for the op; the same in the compute
    dtype cdt when need_xc and that differs (else an empty tensor), for the torch-op terms of label
    smoothing; alpha).

    Backward: the gradients of both copies are added in cdt, summed over the ranks and each rank
    keeps its rows (reduce-scatter in reduce_dtype: cdt, so that for fp16 / bf16 features the sum is
    rounded to their dtype once, at the end; or the features' dtype, half the bytes, each rank's
    contribution rounded once and the partial sums in that dtype); alpha's gradient is summed over the
    ranks. With `pending` (overlap_grad_reduce), the shard op's dX contribution was already started by
    the shard node (_ShardOpOverlapped): this node waits for it, and reduces what else reached X
    (label smoothing's terms) in a second reduce-scatter. Ranks that hold no class (no shard node)
    run the same collectives with their (zero) contribution. One node for all, so every rank runs the
    backward collectives in the same order."""

    @staticmethod
    def forward(ctx, x, alpha, sizes, rank, group, cdt, need_xc=True, reduce_dtype=None, pending=None):
        ctx.sizes, ctx.rank, ctx.group, ctx.cdt, ctx.xdtype = sizes, rank, group, cdt, x.dtype
        ctx.reduce_dtype, ctx.pending, ctx.need_xc = reduce_dtype or cdt, pending, need_xc
        ctx.rows_shape, ctx.device, ctx.alpha_like = (sum(sizes),) + tuple(x.shape[1:]), x.device, alpha.detach()
        ctx.set_materialize_grads(False)
        X = _gather_rows(x, sizes, group)
        Xc = X.to(cdt) if need_xc and X.dtype != cdt else X.new_empty((0,))
        return X, Xc, alpha.clone()

    @staticmethod
    def backward(ctx, grad_x, grad_xc, grad_alpha):
        gx = ga = None
        if ctx.needs_input_grad[0]:
            g = None if grad_x is None else grad_x.to(ctx.cdt)
            if grad_xc is not None and grad_xc.numel():
                g = grad_xc if g is None else g + grad_xc
            pending = ctx.pending
            if pending is None:
                g = g if g is not None else torch.zeros(ctx.rows_shape, dtype=ctx.cdt, device=ctx.device)
                gx = _scatter_rows_sum(g.to(ctx.reduce_dtype), ctx.sizes, ctx.rank, ctx.group).to(ctx.xdtype)
            else:
                # the first reduce-scatter: the shard op's dX (started under its dW product), or on a rank
                # without a shard node everything that reached X; the second (only with the torch-op
                # terms of label smoothing, ctx.need_xc) the rest
                zeros = lambda: torch.zeros(ctx.rows_shape, dtype=ctx.cdt, device=ctx.device)  # noqa: E731
                if pending.started:
                    rows, rest = pending.wait(), g
                else:
                    pending.start(g if g is not None else zeros())
                    rows, rest = pending.wait(), None
                gx = rows.to(ctx.cdt)
                if ctx.need_xc:
                    rest = rest if rest is not None else zeros()
                    gx = gx + _scatter_rows_sum(rest.to(ctx.reduce_dtype), ctx.sizes, ctx.rank, ctx.group).to(ctx.cdt)
                gx = gx.to(ctx.xdtype)
        if ctx.needs_input_grad[1]:
            ga = grad_alpha.clone() if grad_alpha is not None else torch.zeros_like(ctx.alpha_like)
            dist.all_reduce(ga, group=ctx.group)
        return gx, ga, None, None, None, None, None, None, None


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
