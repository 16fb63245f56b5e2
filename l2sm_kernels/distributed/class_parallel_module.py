"""ClassParallelL2SoftmaxLoss: the module form of the class-parallel loss (class_parallel.py), which
owns this rank's shard of the class matrix, and its refusal to be wrapped in DistributedDataParallel."""
from __future__ import annotations

import math
import numbers
import sys
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..backends.registry import check_backend
from ..loss_module import (L2SoftmaxLoss, checkpoint_record_diffs, default_alpha_min, getattr_with_alpha,
                           initial_alpha, register_alpha_state_hooks)
from ..options import L2SMOptions, check_alpha, check_int, check_reduction, check_sample_rate
from .class_parallel import GRAD_REDUCE_DTYPES, _class_parallel, shard_sizes
from .rank_device import _check_rank_device
from .collectives import _all_gather_single

__all__ = ["ClassParallelCurricularFaceLoss", "ClassParallelL2SoftmaxLoss"]

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
    max_logits_bytes: the memory dial (bytes of this shard's logits of the global batch kept between
    the passes; None: the backend's default; docs/memory_dial.md).

    Checkpoints (docs/class_parallel.md, "Checkpoints"): the state_dict holds this rank's shard and
    records what it is (rank, world size, shard_sizes, class range, the model's options); loading it
    into another rank's module, another split or another model is refused before anything is
    written. load_shards(states) reshards on purpose from the per-rank checkpoints of any number of
    ranks; full_state_dict() gathers the full matrix (in chunks, to the CPU by default) with the keys
    of L2SoftmaxLoss ("weight", "bias", "alpha"), so a single-process L2SoftmaxLoss loads it;
    load_full_state_dict(state) takes this rank's rows of a full one (load it with
    torch.load(..., mmap=True) so that no rank reads all of it into memory).

    On CUDA under NCCL, device must be the rank's current device (torch.cuda.set_device(local_rank)
    or init_process_group(device_id=...) first): another one is a ValueError saying so.
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
                 alpha_min: float | None = None, overlap_grad_reduce: bool = False,
                 grad_reduce_dtype: str = "compute", max_logits_bytes: int | None = None, negatives: str = "none",
                 negatives_t=None):
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
        if not isinstance(overlap_grad_reduce, bool):
            raise TypeError(f"overlap_grad_reduce must be a bool, got {overlap_grad_reduce!r}")
        if grad_reduce_dtype not in GRAD_REDUCE_DTYPES:
            raise ValueError(f"grad_reduce_dtype must be one of {GRAD_REDUCE_DTYPES}, got {grad_reduce_dtype!r}")
        self.overlap_grad_reduce, self.grad_reduce_dtype = overlap_grad_reduce, grad_reduce_dtype
        if device is not None:
            _check_rank_device(device, group, "device")
        self.options = L2SMOptions(normalize_weight=normalize_weight, margin_type=margin_type, margin=margin,
                                   ignore_index=ignore_index, label_smoothing=label_smoothing, subcenters=subcenters,
                                   margin_grad=margin_grad, max_logits_bytes=max_logits_bytes, negatives=negatives,
                                   negatives_t=negatives_t)
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
        register_alpha_state_hooks(self, with_options=True)
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

    def batch_negatives_t(self):
        """The non-target transform's t of this step (ClassParallelCurricularFaceLoss: its running average)."""
        return self.options.negatives_t

    def forward(self, features: torch.Tensor, target: torch.Tensor, batch_sizes=None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """batch_sizes: None (equal batch sizes), the list of every rank's, or "auto" (gathered)."""
        o = self.options
        loss, sampled = _class_parallel(
            features, self.weight, target, self.class_start, self._alpha_value(), self.bias, group=self.group,
            normalize_weight=o.normalize_weight, margin=o.margin, margin_type=o.margin_type,
            reduction=self.reduction, ignore_index=o.ignore_index, label_smoothing=o.label_smoothing, eps=o.eps,
            backend=self.backend, batch_sizes=batch_sizes, sample_rate=self.sample_rate, generator=generator,
            subcenters=o.subcenters, margin_grad=o.margin_grad, check_key=self,
            overlap_grad_reduce=self.overlap_grad_reduce, grad_reduce_dtype=self.grad_reduce_dtype,
            max_logits_bytes=o.max_logits_bytes, negatives=o.negatives, negatives_t=self.batch_negatives_t())
        self.last_sampled = None if sampled is None else sampled + self.class_start
        return loss

    @torch.no_grad()
    def full_state_dict(self, dst: int | None = None, device="cpu", chunk_bytes: int = 2 ** 28) -> dict | None:
        """The full class matrix (and bias, alpha) as a state_dict of L2SoftmaxLoss. dst=None: on every
        rank; dst=r: on rank r only (None elsewhere). The rows are gathered in chunks (at most
        chunk_bytes of collective buffer per rank, 256 MiB by default) straight into tensors on
        `device` (the CPU by default; None: the shard's device), so no GPU holds the full matrix.
        A collective: every rank must call it."""
        out = {"weight": self._gather_full(self.weight, dst, device, chunk_bytes)}
        if self.bias is not None:
            out["bias"] = self._gather_full(self.bias, dst, device, chunk_bytes)
        out["alpha"] = self._alpha_value().detach().clone().to(device if device is not None else self.weight.device)
        return out if dst is None or dst == self.rank else None

    def _gather_full(self, t: torch.Tensor, dst, device, chunk_bytes):
        """The rows of every rank's shard of t, in order, on `device`: per chunk of rows (the same
        number of chunks on every rank, from shard_sizes), an all-gather (dst=None) or a gather to
        dst of each rank's next rows, padded to the chunk."""
        per = (self.options.subcenters if t.dim() == 2 else 1)  # rows per class: K for the weight
        sizes = [n * per for n in self.shard_sizes]
        tail = tuple(t.shape[1:])
        row_bytes = max(1, math.prod(tail)) * t.element_size()
        chunk = max(1, min(max(sizes), chunk_bytes // (row_bytes * self.world_size)))
        mine = dst is None or dst == self.rank
        out_device = t.device if device is None else torch.device(device)
        out = torch.empty((sum(sizes),) + tail, dtype=t.dtype, device=out_device) if mine else None
        starts = [sum(sizes[:r]) for r in range(self.world_size)]
        dst_global = None if dst is None else (dist.get_global_rank(self.group, dst) if self.group is not None else dst)
        for lo in range(0, max(sizes), chunk):
            piece = t.new_zeros((chunk,) + tail)
            hi = min(lo + chunk, t.shape[0])
            if hi > lo:
                piece[: hi - lo] = t.detach()[lo:hi]
            if dst is None:
                buf = t.new_empty((self.world_size * chunk,) + tail)
                _all_gather_single(buf, piece, group=self.group)
                parts = buf.split(chunk)
            else:
                parts = [torch.empty_like(piece) for _ in sizes] if mine else None
                dist.gather(piece, parts, dst=dst_global, group=self.group)
            if mine:
                for r, (p, n) in enumerate(zip(parts, sizes)):
                    m = min(chunk, n - lo)
                    if m > 0:
                        out[starts[r] + lo: starts[r] + lo + m] = p[:m].to(out_device)
        return out

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

    @torch.no_grad()
    def load_shards(self, states: Sequence[dict]) -> None:
        """Reshard on purpose: take this rank's rows from per-rank checkpoints (state_dicts of this
        module, each with its record) of any number of ranks and any split, e.g. those of a run on 8
        GPUs into a run on 16. The records must describe one model with this module's model options
        (docs/class_parallel.md, "Model options and schedule options") and shards that cover this
        rank's class range. Not a collective; with torch.load(..., mmap=True) each rank reads only
        the rows it takes."""
        K = self.options.subcenters
        lo, hi = self.class_start, self.class_start + self.num_local
        pieces, bias_pieces, alpha, covered = [], [], None, lo
        records = []
        for i, st in enumerate(states):
            rec = _shard_record(st, f"states[{i}]")
            diffs = checkpoint_record_diffs(rec, self.get_extra_state())
            if diffs:
                raise RuntimeError(f"{type(self).__name__}.load_shards: states[{i}] is a shard of another model "
                                   f"({'; '.join(diffs)})")
            records.append((rec["class_start"], rec["class_start"] + rec["num_local"], i, st))
        for start, end, i, st in sorted(records):
            if alpha is None and "alpha" in st:
                alpha = st["alpha"]
            a, e = max(start, covered), min(end, hi)
            if e <= a:
                continue
            if start > covered:
                break
            w = st["weight"]
            if tuple(w.shape) != ((end - start) * K, self.in_features):
                raise ValueError(f"states[{i}]['weight'] must have shape ({(end - start) * K}, {self.in_features}) "
                                 f"for its classes [{start}, {end}), got {tuple(w.shape)}")
            pieces.append(w[(a - start) * K:(e - start) * K])
            if self.bias is not None:
                if "bias" not in st:
                    raise ValueError(f"states[{i}] has no 'bias' but this module has one")
                bias_pieces.append(st["bias"][a - start:e - start])
            covered = e
        if covered < hi:
            raise ValueError(f"load_shards: the shards given do not cover this rank's classes [{lo}, {hi}) "
                             f"(classes from {covered} on are missing); pass every rank's checkpoint")
        if pieces:
            self.weight.copy_(torch.cat(pieces))
            if self.bias is not None:
                self.bias.copy_(torch.cat(bias_pieces))
        if alpha is not None:
            self._set_alpha(alpha)

    # --------------------------------------------------------------------------------- checkpoints
    def get_extra_state(self) -> dict:
        """The record of this rank's shard: what it is (layout) and the options (model and schedule)."""
        return {"version": 1, "class": type(self).__name__, "in_features": self.in_features,
                "num_classes": self.num_classes, "options": self.options.to_dict(), "sample_rate": self.sample_rate,
                "head": {}, "rank": self.rank, "world_size": self.world_size, "shard_sizes": list(self.shard_sizes),
                "class_start": self.class_start, "num_local": self.num_local,
                "overlap_grad_reduce": self.overlap_grad_reduce, "grad_reduce_dtype": self.grad_reduce_dtype}

    def check_checkpoint(self, state) -> None:
        """Refuse (RuntimeError) a record of another model or another class range; called by the
        load_state_dict pre-hook, before any tensor is written."""
        rec = _shard_record({"_extra_state": state}, "the checkpoint")
        diffs = checkpoint_record_diffs(rec, self.get_extra_state())
        if diffs:
            raise RuntimeError(
                f"{type(self).__name__}: the checkpoint is a shard of another model ({'; '.join(diffs)}). Construct "
                "the module with the checkpoint's model options, or load the tensors alone on purpose: "
                "module.load_state_dict({k: v for k, v in sd.items() if not k.endswith('_extra_state')}, strict=False)")
        theirs = (rec["class_start"], rec["class_start"] + rec["num_local"])
        mine = (self.class_start, self.class_start + self.num_local)
        if theirs != mine:
            raise RuntimeError(
                f"{type(self).__name__}: the checkpoint holds classes [{theirs[0]}, {theirs[1]}) (rank {rec.get('rank')} "
                f"of {rec.get('world_size')}, shard_sizes {rec.get('shard_sizes')}); this module is rank {self.rank} of "
                f"{self.world_size} with classes [{mine[0]}, {mine[1]}). Load this rank's own file, or reshard on "
                "purpose: module.load_shards([every rank's state_dict]) or module.load_full_state_dict(full)")

    def set_extra_state(self, state) -> None:
        self.check_checkpoint(state)

    def extra_repr(self) -> str:
        o = self.options
        s = (f"in_features={self.in_features}, num_classes={self.num_classes}, "
             f"shard=[{self.class_start}, {self.class_start + self.num_local}) of rank {self.rank}/{self.world_size}, "
             f"alpha={float(self._alpha_value().detach()):g}, learn_alpha={self.learn_alpha}, "
             f"bias={self.bias is not None}, normalize_weight={o.normalize_weight}{o.repr_extras()}")
        if self.sample_rate < 1:
            s += f", sample_rate={self.sample_rate:g}"
        if self.overlap_grad_reduce:
            s += ", overlap_grad_reduce=True"
        if self.grad_reduce_dtype != "compute":
            s += f", grad_reduce_dtype={self.grad_reduce_dtype!r}"
        return s + f", reduction={self.reduction!r}, backend={self.backend!r}"


def _shard_record(st, what: str) -> dict:
    rec = st.get("_extra_state") if isinstance(st, dict) else None
    if not isinstance(rec, dict) or "class_start" not in rec or "num_local" not in rec or "options" not in rec:
        raise ValueError(f"{what} is not a ClassParallelL2SoftmaxLoss shard checkpoint (its '_extra_state' record, "
                         f"with the class range, is missing); for a full matrix use load_full_state_dict")
    return rec


_default_split = shard_sizes


class ClassParallelCurricularFaceLoss(ClassParallelL2SoftmaxLoss):
    """CurricularFace (heads.CurricularFaceLoss) with the class matrix sharded over the ranks: ArcFace's
    target s cos(theta_y + m) (s = 64, m = 0.5), curricular hard negatives, and the adaptive t, an
    exponential moving average of the GLOBAL batch's mean target cosine, identical on every rank:
    t <- momentum mean cos theta_y + (1 - momentum) t at each training-mode forward (before the loss
    uses it). Each rank computes the target cosines of the global rows whose class it owns (one
    all-gather of the B_g x D features and targets, under no_grad) and one all-reduce of (sum, count)
    gives every rank the same mean."""

    def __init__(self, in_features: int, num_classes: int, group=None, s: float = 64.0, m: float = 0.5,
                 momentum: float = 0.01, **kwargs):
        self.s, self.m, self.momentum = s, m, momentum
        super().__init__(in_features, num_classes, group=group, alpha=s, normalize_weight=True,
                         margin_type="arcface", margin=m, negatives="curricular", negatives_t=0.0, **kwargs)
        self.register_buffer("t", torch.zeros((), device=self.weight.device))

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        super().reset_parameters(seed)
        if hasattr(self, "t"):
            self.t.zero_()

    @torch.no_grad()
    def update_t(self, features: torch.Tensor, target: torch.Tensor, batch_sizes=None) -> None:
        from ..heads import target_cosines
        from .collectives import _gather_rows

        sizes = list(batch_sizes) if batch_sizes is not None else [features.shape[0]] * self.world_size
        x = _gather_rows(features.detach(), sizes, self.group)
        y = _gather_rows(target.long(), sizes, self.group)
        local = y - self.class_start
        own = (y != self.options.ignore_index) & (local >= 0) & (local < self.num_local)
        if self.num_local > 0:
            c = target_cosines(x, self.weight, torch.where(own, local, torch.zeros_like(local)),
                               self.options.subcenters, self.options.eps, own)
        else:
            c = x.new_zeros(x.shape[0], dtype=torch.float32)
        stats = torch.stack([c.double().sum(), own.sum().double()])
        dist.all_reduce(stats, group=self.group)
        mean = torch.where(stats[1] > 0, stats[0] / stats[1].clamp_min(1), self.t.double())
        self.t.copy_(((1 - self.momentum) * self.t.double() + self.momentum * mean).to(self.t.dtype))

    def forward(self, features: torch.Tensor, target: torch.Tensor, batch_sizes=None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        if self.training:
            self.update_t(features, target, batch_sizes)
        return super().forward(features, target, batch_sizes, generator)

    def batch_negatives_t(self):
        return self.t.detach().clone()
