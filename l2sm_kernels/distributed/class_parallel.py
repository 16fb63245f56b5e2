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
   learnable alpha's gradient (each rank holds a replica) is all-reduced.

Communication per step (W never moves; f = bytes of the features' dtype, 4 or 8 for the statistics):
    forward:  all-gather B_g x D features (B_g D f bytes) + B_g int64 targets,
              all-reduce(MAX) of B_g values, all-reduce(SUM) of 3 or 4 B_g-vectors (+1 value);
              the agreement check's all-gather of 25 int64 per rank (every call on CPU tensors,
              the first call per module / group on CUDA: see below).
    backward: reduce-scatter of the B_g x D feature gradients in the compute dtype (B_g D 4 bytes for
              fp32 / fp16 / bf16 features: the sum over ranks is rounded to the features' dtype once;
              with gloo an all-reduce of them by default); an all-reduce of one value for a
              learnable alpha.
    This does not depend on C: for B_g = 8 x 128 = 1024, D = 512, bf16 features it is 1 MiB gathered
    and 2 MiB reduce-scattered, while the shard of W (C/P x D) and its gradient stay on their rank.

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
  (_check_ranks) gathers all of these (and each rank's batch size, class_start, shard size, and
  whether its arguments passed local validation) in ONE all-gather before any collective whose
  size depends on them, and every rank raises the same error on a mismatch (instead of gloo's
  SIGABRT or a hang until the process-group timeout). It runs on every call for CPU tensors, and on
  the first call per module (per group for the functional form) for CUDA tensors, where reading
  the gathered table is a host sync (set CHECK_EVERY_CALL = True to check every step there). Later
  CUDA calls trust the layout: a target that no shard or two shards own then triggers an
  asynchronous device assert and the row's loss is NaN; a rank whose local argument check fails
  raises alone. The targets are range-checked on CPU tensors only.
- Batch sizes: equal on every rank, or pass batch_sizes (the same list on every rank) for uneven
  ones; rows are padded to the largest for the collectives.
- The result is the loss of the global batch, the same on every rank. reduction="none" returns the
  B_g per-row losses in rank order (rank 0's rows first). The upstream gradient must be the same on
  every rank (it is for any function of the global loss computed identically on every rank).
  DistributedDataParallel around a backbone that feeds the loss averages the backbone's gradients
  over the ranks, so the backbone gets 1/P of the global loss's gradient unless a communication
  hook sums them (demo/class_parallel_training.py). DDP around the head itself is refused.
- No host synchronization in the CUDA path, except in Partial FC sampling (the number of positive
  classes decides the sample size, as in InsightFace's PartialFC whose torch.unique syncs too) and
  the first call's agreement check.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import struct
import sys
import weakref
import zlib
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..backends import ops_for, resolve
from ..backends.registry import check_backend
from ..loss import _alpha_tensor, check_inputs, check_option_tensors, warn_angular_unnormalized
from ..options import (
    FLOAT_DTYPES,
    MARGIN_GRADS,
    MARGIN_TYPES,
    REDUCTIONS,
    L2SMOptions,
    check_alpha,
    check_int,
    check_reduction,
    check_sample_rate,
    compute_dtype,
)
from ..module import (L2SoftmaxLoss, default_alpha_min, getattr_with_alpha, initial_alpha,
                      register_alpha_state_hooks)
from ..reference import target_margin
from ..sampling import partial_fc_sample

__all__ = ["class_parallel_l2_softmax_loss", "partial_fc_sample", "shard_sizes", "ClassParallelL2SoftmaxLoss"]

# The index the per-shard op sees on rows whose target is not in the shard: never a valid local index.
_LOCAL_IGNORE = -1

# How the feature gradients go back to their owners on gloo. "all_reduce" (then each rank takes its
# rows, twice the volume) works with every torch version; "reduce_scatter" needs gloo's reduce_scatter
# (torch 2.13's gloo has it; older ones may not). NCCL and other backends always use reduce_scatter.
# The tests run both.
GLOO_FEATURE_GRAD = "all_reduce"


# ---------------------------------------------------------------------------------------------
# collectives (torch 2.13 renamed *_into_tensor / *_tensor to *_single; 2.11 has only the old names)
# ---------------------------------------------------------------------------------------------
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
# On CUDA tensors the check costs one host synchronization (it reads the gathered values), so it runs
# on the first call per module (per group for the functional form) only; every rank makes the same
# calls, so every rank skips or runs it alike. True: check every call on CUDA too (one sync a step).
# CPU tensors are checked on every call (no device to wait for).
CHECK_EVERY_CALL = False

# what the check has passed once for (modules, process groups); weak, so nothing keeps a group alive
_CHECKED: weakref.WeakSet = weakref.WeakSet()


def _check_due(device: torch.device, key) -> bool:
    if torch.compiler.is_compiling():
        return False
    if device.type == "cpu" or CHECK_EVERY_CALL:
        return True
    try:
        return key not in _CHECKED
    except TypeError:  # not weakly referenceable: check every call
        return True


def _mark_checked(device: torch.device, key) -> None:
    if device.type != "cpu":
        try:
            _CHECKED.add(key)
        except TypeError:
            pass


class _Args:
    """The locally validated arguments of one call (_prepare)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


# The values every rank must pass alike, in the order they are gathered: (what, kind, value of _Args).
# kind: "int" (ints and bools), "float" (compared bit for bit), "name" (strings, dtypes, None: compared
# by a CRC-32 of str()), "tensor" (a 0-d tensor, compared bit for bit as float64 on its device: no host
# read). A mismatch in any of them would make the ranks' collectives differ in size or number (gloo
# aborts the process, NCCL reads garbage or hangs), so they are compared before the first collective
# whose size depends on them.
_AGREE = (
    ("the feature dimension D", "int", lambda a: a.D),
    ("the features' dtype", "name", lambda a: a.features.dtype),
    ("weight_shard's dtype", "name", lambda a: a.weight.dtype),
    ("bias_shard (its dtype, or None)", "name", lambda a: None if a.bias is None else a.bias.dtype),
    ("alpha's dtype", "name", lambda a: a.alpha_t.dtype),
    ("normalize_weight", "int", lambda a: a.opts.normalize_weight),
    ("margin_type", "name", lambda a: a.opts.margin_type),
    ("margin", "float", lambda a: _number(a.opts.margin_parts()[0])),
    ("the margin's additive part m3", "float", lambda a: _number(a.opts.margin_parts()[1])),
    ("the margins' forms (m2, m3)", "name", lambda a: _margin_form(a.opts)),
    ("subcenters", "int", lambda a: a.opts.subcenters),
    ("margin_grad", "name", lambda a: a.opts.margin_grad),
    ("ignore_index", "int", lambda a: a.opts.ignore_index),
    ("label_smoothing", "float", lambda a: _number(a.opts.label_smoothing)),
    ("eps", "float", lambda a: a.opts.eps),
    ("reduction", "name", lambda a: a.reduction),
    ("sample_rate", "float", lambda a: a.sample_rate),
    ("grad mode (torch.is_grad_enabled())", "int", lambda a: torch.is_grad_enabled()),
    ("features.requires_grad", "int", lambda a: a.features.requires_grad),
    ("weight_shard.requires_grad", "int", lambda a: a.weight.requires_grad),
    ("bias_shard.requires_grad", "int", lambda a: a.bias is not None and a.bias.requires_grad),
    ("alpha.requires_grad", "int", lambda a: a.alpha_t.requires_grad),
    ("len(batch_sizes) (-1: None)", "int", lambda a: -1 if a.batch_sizes is None else len(a.batch_sizes)),
    ("batch_sizes", "name", lambda a: a.batch_sizes),
    ("alpha", "tensor", lambda a: a.alpha_t),
    ("margin m2 (a 0-d tensor's value)", "tensor", lambda a: _scalar_value(a.opts.margin_parts()[0], a)),
    ("margin m3 (a 0-d tensor's value)", "tensor", lambda a: _scalar_value(a.opts.margin_parts()[1], a)),
    ("label_smoothing (a 0-d tensor's value)", "tensor", lambda a: _scalar_value(a.opts.label_smoothing, a)),
)
_HEAD = ("a local argument error", "the batch size", "class_start", "the shard size")
_FORMS = ("none", "number", "0-d tensor", "per-row tensor")  # how a margin part is given (_form)
_NAMES = {zlib.crc32(str(v).encode()): str(v) for v in
          (*FLOAT_DTYPES, torch.int32, torch.int64, *MARGIN_TYPES, *REDUCTIONS, *MARGIN_GRADS, None,
           *(f"({u}, {v})" for u in _FORMS for v in _FORMS))}


def _form(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, torch.Tensor):
        return "per-row tensor" if v.dim() == 1 else "0-d tensor"
    return "number"


def _margin_form(opts: L2SMOptions) -> str:
    """How the margin's parts are given (a (B,) tensor holds each rank's own rows, so only its form is
    compared; a 0-d tensor's value is compared on the device, numbers bit for bit)."""
    m2, m3 = opts.margin_parts()
    return f"({_form(m2)}, {_form(m3)})"


def _number(v) -> float:
    """A number option as itself, absent (None) as 0, a tensor as NaN (its value is compared apart)."""
    if v is None:
        return 0.0
    return math.nan if isinstance(v, torch.Tensor) else v


def _scalar_value(v, a) -> torch.Tensor:
    """A 0-d tensor option's value for the agreement table (0 for anything else: compared elsewhere)."""
    if isinstance(v, torch.Tensor) and v.dim() == 0:
        return v.detach()
    return torch.zeros((), dtype=torch.float64, device=a.features.device)


def _bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _encode(kind: str, v) -> int:
    if kind == "float":
        return _bits(v)
    if kind == "int" and -2 ** 63 <= int(v) < 2 ** 63:
        return int(v)
    return zlib.crc32(str(v).encode())


def _decode(kind: str, v: int):
    if kind in ("float", "tensor"):
        return struct.unpack("<d", struct.pack("<q", v))[0]
    if kind == "name":
        return _NAMES.get(v, f"<crc32 {v:#010x}>")
    return v


def _check_ranks(a, err, world: int, rank: int, group, device: torch.device) -> int:
    """One all-gather of every rank's layout (batch size, class_start, shard size) and of the values
    in _AGREE, on `device` (the features': gloo and NCCL both carry it); every rank reads the same
    table and raises the same error. A rank whose arguments failed local validation (err) takes part
    with a flag, and every rank raises (the others with its message), instead of leaving the others
    blocked in a collective. Returns C (the shards' union)."""
    host = [1, 0, 0, 0] if a is None else [0, a.B, a.class_start, a.n]
    tensors = [(label, getter) for label, kind, getter in _AGREE if kind == "tensor"]
    host += [0 if a is None else _encode(kind, getter(a)) for label, kind, getter in _AGREE if kind != "tensor"]
    info = torch.tensor(host, dtype=torch.int64).to(device)
    if tensors:
        if a is None:
            bits = torch.zeros(len(tensors), dtype=torch.int64, device=device)
        else:  # on the device: no host read of a CUDA alpha
            bits = torch.stack([getter(a).detach().reshape(()).to(device, torch.float64).view(torch.int64)
                                for _, getter in tensors])
        info = torch.cat([info, bits])
    width = info.numel()
    table = torch.empty(world * width, dtype=torch.int64, device=device)
    _all_gather_single(table, info, group=group)
    rows = table.view(world, width).tolist()  # the one host read (a sync on CUDA)

    failed = [r for r in range(world) if rows[r][0]]
    if failed:
        msgs = [None] * world
        dist.all_gather_object(msgs, None if err is None else (type(err).__name__, str(err)), group=group)
        if err is not None:
            raise err
        name, msg = msgs[failed[0]]
        exc = {"TypeError": TypeError, "ValueError": ValueError}.get(name, RuntimeError)
        raise exc(f"rank {failed[0]} of the group rejected its arguments, so every rank stops: {name}: {msg}")

    kinds = [k for _, k, _ in _AGREE if k != "tensor"] + ["tensor"] * len(tensors)
    labels = [lab for lab, k, _ in _AGREE if k != "tensor"] + [lab for lab, _ in tensors]
    sizes = [r[1] for r in rows]
    for j, (label, kind) in enumerate(zip(labels, kinds), start=len(_HEAD)):
        col = [r[j] for r in rows]
        if len(set(col)) == 1:
            continue
        if label.startswith("len(batch_sizes)") or label == "batch_sizes":
            lens = [r[labels.index("len(batch_sizes) (-1: None)") + len(_HEAD)] for r in rows]
            raise ValueError(f"batch_sizes: the ranks passed different lists (lengths {lens} on ranks 0..{world - 1}, "
                             f"-1: None); pass the same list on every rank (the ranks' batch sizes are {sizes})")
        shown = [_decode(kind, v) for v in col]
        raise ValueError(f"the ranks disagree on {label}: {shown} on ranks 0..{world - 1}; every rank of the group "
                         f"must pass the same")

    # every rank holds the same batch_sizes now
    if a.batch_sizes is not None:
        if sizes != a.batch_sizes:
            raise ValueError(f"batch_sizes must list the {world} ranks' batch sizes: they are {sizes}, "
                             f"got batch_sizes = {a.batch_sizes}")
    elif len(set(sizes)) != 1:
        raise ValueError(f"features: the ranks' batch sizes are {sizes}, expected equal batch sizes "
                         f"(pass batch_sizes for uneven ones)")
    spans = sorted((r[2], r[2] + r[3], i) for i, r in enumerate(rows) if r[3] > 0)
    pos = 0
    for start, end, r in spans:
        if start != pos:
            raise ValueError(
                f"class_start: the ranks' shards [class_start, class_start + n) must tile [0, num_classes) "
                f"without gaps or overlaps; got {[(x[2], x[2] + x[3]) for x in rows]} (rank {r} starts at {start}, "
                f"expected {pos})"
            )
        pos = end
    if pos == 0:
        raise ValueError("weight_shard: the ranks' shards hold no class at all")
    return pos


# ---------------------------------------------------------------------------------------------
# the loss
# ---------------------------------------------------------------------------------------------
def class_parallel_l2_softmax_loss(features, weight_shard, target, class_start, alpha=16.0, bias_shard=None, *,
                                   group=None, normalize_weight=False, margin=0.0, margin_type="none",
                                   reduction="mean", ignore_index=-100, label_smoothing=0.0, eps=1e-12,
                                   subcenters=1, margin_grad="exact", backend="auto", batch_sizes=None,
                                   sample_rate=1.0, generator=None):
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
        batch_sizes: None (every rank has the same B), or the list of every rank's B (same on all ranks).
        sample_rate: Partial FC: 1.0 uses every class; q < 1 uses the batch's target classes plus a
            random share q of the shard's classes (see partial_fc_sample); unsampled rows of
            weight_shard / bias_shard get a zero gradient, and the loss is the loss over the sampled
            classes (label smoothing averages over them).
        generator: the torch.Generator of the sampling (this rank's RNG when None).
        Other options: as l2_softmax_loss (margins, per-row (B,) margins of this rank's rows,
            subcenters, margin_grad, label smoothing).

    Returns: the loss of the global batch, identical on every rank (reduction "mean" averages over the
        non-ignored rows of all ranks; "none" gives the B_g rows in rank order). Gradients of
        features, weight_shard, bias_shard and alpha equal the matching slices of the single-process
        l2_softmax_loss on the concatenated batch and the full matrix.
    """
    return _class_parallel(features, weight_shard, target, class_start, alpha, bias_shard, group=group,
                           normalize_weight=normalize_weight, margin=margin, margin_type=margin_type,
                           reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           eps=eps, subcenters=subcenters, margin_grad=margin_grad, backend=backend,
                           batch_sizes=batch_sizes, sample_rate=sample_rate, generator=generator)[0]


def _prepare(features, weight_shard, target, class_start, alpha, bias_shard, *, normalize_weight, margin,
             margin_type, reduction, ignore_index, label_smoothing, eps, subcenters, margin_grad, backend, batch_sizes,
             sample_rate) -> _Args:
    """Every check of one rank's arguments that needs no other rank (a TypeError / ValueError naming
    the argument), and what the step derives from them."""
    opts = L2SMOptions(normalize_weight=normalize_weight, margin_type=margin_type, margin=margin,
                       ignore_index=ignore_index, label_smoothing=label_smoothing, eps=eps, subcenters=subcenters,
                       margin_grad=margin_grad)
    check_reduction(reduction)
    sample_rate = check_sample_rate(sample_rate)
    n = check_inputs(features, weight_shard, target, bias_shard, weight_name="weight_shard", bias_name="bias_shard",
                     classes="shard_classes", allow_no_classes=True, subcenters=opts.subcenters)
    B, D = features.shape
    opts = check_option_tensors(opts, B, features.device)
    warn_angular_unnormalized(opts)
    class_start = check_int("class_start", class_start, 0)
    if batch_sizes is not None:
        batch_sizes = [check_int("batch_sizes[i]", b, 0) for b in batch_sizes]
    cdt = compute_dtype(features, weight_shard, bias_shard)
    alpha_t = _alpha_tensor(alpha, features.device, cdt)
    dtypes = {features.dtype, weight_shard.dtype} | ({bias_shard.dtype} if bias_shard is not None else set())
    forward_op, _ = ops_for(resolve(backend, features.device.type, dtypes))
    return _Args(opts=opts, reduction=reduction, sample_rate=sample_rate, features=features, weight=weight_shard,
                 bias=bias_shard, B=B, D=D, n=n, class_start=class_start,
                 batch_sizes=batch_sizes, cdt=cdt, alpha_t=alpha_t, forward_op=forward_op)


def _global_options(opts: L2SMOptions, sizes, group) -> L2SMOptions:
    """The options of the global batch: per-row margins ((B,) tensors of each rank's rows) gathered to
    the B_g rows in rank order (no gradient flows to margins); everything else as given."""
    m2, m3 = opts.margin_parts()
    rows = [isinstance(v, torch.Tensor) and v.dim() == 1 for v in (m2, m3)]
    if not any(rows):
        return opts
    m2, m3 = (_gather_rows(v.detach(), sizes, group) if r else (0.0 if v is None else v) for v, r in zip((m2, m3), rows))
    return dataclasses.replace(opts, margin_type="combined", margin=(1.0, m2, m3))


def _shard_forward(forward_op, X, W, local, alpha, b, opts, needs):
    """This shard's forward op on the global batch: (loss_r, lse_r, aux). The one place that spells
    the op's schema. LOCAL target indices (-1 on rows owned elsewhere, which the op ignores) and no
    label smoothing: the smoothing term is summed over the ranks separately (_shard_logit_sum)."""
    shard_opts = dataclasses.replace(opts, ignore_index=_LOCAL_IGNORE, label_smoothing=0.0)
    return forward_op(X, W, local, alpha, b, *shard_opts.op_arguments(X.shape[0], X.device), *needs)


def _class_parallel(features, weight_shard, target, class_start, alpha, bias_shard, *, group, normalize_weight,
                    margin, margin_type, reduction, ignore_index, label_smoothing, eps, backend, batch_sizes,
                    sample_rate, generator, subcenters=1, margin_grad="exact", check_key=None):
    """-> (loss, sampled local indices or None). check_key: what the CUDA agreement check is done once
    for (the module; None: the group)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("class_parallel_l2_softmax_loss needs torch.distributed initialized "
                           "(torch.distributed.init_process_group)")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    device = features.device if isinstance(features, torch.Tensor) else torch.device("cpu")
    key = check_key if check_key is not None else (group if group is not None else dist.group.WORLD)
    check = _check_due(device, key)
    try:
        a = _prepare(features, weight_shard, target, class_start, alpha, bias_shard,
                     normalize_weight=normalize_weight, margin=margin, margin_type=margin_type, reduction=reduction,
                     ignore_index=ignore_index, label_smoothing=label_smoothing, eps=eps, subcenters=subcenters,
                     margin_grad=margin_grad, backend=backend, batch_sizes=batch_sizes, sample_rate=sample_rate)
        err = None
    except Exception as e:  # every rank learns of it in _check_ranks, which re-raises it here
        if not check:
            raise
        a, err = None, e
    if check:
        # before any collective whose size depends on the checked values
        num_classes_all = _check_ranks(a, err, world, rank, group, device)
        _mark_checked(device, key)
    elif a.batch_sizes is not None and (len(a.batch_sizes) != world or a.batch_sizes[rank] != a.B):
        raise ValueError(f"batch_sizes must list the {world} ranks' batch sizes with batch_sizes[{rank}] = {a.B} "
                         f"(this rank's), got {a.batch_sizes}")
    opts, B, n, class_start, cdt, alpha_t = a.opts, a.B, a.n, a.class_start, a.cdt, a.alpha_t
    sizes = list(a.batch_sizes) if a.batch_sizes is not None else [B] * world
    opts = _global_options(opts, sizes, group)
    K = opts.subcenters
    s = opts.label_smoothing
    smooth = opts.smoothing_on

    # 1. gather the global batch (features differentiably, alpha through the same node); targets
    # are range-checked on CPU tensors only (reading them is a host sync on CUDA)
    target_g = _gather_rows(target.long(), sizes, group)
    if check and device.type == "cpu":
        _check_targets(target_g, num_classes_all, ignore_index, sizes)
    X, Xc, alpha_g = _GatherFeatures.apply(features, alpha_t, sizes, rank, group, cdt)
    Xc = Xc if Xc.numel() else X  # the global features in the compute dtype
    valid = target_g != ignore_index
    local = target_g - class_start
    own = valid & (local >= 0) & (local < n)
    local = torch.where(own, local, torch.full_like(local, _LOCAL_IGNORE))

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
    grad_on = torch.is_grad_enabled()
    if k > 0:
        needs = (grad_on and X.requires_grad, grad_on and W.requires_grad,
                 grad_on and b is not None and b.requires_grad, grad_on and alpha_g.requires_grad)
        loss_r, lse_r, _aux = _shard_forward(a.forward_op, X, W, local, alpha_g, b, opts, needs)
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
        elif K == 1:
            parts.append(_shard_logit_sum(Xc, W, b, local, own, alpha_g, opts, cdt))
        else:
            parts.append(_shard_logit_sum_subcenters(a.forward_op, X, Xc, W, b, local, own, alpha_g, opts, cdt, needs))
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


def _shard_logit_sum_subcenters(forward_op, X, Xc, W, b, local, own, alpha, opts, cdt, needs):
    """sum over this shard's classes of z_ij with K sub-centers (B_g,), differentiable. The class
    cosines are maxima over sub-centers, so no column sum of W gives them: one more shard op with
    label smoothing 1, no margin and a dummy target (class 0) gives lse - mean_j z'_ij = its loss, so
    sum_j z'_ij = k (lse - loss) (2 GEMM-equivalents more, this combination only); then the target's
    margin on the rows this shard owns, alpha (f(c_iy) - c_iy), with c_iy the maximum over the target's
    K rows (a gather: O(B_g K D))."""
    k = W.shape[0] // opts.subcenters
    plain = dataclasses.replace(opts, margin_type="none", margin=0.0, label_smoothing=1.0, ignore_index=_LOCAL_IGNORE)
    dummy = torch.zeros_like(local)
    loss1, lse1, _ = forward_op(X, W, dummy, alpha, b, *plain.op_arguments(X.shape[0], X.device), *needs)
    out = k * (lse1 - loss1)
    if opts.margin_kind != "none":
        K = opts.subcenters
        with torch.autocast(device_type=X.device.type, enabled=False):
            x_hat = F.normalize(Xc.to(cdt), dim=1, eps=opts.eps)
            col = local.clamp_min(0)
            rows = (col[:, None] * K + torch.arange(K, device=col.device)).reshape(-1)
            w_t = W.to(cdt).index_select(0, rows).view(-1, K, W.shape[1])
            if opts.normalize_weight:
                w_t = F.normalize(w_t, dim=2, eps=opts.eps)
            c_t = (w_t * x_hat[:, None, :]).sum(2).max(dim=1).values
            delta = target_margin(c_t, opts) - c_t
            out = out + alpha.to(cdt) * torch.where(own, delta, torch.zeros_like(delta))
    return out


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


# ---------------------------------------------------------------------------------------------
# DistributedDataParallel around the head (docs/reliability.md, case 29)
# ---------------------------------------------------------------------------------------------
_DDP_MESSAGE = (
    "ClassParallelL2SoftmaxLoss {where} must not be wrapped in DistributedDataParallel: DDP would broadcast "
    "rank 0's shard of the class matrix over every other rank's shard and average the shards' gradients. "
    "Wrap the backbone, not the class-parallel head (the head does its own communication), or have DDP ignore "
    "the head's shard: DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, {names}) "
    "before wrapping model."
)


def _ddp_init_code():
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel.__init__.__code__


def _refuse_ddp(head: nn.Module, prefix: str) -> None:
    """Called from head.named_modules(): if DistributedDataParallel.__init__ is on the stack (it lists
    its module's parameters, and thereby this head's, before it broadcasts rank 0's parameters),
    raise unless DDP ignores the head's weight and bias. DDP only honours an ignore list set on the
    module it wraps (the root), so the head cannot opt itself out; it can refuse. Cost: a walk of a
    few dozen frames, comparing code objects."""
    if torch.compiler.is_compiling():
        return
    code = _ddp_init_code()
    f = sys._getframe(2)
    for _ in range(200):
        if f is None:
            return
        if f.f_code is code:
            break
        f = f.f_back
    else:
        return
    names = [f"{prefix}.{n}" if prefix else n for n in ("weight", "bias") if head._parameters.get(n) is not None]
    ddp = f.f_locals.get("self")
    ignored = getattr(ddp, "parameters_to_ignore", None)
    if ignored is None:  # a torch that reads the ignore list later: read it from the wrapped module
        ignored = getattr(f.f_locals.get("module"), "_ddp_params_and_buffers_to_ignore", ())
    if not all(n in ignored for n in names):
        raise RuntimeError(_DDP_MESSAGE.format(where=f"'{prefix}'" if prefix else "(this module)", names=names))


# ---------------------------------------------------------------------------------------------
# the module
# ---------------------------------------------------------------------------------------------
class ClassParallelL2SoftmaxLoss(nn.Module):
    """L2-softmax loss whose class matrix is sharded over the ranks of `group`; this rank owns rows
    [class_start, class_start + num_local) (shard_sizes: the split, default shard_sizes(num_classes,
    world): contiguous, uneven when num_classes % world != 0, a rank may own 0 classes).

    forward(features (B, in_features), target (B,) global class indices, batch_sizes=None) -> the
    loss of the global batch (see class_parallel_l2_softmax_loss). With sample_rate < 1, Partial FC
    sampling; `last_sampled` then holds the global indices of the classes this rank sampled last.
    With subcenters=K the shard holds num_local classes of K rows each (weight (num_local K, D)).
    A learned alpha is alpha_min + exp(alpha_raw), as in L2SoftmaxLoss (alpha_min defaults to
    alpha_lower_bound(num_classes)); the state_dict and full_state_dict store the radius as "alpha".

    The state_dict holds this rank's shard (a per-rank checkpoint). full_state_dict() gathers the
    full matrix with the keys of L2SoftmaxLoss ("weight", "bias", "alpha"), so a single-process
    L2SoftmaxLoss loads it; load_full_state_dict(state) takes this rank's rows of a full one (load
    it with torch.load(..., mmap=True) so that no rank reads all of it into memory).
    Initialization (reset_parameters): weight uniform in +-1/sqrt(in_features) like L2SoftmaxLoss,
    drawn in blocks of classes seeded from one seed and the block index, so the full matrix does
    not depend on the number of ranks and shards of equally seeded ranks differ; bias zero; alpha
    the constructor's value. The seed is `seed`, or, when None, rank 0's draw from torch's default
    RNG broadcast to the group (every rank gets the same matrix whatever its RNG state; the
    construction and reset_parameters() are then collectives). Meta-device construction
    (`with torch.device("meta")`) allocates nothing and initializes nothing; to_empty(device=...)
    then reset_parameters() initializes every parameter and buffer.

    Not for DistributedDataParallel: DDP would broadcast rank 0's shard over the others and average
    the shards' gradients, so DDP(head), or DDP(model) with the head inside, raises a RuntimeError
    before DDP broadcasts anything (unless DDP is told to ignore the head's weight and bias). Wrap
    the backbone, not the class-parallel head.
    """

    INIT_BLOCK = 4096  # classes per independently seeded block of the initialization

    def __init__(self, in_features: int, num_classes: int, group=None, alpha: float = 16.0,
                 learn_alpha: bool = False, bias: bool = False, normalize_weight: bool = False,
                 margin: float = 0.0, margin_type: str = "none", reduction: str = "mean",
                 ignore_index: int = -100, label_smoothing: float = 0.0, sample_rate: float = 1.0,
                 shard_sizes: Sequence[int] | None = None, backend: str = "auto", device=None, dtype=None,
                 seed: int | None = None, subcenters: int = 1, margin_grad: str = "exact",
                 alpha_min: float | None = None):
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ClassParallelL2SoftmaxLoss needs torch.distributed initialized")
        in_features = check_int("in_features", in_features, 1)
        num_classes = check_int("num_classes", num_classes, 1)
        alpha = initial_alpha(alpha)
        self.alpha_min = default_alpha_min(num_classes) if alpha_min is None else check_alpha(alpha_min)
        if learn_alpha and not alpha > self.alpha_min:
            raise ValueError(f"alpha = {alpha:g} must be > alpha_min = {self.alpha_min:g} for a learned alpha "
                             "(alpha_min defaults to alpha_lower_bound(num_classes); pass a smaller alpha_min)")
        check_reduction(reduction)
        check_backend(backend)
        check_sample_rate(sample_rate)
        self.options = L2SMOptions(normalize_weight=normalize_weight, margin_type=margin_type, margin=margin,
                                   ignore_index=ignore_index, label_smoothing=label_smoothing, subcenters=subcenters,
                                   margin_grad=margin_grad)
        self.group = group
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        sizes = _default_split(num_classes, self.world_size) if shard_sizes is None else \
            [check_int("shard_sizes[i]", v, 0) for v in shard_sizes]
        if len(sizes) != self.world_size or sum(sizes) != num_classes:
            raise ValueError(f"shard_sizes must give {self.world_size} sizes summing to num_classes={num_classes}, "
                             f"got {list(shard_sizes)}")
        self.shard_sizes = sizes
        self.class_start = sum(sizes[: self.rank])
        self.num_local = sizes[self.rank]
        self.in_features, self.num_classes = in_features, num_classes
        self.reduction, self.backend, self.sample_rate = reduction, backend, float(sample_rate)
        self.last_sampled = None
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        self.seed = None if seed is None else int(seed)
        self.alpha_init = alpha
        factory = {"device": device, "dtype": dtype}
        K = self.options.subcenters
        self.weight = nn.Parameter(torch.empty(self.num_local * K, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(self.num_local, **factory)) if bias else None
        alpha_t = torch.empty((), dtype=torch.float32, device=device)
        if learn_alpha:
            self.alpha_raw = nn.Parameter(alpha_t)
        else:
            self.register_buffer("alpha", alpha_t)
        register_alpha_state_hooks(self)
        self.reset_parameters()

    learn_alpha = L2SoftmaxLoss.learn_alpha
    __getattr__ = getattr_with_alpha

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Initialize every parameter and buffer: weight from `seed` (see the class docstring), bias
        zero, alpha the constructor's value. seed=None: the constructor's seed; if that was None too,
        rank 0 draws one from torch's default RNG and broadcasts it (a collective: every rank calls
        reset_parameters together), so the full matrix is a function of one seed on every rank.
        On the meta device there is nothing to fill (and no collective): call it again after
        to_empty()."""
        if self.weight.is_meta:
            return
        if seed is None:
            seed = self.seed if self.seed is not None else self._shared_seed()
        bound = 1.0 / math.sqrt(self.in_features)
        lo, hi, blk, K = self.class_start, self.class_start + self.num_local, self.INIT_BLOCK, self.options.subcenters
        pieces = []
        for block in range(lo // blk, (hi + blk - 1) // blk):  # blocks of classes, K rows each
            g = torch.Generator().manual_seed((seed * 1_000_003 + block) % (2 ** 63))
            rows = torch.rand(blk * K, self.in_features, generator=g, dtype=torch.float64, device="cpu")
            rows = rows * (2 * bound) - bound
            a, e = max(lo, block * blk), min(hi, (block + 1) * blk)
            pieces.append(rows[(a - block * blk) * K: (e - block * blk) * K])
        if pieces:
            self.weight.copy_(torch.cat(pieces))
        if self.bias is not None:
            self.bias.zero_()
        self._set_alpha(self.alpha_init)

    def _shared_seed(self) -> int:
        """Rank 0's draw from torch's default RNG, broadcast to the group (every rank draws, so every
        rank's RNG advances alike)."""
        mine = int(torch.randint(0, 2 ** 62, (1,), device="cpu"))
        box = [mine]
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        dist.broadcast_object_list(box, src=src, group=self.group)
        return int(box[0])

    def _set_alpha(self, value) -> None:
        """The one place that writes alpha (a number or a 0-d tensor's value)."""
        L2SoftmaxLoss.set_alpha(self, value)

    def _alpha_value(self) -> torch.Tensor:
        """alpha as the loss uses it (0-d, differentiable when learnable)."""
        return self.alpha

    @property
    def _ddp_params_and_buffers_to_ignore(self):
        # DistributedDataParallel(head) reads this before it broadcasts anything: refuse (see _refuse_ddp)
        raise RuntimeError(_DDP_MESSAGE.format(where="(the module DDP wraps)", names=["weight", "bias"]))

    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True):
        # DistributedDataParallel(model containing this head) lists the head's parameters through here
        # before it broadcasts anything: refuse unless DDP ignores them (see _refuse_ddp)
        _refuse_ddp(self, prefix)
        return super().named_modules(memo, prefix, remove_duplicate)

    def forward(self, features: torch.Tensor, target: torch.Tensor, batch_sizes=None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        o = self.options
        loss, sampled = _class_parallel(
            features, self.weight, target, self.class_start, self._alpha_value(), self.bias, group=self.group,
            normalize_weight=o.normalize_weight, margin=o.margin, margin_type=o.margin_type,
            reduction=self.reduction, ignore_index=o.ignore_index, label_smoothing=o.label_smoothing, eps=o.eps,
            backend=self.backend, batch_sizes=batch_sizes, sample_rate=self.sample_rate, generator=generator,
            subcenters=o.subcenters, margin_grad=o.margin_grad, check_key=self)
        self.last_sampled = None if sampled is None else sampled + self.class_start
        return loss

    @torch.no_grad()
    def full_state_dict(self, dst: int | None = None) -> dict | None:
        """The full class matrix (and bias, alpha) as a state_dict of L2SoftmaxLoss. dst=None: on every
        rank; dst=r: on rank r only (None elsewhere). A collective: every rank must call it."""
        out = {"weight": self._gather_full(self.weight, dst)}
        if self.bias is not None:
            out["bias"] = self._gather_full(self.bias, dst)
        out["alpha"] = self._alpha_value().detach().clone()
        return out if dst is None or dst == self.rank else None

    def _gather_full(self, t: torch.Tensor, dst):
        per = t.shape[0] // max(self.num_local, 1) if self.num_local else (
            self.options.subcenters if t.dim() == 2 else 1)  # K rows per class for the weight
        sizes = [n * per for n in self.shard_sizes]
        nmax = max(sizes)
        padded = t.new_zeros((nmax,) + tuple(t.shape[1:]))
        padded[: t.shape[0]] = t.detach()
        if dst is None:
            buf = t.new_empty((self.world_size * nmax,) + tuple(t.shape[1:]))
            _all_gather_single(buf, padded, group=self.group)
            chunks = buf.split(nmax)
        else:
            chunks = [torch.empty_like(padded) for _ in sizes] if dst == self.rank else None
            dist.gather(padded, chunks, dst=dist.get_global_rank(self.group, dst) if self.group is not None else dst,
                        group=self.group)
            if dst != self.rank:
                return None
        return torch.cat([c[:s] for c, s in zip(chunks, sizes)])

    @torch.no_grad()
    def load_full_state_dict(self, state: dict) -> None:
        """Take this rank's rows of a full state_dict (of this module or of L2SoftmaxLoss). Not a
        collective: each rank reads only its rows."""
        w = state["weight"]
        K = self.options.subcenters
        if tuple(w.shape) != (self.num_classes * K, self.in_features):
            raise ValueError(f"state['weight'] must have shape ({self.num_classes * K}, {self.in_features}), "
                             f"got {tuple(w.shape)}")
        lo, hi = self.class_start, self.class_start + self.num_local
        self.weight.copy_(w[lo * K:hi * K])
        if self.bias is not None:
            if "bias" not in state:
                raise ValueError("state has no 'bias' but this module has one")
            if tuple(state["bias"].shape) != (self.num_classes,):
                raise ValueError(f"state['bias'] must have shape ({self.num_classes},), "
                                 f"got {tuple(state['bias'].shape)}")
            self.bias.copy_(state["bias"][lo:hi])
        elif "bias" in state:
            raise ValueError("state has a 'bias' but this module has none (bias=False)")
        if "alpha" in state:
            self._set_alpha(state["alpha"])

    def extra_repr(self) -> str:
        o = self.options
        s = (f"in_features={self.in_features}, num_classes={self.num_classes}, "
             f"shard=[{self.class_start}, {self.class_start + self.num_local}) of rank {self.rank}/{self.world_size}, "
             f"alpha={float(self._alpha_value().detach()):g}, learn_alpha={self.learn_alpha}, "
             f"bias={self.bias is not None}, normalize_weight={o.normalize_weight}{o.repr_extras()}")
        if self.sample_rate < 1:
            s += f", sample_rate={self.sample_rate:g}"
        return s + f", reduction={self.reduction!r}, backend={self.backend!r}"


_default_split = shard_sizes
