"""Class-parallel L2-softmax loss over torch.distributed, with optional Partial FC negative sampling.

When one device cannot hold the class matrix (C = 100k .. 2M identities), each rank keeps a contiguous
shard of its rows, W[class_start : class_start + n_r), and the ranks compute the loss of the whole
global batch together (Megatron's vocab-parallel cross-entropy, InsightFace's Partial FC).

How one step works (rank r; B_g = sum of the ranks' batch sizes; notation of docs/design.md, "The operation"):
1. all-gather the features (B_g x D, in their dtype) and the targets (B_g int64).
2. run this rank's backend forward op (ops.py boundary, the fused per-shard kernels: no B_g x C
   matrix exists anywhere) on the global batch and its own shard, with the LOCAL target index
   (target - class_start) on rows whose target lies in the shard and ignore (-1) elsewhere, and no
   label smoothing. Its outputs are lse_r,i = logsumexp over the shard's classes (with the margin
   on the target column where the shard owns it) and loss_r,i = lse_r,i - z_iy on owned rows, so
   the target logit z_iy = lse_r,i - loss_r,i comes out of the op, differentiably.
3. all-reduce(MAX) of lse_r (B_g), then one all-reduce(SUM) of the stacked B_g-vectors
   exp(lse_r - max), the owned target logit, the shard's sum of logits (only with label smoothing:
   sum_j z_ij = alpha (x_hat_i . sum_j W_hat_j + [f(c_iy) - c_iy]) + sum_j b_j, B_g x D torch ops),
   the owner count (validates targets) and the number of classes (or sampled classes).
   lse_i = max_i + log(sum), loss_i = lse_i - (1 - s) z_iy - (s / C) sum_j z_ij.
4. backward: every rank holds the same global loss and computes the same upstream gradient of the
   all-reduced statistics, so the SUM all-reduce's backward is the identity (no communication);
   d lse_i / d lse_r,i = exp(lse_r,i - lse_i) is local; the rank's backward op (fed grad_loss and
   grad_lse, see ops.py) gives dW and db of its shard locally and its contribution to dX for all
   B_g rows; a reduce-scatter sums those contributions and hands each rank the rows it owns. A
   learnable alpha's gradient (each rank holds a replica) is all-reduced. overlap_grad_reduce: the
   backward op is called for dX first, its reduce-scatter started asynchronously, then called again
   for dW (db, d alpha) while it runs (_ShardOpOverlapped, collectives._PendingRowSum).

Communication per step (W never moves; f = bytes of the features' dtype, 4 or 8 for the statistics):
    forward:  all-gather B_g x D features (B_g D f bytes) + B_g int64 targets,
              all-reduce(MAX) of B_g values, all-reduce(SUM) of 3 or 4 B_g-vectors (+1 value);
              the agreement check: the table's all-gather of 37 int64 per rank (every call on CPU
              tensors, the first call per module / group on CUDA) or the device check's 8 (later
              CUDA calls): see below.
    backward: reduce-scatter of the B_g x D feature gradients in the compute dtype (B_g D 4 bytes for
              fp32 / fp16 / bf16 features: the sum over ranks is rounded to the features' dtype once;
              grad_reduce_dtype="features": in the features' dtype, B_g D 2 bytes for bf16; with gloo
              an all-reduce of them by default); an all-reduce of one value for a learnable alpha.
    This does not depend on C: for B_g = 8 x 128 = 1024, D = 512, bf16 features it is 1 MiB gathered
    and 2 MiB reduce-scattered, while the shard of W (C/P x D) and its gradient stay on their rank
    (docs/design.md, "The communication model", for P = 8 and 64).

Scaling with P ranks (C classes, B per rank, B_g = P B):
    memory per rank:  W shard and its gradient C/P x D; the fused op's workspace for a B_g x C/P
                      problem (no B_g x C/P matrix with the fused backends; the eager backend
                      builds one); B_g x D gathered features and their gradient (a few B_g x D
                      temporaries more with label smoothing). Sampling at rate q copies the
                      sampled rows: q C/P x D more (and their gradient).
    compute per rank: the fused forward + backward on B_g x C/P x D: 8 B_g (C/P) D FLOPs, i.e.
                      constant in P at a fixed per-rank batch (B_g grows as C/P shrinks), and
                      about q times that with Partial FC sampling.
    communication:    O(B_g D) per step, independent of C; it grows with P at a fixed per-rank batch.

Requirements and conventions:
- Every rank of `group` calls with the same D, dtypes, options, alpha (value and dtype), batch
  layout, requires_grad pattern and grad mode, and the shards tile [0, C). The agreement check
  (agreement.py: _check_ranks) gathers all of these (and each rank's batch size, class_start, shard size, and
  whether its arguments passed local validation) in ONE all-gather before any collective whose
  size depends on them, and every rank raises the same error on a mismatch (instead of gloo's
  SIGABRT or a hang until the process-group timeout). It runs on every call for CPU tensors, and on
  the first call per module (per group for the functional form) for CUDA tensors, where reading
  the gathered table is a host sync. Later CUDA calls run the device check (_check_ranks_on_device:
  a fixed-size all-gather of a hash compared on the device, torch._assert_async on a mismatch, no
  host read); AGREEMENT selects (below). A target that no shard or two shards own on CUDA triggers
  an asynchronous device assert and the row's loss is NaN. The targets are range-checked on CPU
  tensors only.
- Batch sizes: equal on every rank, or pass batch_sizes (the same list on every rank) for uneven
  ones; rows are padded to the largest for the collectives.
- The result is the loss of the global batch, the same on every rank. reduction="none" returns the
  B_g per-row losses in rank order (rank 0's rows first). The upstream gradient must be the same on
  every rank (it is for any function of the global loss computed identically on every rank).
  DistributedDataParallel around a backbone that feeds the loss averages the backbone's gradients
  over the ranks, so the backbone gets 1/P of the global loss's gradient unless a communication
  hook sums them (demo/class_parallel_training.py). DDP around the head itself is refused.
- No host synchronization in the CUDA path, except in Partial FC sampling (the number of positive
  classes decides the sample size, as in InsightFace's PartialFC whose torch.unique syncs too), the
  first call's agreement table and batch_sizes="auto" (the table on every call).
"""
from __future__ import annotations

import dataclasses
import math
import weakref

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..backends import ops_for, resolve
from ..loss import _alpha_tensor, check_inputs, check_option_tensors, warn_angular_unnormalized
from ..options import (
    L2SMOptions,
    check_int,
    check_reduction,
    check_sample_rate,
    compute_dtype,
)
from ..reference import target_margin
from ..sampling import partial_fc_sample
from .agreement import _Args, _check_ranks, _check_ranks_on_device
from .collectives import _gather_rows, _GatherFeatures, _PendingRowSum, _SumOverRanks
from .rank_device import _check_rank_device

__all__ = ["class_parallel_l2_softmax_loss", "partial_fc_sample", "shard_sizes"]

# The index the per-shard op sees on rows whose target is not in the shard: never a valid local index.
_LOCAL_IGNORE = -1
# the dtype the feature gradients are summed over the ranks in (grad_reduce_dtype)
GRAD_REDUCE_DTYPES = ("compute", "features")


# ---------------------------------------------------------------------------------------------
# layout helpers
# ---------------------------------------------------------------------------------------------
def shard_sizes(num_classes: int, world_size: int) -> list[int]:
    """The default split of num_classes over world_size ranks: contiguous, the first
    num_classes % world_size ranks one class more (as InsightFace's PartialFC)."""
    q, rem = divmod(num_classes, world_size)
    return [q + (r < rem) for r in range(world_size)]


def _check_targets(target_g: torch.Tensor, num_classes: int, ignore_index: int, sizes) -> None:
    """CPU: every target of the global batch is in [0, C) or ignore_index (the same error on every rank)."""
    bad = (target_g != ignore_index) & ((target_g < 0) | (target_g >= num_classes))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        r, first = 0, 0
        while i >= first + sizes[r]:
            first += sizes[r]
            r += 1
        raise ValueError(
            f"target[{i - first}] on rank {r} = {int(target_g[i])} is outside [0, {num_classes}) "
            f"and is not ignore_index={ignore_index}"
        )


# ---------------------------------------------------------------------------------------------
# the ranks' agreement check (docs/reliability.md, case 29)
# ---------------------------------------------------------------------------------------------
# How each call checks that the ranks agree (docs/class_parallel.md, "The agreement check"):
#   "auto":   CPU tensors: the table (_check_ranks: every value in the clear, the error names what differs)
#             on every call. CUDA tensors: the table on the first call per module (per group for the
#             functional form), then the device check (_check_ranks_on_device: one fixed-size all-gather
#             compared on the device, no host sync) on every later call.
#   "table":  the table on every call (on CUDA one host sync per call).
#   "device": CPU tensors follow CUDA's schedule too (the table first, then the device check): the CUDA
#             code path, runnable under gloo (the tests use it).
# batch_sizes="auto" takes the table on every call (the gathered batch sizes size the collectives).
AGREEMENT = "auto"
AGREEMENT_MODES = ("auto", "table", "device")
# the older switch: True is AGREEMENT = "table"
CHECK_EVERY_CALL = False

# what the table has passed once for (modules, process groups); weak, so nothing keeps a group alive
_CHECKED: weakref.WeakSet = weakref.WeakSet()


def _check_mode(device: torch.device, key, auto_sizes: bool = False):
    """Which agreement check this call runs: "table", "device", or None (under torch.compile)."""
    if torch.compiler.is_compiling():
        return None
    if AGREEMENT not in AGREEMENT_MODES:
        raise ValueError(f"l2sm_kernels.distributed.class_parallel.AGREEMENT must be one of {AGREEMENT_MODES}, "
                         f"got {AGREEMENT!r}")
    if auto_sizes or CHECK_EVERY_CALL or AGREEMENT == "table":
        return "table"
    if device.type == "cpu" and AGREEMENT == "auto":
        return "table"
    try:
        return "device" if key in _CHECKED else "table"
    except TypeError:  # not weakly referenceable: the table every call
        return "table"


def _check_due(device: torch.device, key) -> bool:
    """Whether this call runs the table (the host-read check)."""
    return _check_mode(device, key) == "table"


def _mark_checked(device: torch.device, key) -> None:
    if device.type != "cpu" or AGREEMENT == "device":
        try:
            _CHECKED.add(key)
        except TypeError:
            pass


# ---------------------------------------------------------------------------------------------
# the loss
# ---------------------------------------------------------------------------------------------
def class_parallel_l2_softmax_loss(features, weight_shard, target, class_start, alpha=16.0, bias_shard=None, *,
                                   group=None, normalize_weight=False, margin=0.0, margin_type="none",
                                   reduction="mean", ignore_index=-100, label_smoothing=0.0, eps=1e-12,
                                   subcenters=1, margin_grad="exact", backend="auto", batch_sizes=None,
                                   sample_rate=1.0, generator=None, overlap_grad_reduce=False,
                                   grad_reduce_dtype="compute", max_logits_bytes=None, negatives="none",
                                   negatives_t=None, margin_fallback=True):
    """The L2-softmax loss of the global batch with the class matrix sharded over the ranks of `group`.

    Args:
        features: (B, D) this rank's rows of the batch.
        weight_shard: (n K, D): classes [class_start, class_start + n) of the global class matrix, K rows
            (sub-centers) each (n may be 0).
        target: (B,) int64 global class indices of this rank's rows, or ignore_index.
        class_start: int, the first global class index of this rank's shard.
        alpha: a number > 0, or a 0-d tensor (may require grad: its gradient is the full one, summed
            over the ranks); the same value on every rank.
        bias_shard: optional (n,) rows of the global bias.
        batch_sizes: None (every rank has the same B), the list of every rank's B (same on all ranks), or
            "auto": the ranks' batch sizes are gathered on every call (the agreement table: on CUDA
            one host sync per call).
        sample_rate: Partial FC: 1.0 uses every class; q < 1 uses the batch's target classes plus a
            random share q of the shard's classes (see partial_fc_sample); unsampled rows of
            weight_shard / bias_shard get a zero gradient, and the loss is the loss over the sampled
            classes (label smoothing averages over them).
        generator: the torch.Generator of the sampling (this rank's RNG when None).
        overlap_grad_reduce: the shard's backward computes this rank's dX contribution first, starts
            its reduce-scatter asynchronously and computes dW (and db, d alpha) while it runs; costs one
            more pass over the shard's logits in the backward (the backward op is called twice).
        grad_reduce_dtype: "compute" (default): the feature gradients are summed over the ranks in the
            compute dtype (fp32 for fp16 / bf16 features), rounded to the features' dtype once;
            "features": summed in the features' dtype (half the bytes for bf16 / fp16), each rank's
            contribution accumulated in fp32 and rounded once, the partial sums in that dtype
            (docs/class_parallel.md, "Options").

    The other options are those of l2_softmax_loss (margins, per-row (B,) margins of this rank's rows,
    subcenters, margin_grad, label smoothing; max_logits_bytes: this rank's budget for its shard's logits
    of the global batch; the non-target transform negatives / negatives_t: "mv" and "curricular" need
    each row's margined target cosine on every shard, one more all-reduce of B_g values, see
    _negative_thresholds).

    Returns: the loss of the global batch, identical on every rank (reduction "mean" averages over the
        non-ignored rows of all ranks; "none" gives the B_g rows in rank order). Gradients of
        features, weight_shard, bias_shard and alpha equal the matching slices of the single-process
        l2_softmax_loss on the concatenated batch and the full matrix.
    """
    return _class_parallel(features, weight_shard, target, class_start, alpha, bias_shard, group=group,
                           normalize_weight=normalize_weight, margin=margin, margin_type=margin_type,
                           reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           eps=eps, subcenters=subcenters, margin_grad=margin_grad, backend=backend,
                           batch_sizes=batch_sizes, sample_rate=sample_rate, generator=generator,
                           overlap_grad_reduce=overlap_grad_reduce, grad_reduce_dtype=grad_reduce_dtype,
                           max_logits_bytes=max_logits_bytes, negatives=negatives, negatives_t=negatives_t,
                           margin_fallback=margin_fallback)[0]


def _prepare(features, weight_shard, target, class_start, alpha, bias_shard, *, normalize_weight, margin,
             margin_type, reduction, ignore_index, label_smoothing, eps, subcenters, margin_grad, backend, batch_sizes,
             sample_rate, overlap_grad_reduce=False, grad_reduce_dtype="compute", layout=None,
             max_logits_bytes=None, negatives="none", negatives_t=None, margin_fallback=True) -> _Args:
    """Every check of one rank's arguments that needs no other rank (a TypeError / ValueError naming
    the argument), and what the step derives from them. layout=(world, rank): also check that a
    batch_sizes list holds this rank's batch size at its place (the device check compares the lists,
    not the sizes)."""
    opts = L2SMOptions(normalize_weight=normalize_weight, margin_type=margin_type, margin=margin,
                       ignore_index=ignore_index, label_smoothing=label_smoothing, eps=eps, subcenters=subcenters,
                       margin_grad=margin_grad, max_logits_bytes=max_logits_bytes, negatives=negatives,
                       negatives_t=negatives_t, margin_fallback=margin_fallback)
    check_reduction(reduction)
    sample_rate = check_sample_rate(sample_rate)
    n = check_inputs(features, weight_shard, target, bias_shard, weight_name="weight_shard", bias_name="bias_shard",
                     classes="shard_classes", allow_no_classes=True, subcenters=opts.subcenters)
    B, D = features.shape
    opts = check_option_tensors(opts, B, features.device)
    warn_angular_unnormalized(opts)
    class_start = check_int("class_start", class_start, 0)
    if isinstance(batch_sizes, str):
        if batch_sizes != "auto":
            raise ValueError(f"batch_sizes must be None, a list of the ranks' batch sizes or 'auto', got {batch_sizes!r}")
    elif batch_sizes is not None:
        batch_sizes = [check_int("batch_sizes[i]", b, 0) for b in batch_sizes]
        if layout is not None and (len(batch_sizes) != layout[0] or batch_sizes[layout[1]] != B):
            raise ValueError(f"batch_sizes must list the {layout[0]} ranks' batch sizes with batch_sizes[{layout[1]}] = "
                             f"{B} (this rank's), got {batch_sizes}")
    if not isinstance(overlap_grad_reduce, bool):
        raise TypeError(f"overlap_grad_reduce must be a bool, got {overlap_grad_reduce!r}")
    if grad_reduce_dtype not in GRAD_REDUCE_DTYPES:
        raise ValueError(f"grad_reduce_dtype must be one of {GRAD_REDUCE_DTYPES}, got {grad_reduce_dtype!r}")
    cdt = compute_dtype(features, weight_shard, bias_shard)
    alpha_t = _alpha_tensor(alpha, features.device, cdt)
    dtypes = {features.dtype, weight_shard.dtype} | ({bias_shard.dtype} if bias_shard is not None else set())
    forward_op, backward_op = ops_for(resolve(backend, features.device.type, dtypes))
    return _Args(opts=opts, reduction=reduction, sample_rate=sample_rate, features=features, weight=weight_shard,
                 bias=bias_shard, B=B, D=D, n=n, class_start=class_start,
                 batch_sizes=batch_sizes, cdt=cdt, alpha_t=alpha_t, forward_op=forward_op, backward_op=backward_op,
                 overlap=overlap_grad_reduce, grad_reduce_dtype=grad_reduce_dtype)


def _global_options(opts: L2SMOptions, sizes, group) -> L2SMOptions:
    """The options of the global batch: per-row margins ((B,) tensors of each rank's rows) gathered to
    the B_g rows in rank order (no gradient flows to margins); everything else as given."""
    m2, m3 = opts.margin_parts()
    rows = [isinstance(v, torch.Tensor) and v.dim() == 1 for v in (m2, m3)]
    if not any(rows):
        return opts
    m2, m3 = (_gather_rows(v.detach(), sizes, group) if r else (0.0 if v is None else v) for v, r in zip((m2, m3), rows))
    return dataclasses.replace(opts, margin_type="combined", margin=(1.0, m2, m3))


def _shard_forward(forward_op, X, W, local, alpha, b, opts, needs, thresholds=None):
    """This shard's forward op on the global batch: (loss_r, lse_r, aux). The one place that spells
    the op's schema. LOCAL target indices (-1 on rows owned elsewhere, which the op ignores) and no
    label smoothing: the smoothing term is summed over the ranks separately (_shard_logit_sum).
    thresholds: the non-target transform's per-row hard thresholds (_negative_thresholds)."""
    shard_opts = dataclasses.replace(opts, ignore_index=_LOCAL_IGNORE, label_smoothing=0.0)
    return forward_op(X, W, local, alpha, b, *shard_opts.op_arguments(X.shape[0], X.device, thresholds), *needs)


def _target_class_cosines(Xc, W, local, opts, cdt):
    """c_iy of every row from this shard's W (B_g,), differentiable: the maximum over the target's K
    rows (a gather: O(B_g K D)); meaningful on the rows this shard owns (local >= 0)."""
    K = opts.subcenters
    with torch.autocast(device_type=Xc.device.type, enabled=False):
        x_hat = F.normalize(Xc.to(cdt), dim=1, eps=opts.eps)
        col = local.clamp_min(0)
        rows = (col[:, None] * K + torch.arange(K, device=col.device)).reshape(-1)
        w_t = W.to(cdt).index_select(0, rows).view(-1, K, W.shape[1])
        if opts.normalize_weight:
            w_t = F.normalize(w_t, dim=2, eps=opts.eps)
        return (w_t * x_hat[:, None, :]).sum(2).max(dim=1).values


def _negative_thresholds(Xc, W, local, own, valid, opts, cdt, group):
    """The non-target transform's hard threshold of every global row (B_g,) float64, or None when the op
    can take it from its table alone ("none", "filter": the fixed t). "mv" / "curricular" compare with
    the row's margined target cosine f(c_iy), which only the shard owning the target can compute: each
    rank contributes f on its owned rows (0 elsewhere) and one all-reduce(SUM) of B_g values gives it to
    every shard; rows without a target get +inf (no hard column), as in the single-process op."""
    if opts.negatives in ("none", "filter"):
        return None
    with torch.no_grad():
        if W.shape[0] > 0:
            f = target_margin(_target_class_cosines(Xc.detach(), W.detach(), local, opts, cdt), opts).double()
            f = torch.where(own, f, torch.zeros_like(f))
        else:
            f = torch.zeros(Xc.shape[0], dtype=torch.float64, device=Xc.device)
        dist.all_reduce(f, group=group)
        return torch.where(valid, f, torch.full_like(f, math.inf))


class _ShardOpOverlapped(torch.autograd.Function):
    """The shard's forward op, whose backward computes this rank's dX contribution first (the
    backward op asked for dX only), starts its reduce-scatter (pending.start), and then computes
    dW, db and d alpha (the backward op again, asked for those) while the collective runs. X gets
    no gradient through this node: _GatherFeatures takes the reduced rows from `pending`. Cost: the
    backward op runs twice (each recomputes what it needs of the shard's logits)."""

    @staticmethod
    def forward(ctx, X, W, local, alpha, b, forward_op, backward_op, op_arguments, needs, pending):
        loss, lse, aux = forward_op(X, W, local, alpha, b, *op_arguments, *needs)
        ctx.backward_op, ctx.op_arguments, ctx.pending = backward_op, op_arguments, pending
        ctx.save_for_backward(X, W, local, alpha, b, lse, aux)
        ctx.mark_non_differentiable(aux)
        return loss, lse, aux

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_aux):
        X, W, local, alpha, b, lse, aux = ctx.saved_tensors
        grad_loss = torch.zeros_like(lse) if grad_loss is None else grad_loss
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
        margins, smoothing, negatives_table, *static = ctx.op_arguments
        base = (grad_loss, grad_lse, X, W, local, alpha, b, margins, smoothing, negatives_table, lse, aux, *static)
        gx = ctx.backward_op(*base, True, False, False, False)[0]
        ctx.pending.start(gx)  # the reduce-scatter runs while dW is computed
        need = ctx.needs_input_grad
        nw, nb, na = need[1], b is not None and need[4], need[3]
        gw = gb = ga = None
        if nw or nb or na:
            _, gw, gb, ga = ctx.backward_op(*base, False, nw, nb, na)
        return (None, gw if nw else None, None, ga if na else None, gb if nb else None,
                None, None, None, None, None)


def _shard_forward_overlapped(forward_op, backward_op, X, W, local, alpha, b, opts, needs, pending, thresholds=None):
    """_shard_forward through _ShardOpOverlapped: (loss_r, lse_r)."""
    shard_opts = dataclasses.replace(opts, ignore_index=_LOCAL_IGNORE, label_smoothing=0.0)
    loss, lse, _aux = _ShardOpOverlapped.apply(X, W, local, alpha, b, forward_op, backward_op,
                                               shard_opts.op_arguments(X.shape[0], X.device, thresholds), needs,
                                               pending)
    return loss, lse


def _class_parallel(features, weight_shard, target, class_start, alpha, bias_shard, *, group, normalize_weight,
                    margin, margin_type, reduction, ignore_index, label_smoothing, eps, backend, batch_sizes,
                    sample_rate, generator, subcenters=1, margin_grad="exact", check_key=None,
                    overlap_grad_reduce=False, grad_reduce_dtype="compute", max_logits_bytes=None, negatives="none",
                    negatives_t=None, margin_fallback=True):
    """-> (loss, sampled local indices or None). check_key: what the agreement table is done once
    for on CUDA (the module; None: the group)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("class_parallel_l2_softmax_loss needs torch.distributed initialized "
                           "(torch.distributed.init_process_group)")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    device = features.device if isinstance(features, torch.Tensor) else torch.device("cpu")
    if device.type == "cuda" and not torch.compiler.is_compiling():
        # before any collective: every rank whose device is wrong raises here (usually all of them alike)
        _check_rank_device(device, group, "features")
    key = check_key if check_key is not None else (group if group is not None else dist.group.WORLD)
    mode = _check_mode(device, key, isinstance(batch_sizes, str) and batch_sizes == "auto")
    try:
        a = _prepare(features, weight_shard, target, class_start, alpha, bias_shard,
                     normalize_weight=normalize_weight, margin=margin, margin_type=margin_type, reduction=reduction,
                     ignore_index=ignore_index, label_smoothing=label_smoothing, eps=eps, subcenters=subcenters,
                     margin_grad=margin_grad, backend=backend, batch_sizes=batch_sizes, sample_rate=sample_rate,
                     overlap_grad_reduce=overlap_grad_reduce, grad_reduce_dtype=grad_reduce_dtype,
                     layout=None if mode == "table" else (world, rank), max_logits_bytes=max_logits_bytes,
                     negatives=negatives, negatives_t=negatives_t, margin_fallback=margin_fallback)
        err = None
    except Exception as e:  # every rank learns of it in the agreement check, which re-raises it here
        if mode is None:
            raise
        a, err = None, e
    # before any collective whose size depends on the checked values
    gathered_sizes = None
    if mode == "table":
        num_classes_all, gathered_sizes = _check_ranks(a, err, world, rank, group, device)
        _mark_checked(device, key)
    elif mode == "device":
        _check_ranks_on_device(a, err, world, group, device)
    opts, B, n, class_start, cdt, alpha_t = a.opts, a.B, a.n, a.class_start, a.cdt, a.alpha_t
    if a.batch_sizes == "auto":
        if gathered_sizes is None:
            raise RuntimeError("batch_sizes='auto' needs the agreement table (not available under torch.compile)")
        sizes = gathered_sizes
    else:
        sizes = list(a.batch_sizes) if a.batch_sizes is not None else [B] * world
    opts = _global_options(opts, sizes, group)
    K = opts.subcenters
    s = opts.label_smoothing
    smooth = opts.smoothing_on

    # 1. gather the global batch (features differentiably, alpha through the same node); targets
    # are range-checked on CPU tensors only (reading them is a host sync on CUDA)
    target_g = _gather_rows(target.long(), sizes, group)
    if mode == "table" and device.type == "cpu":
        _check_targets(target_g, num_classes_all, ignore_index, sizes)
    grad_on = torch.is_grad_enabled()
    # the features in the compute dtype only where torch ops use them (label smoothing's terms)
    need_xc = smooth
    reduce_dtype = cdt if a.grad_reduce_dtype == "compute" else features.dtype
    pending = _PendingRowSum(sizes, rank, group, reduce_dtype) if a.overlap and grad_on and features.requires_grad \
        else None
    X, Xc, alpha_g = _GatherFeatures.apply(features, alpha_t, sizes, rank, group, cdt, need_xc, reduce_dtype, pending)
    Xc = Xc if Xc.numel() else X  # the global features in the compute dtype
    valid = target_g != ignore_index
    local = target_g - class_start
    own = valid & (local >= 0) & (local < n)
    local = torch.where(own, local, torch.full_like(local, _LOCAL_IGNORE))
    thresholds = _negative_thresholds(Xc, weight_shard, local, own, valid, opts, cdt, group)

    # 2. this shard's part of every row: Partial FC picks the rows of W first
    W, b, sampled = weight_shard, bias_shard, None
    if sample_rate < 1.0 and n > 0:
        sampled = partial_fc_sample(target_g, class_start, n, float(sample_rate), ignore_index=ignore_index,
                                    generator=generator)
        rows_s = (sampled[:, None] * K + torch.arange(K, device=sampled.device)).reshape(-1) if K > 1 else sampled
        W = weight_shard.index_select(0, rows_s)  # backward: zeros on the unsampled rows
        b = bias_shard.index_select(0, sampled) if bias_shard is not None else None
        # every owned target is sampled, so searchsorted finds its exact position
        local = torch.where(own, torch.searchsorted(sampled, local.clamp_min(0)), local)
    k = W.shape[0] // K  # classes in this shard's part (sampled ones with Partial FC)
    if k > 0:
        needs = (grad_on and X.requires_grad, grad_on and W.requires_grad,
                 grad_on and b is not None and b.requires_grad, grad_on and alpha_g.requires_grad)
        if pending is not None:
            loss_r, lse_r = _shard_forward_overlapped(a.forward_op, a.backward_op, X, W, local, alpha_g, b, opts, needs,
                                                      pending, thresholds)
        else:
            loss_r, lse_r, _aux = _shard_forward(a.forward_op, X, W, local, alpha_g, b, opts, needs, thresholds)
    else:
        # nothing to contribute; stay connected to every differentiable input (with exact zeros,
        # an empty slice sums to 0 even if X holds inf) so that this rank's backward runs the same
        # collectives as the others'
        link = X[:0].sum() + Xc[:0].sum() + alpha_g.reshape(1)[:0].sum() + W[:0].sum()
        link = (link + b[:0].sum() if b is not None else link).to(cdt)
        lse_r = torch.full((X.shape[0],), -math.inf, dtype=cdt, device=device) + link
        loss_r = torch.zeros_like(lse_r) + link
    # the target logit z_iy (margin applied) of the rows this shard owns: lse_r - loss_r there
    zero = torch.zeros((), dtype=cdt, device=device)
    z_t = torch.where(own, lse_r - loss_r, zero)

    parts = []
    with torch.no_grad():
        m = lse_r.detach().clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # only if no rank has a class
    parts.append(torch.exp(lse_r - m))
    parts.append(z_t)
    if smooth:
        if k == 0:
            parts.append(torch.zeros_like(lse_r) + lse_r[:0].sum())
        elif K == 1 and opts.negatives == "none":
            parts.append(_shard_logit_sum(Xc, W, b, local, own, alpha_g, opts, cdt))
        else:
            parts.append(_shard_logit_sum_subcenters(a.forward_op, X, Xc, W, b, local, own, alpha_g, opts, cdt, needs,
                                                     thresholds))
    parts.append(own.to(cdt))
    stats = torch.cat([torch.stack(parts).reshape(-1), torch.full((1,), float(k), dtype=cdt, device=device)])
    total = _SumOverRanks.apply(stats, group)
    Bg = X.shape[0]
    rows = total[:-1].view(len(parts), Bg)
    num_classes = total[-1]  # C, or the number of sampled classes with Partial FC
    sumexp, z_target, owners = rows[0], rows[1], rows[-1]

    # 3. the global loss of every row
    lse = m + torch.log(sumexp)
    loss = lse - (1 - s) * z_target
    if smooth:
        loss = loss - (s / num_classes) * rows[2]
    bad = valid & (owners != 1)  # a target no shard (or two shards) own: out of range, or a broken layout
    if device.type != "cpu" or torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), "l2sm_kernels: a target is owned by no shard or by several "
                            "(outside [0, num_classes), or the shards do not tile the classes)")
    loss = torch.where(valid, loss, zero)
    loss = torch.where(bad, torch.full_like(loss, math.nan), loss)
    if reduction == "none":
        out = loss
    elif reduction == "sum":
        out = loss.sum()
    else:
        out = loss.sum() / valid.sum()
    return out, sampled


def _shard_logit_sum_subcenters(forward_op, X, Xc, W, b, local, own, alpha, opts, cdt, needs, thresholds=None):
    """sum over this shard's classes of z_ij with K sub-centers or a non-target transform (B_g,),
    differentiable. The class cosines are maxima over sub-centers (or transformed), so no column sum of
    W gives them: one more shard op with label smoothing 1, no margin and a dummy target (the row's own
    where the shard owns it, else class 0) gives lse - mean_j z'_ij = its loss, so
    sum_j z'_ij = k (lse - loss) (2 GEMM-equivalents more, these combinations only); then the target's
    margin on the rows this shard owns, alpha (f(c_iy) - c_iy), with c_iy the maximum over the target's
    K rows (a gather: O(B_g K D)); with a transform, the dummy column 0 of the rows owned elsewhere is
    one of their negatives: alpha (N(c_i0) - c_i0) there (the op left it untransformed as a target)."""
    k = W.shape[0] // opts.subcenters
    plain = dataclasses.replace(opts, margin_type="none", margin=0.0, label_smoothing=1.0, ignore_index=_LOCAL_IGNORE)
    dummy = torch.where(own, local, torch.zeros_like(local)) if opts.negatives != "none" else torch.zeros_like(local)
    loss1, lse1, _ = forward_op(X, W, dummy, alpha, b, *plain.op_arguments(X.shape[0], X.device, thresholds), *needs)
    out = k * (lse1 - loss1)
    if opts.negatives != "none":
        c0 = _target_class_cosines(Xc, W, torch.zeros_like(local), opts, cdt)
        thr = (thresholds if thresholds is not None else
               torch.full_like(c0, float(opts.negatives_t)) if not isinstance(opts.negatives_t, torch.Tensor)
               else opts.negatives_t.to(c0).expand_as(c0))
        delta = _transformed(c0, thr, opts) - c0
        out = out + alpha.to(cdt) * torch.where(own, torch.zeros_like(delta), delta)
    if opts.margin_kind != "none":
        c_t = _target_class_cosines(Xc, W, local, opts, cdt)
        with torch.autocast(device_type=X.device.type, enabled=False):
            delta = target_margin(c_t, opts) - c_t
            out = out + alpha.to(cdt) * torch.where(own, delta, torch.zeros_like(delta))
    return out


def _transformed(c, thr, opts):
    """N(c) of cosines c (B_g,) against per-row thresholds (docs/design.md, "The non-target transforms"):
    the mask and t constant, differentiable in c."""
    t = opts.negatives_t
    t = t.detach().to(c) if isinstance(t, torch.Tensor) else t
    hard = c.detach() > thr.to(c)
    if opts.negatives == "mv":
        new = t * c + t - 1
    elif opts.negatives == "curricular":
        new = c * (t + c)
    else:
        new = torch.zeros_like(c)
    return torch.where(hard, new, c)


def _shard_logit_sum(X, W, b, local, own, alpha, opts, cdt):
    """sum over this shard's (sampled) classes of z_ij, for every row (B_g,), differentiable:
    alpha (x_hat_i . sum_j W_hat_j + [own] (f(c_iy) - c_iy)) + sum_j b_j. O(B_g D + n D) work; for
    normalize_weight, sum_j W_hat_j = W^T (1 / max(|W_j|, eps)) without a normalized copy of W."""
    with torch.autocast(device_type=X.device.type, enabled=False):
        x_hat = F.normalize(X.to(cdt), dim=1, eps=opts.eps)
        Wc = W.to(cdt)
        col = local.clamp_min(0)
        w_t = Wc.index_select(0, col)
        if opts.normalize_weight:
            inv = 1.0 / torch.linalg.vector_norm(Wc, dim=1).clamp_min(opts.eps)
            w_sum = inv @ Wc
            w_t = w_t * inv.index_select(0, col)[:, None]
        else:
            w_sum = Wc.sum(dim=0)
        g = x_hat @ w_sum
        if opts.margin_kind != "none":
            c_t = (x_hat * w_t).sum(dim=1)
            delta = target_margin(c_t, opts) - c_t
            g = g + torch.where(own, delta, torch.zeros_like(delta))
        out = alpha.to(cdt) * g
        if b is not None:
            out = out + b.to(cdt).sum()
    return out

