"""InsightFace arcface_torch's PartialFC_V2 and CombinedMarginLoss on this library's fused op.

The switch is the import (docs/arcface_torch.md, "Switching"):

    from l2sm_kernels.compat.arcface_torch import CombinedMarginLoss, PartialFC_V2

with the same constructor signatures, the same state (one fp32 `weight` of this rank's shard, normal
std 0.01, their contiguous shard layout: a checkpoint of theirs loads unchanged), the same sampling
(every positive class of the global batch, then random negatives: int(sample_rate * num_local)
classes or the positives alone when they are more; sample_rate 0: positives only), the same margins
(below) and the same loss value: the mean over the global batch of -log(max(p_y, 1e-30)), identical on
every rank. The gradient that reaches local_embeddings is, as theirs (their AllGather's backward
multiplies it by the world size), world_size times that of the global mean, which a DDP backbone's
gradient averaging turns into the global loss's gradient.

Margins, as their CombinedMarginLoss (checked at construction, not at the first forward):
- m1 == 1 and m3 == 0: ArcFace. The target cosine becomes cos(arccos(c) + m2) with no fallback past
  pi (margin_fallback=False) and a detached gradient (the gradient w.r.t. c as if there were no
  margin: margin_grad="detached"), times s.
- m3 > 0: CosFace. The target cosine becomes c - m3 (m1 and m2 are ignored, as theirs), times s.
- any other (m1, m2, m3): ValueError (theirs raises in forward).
- interclass_filtering_threshold t > 0: every non-target cosine above t counts as 0 (and gets no
  gradient), fused through the op's negatives="filter" option.

Where this differs from theirs, on purpose:
- The loss is one fused op over the classes (no B x C_local logits; memory per the library's kernels);
  no torch.distributed needed (one process is world size 1), any batch size per step (uneven across
  ranks with batch_sizes=[...]), the labels are never changed in place, no .item() in backward, fp16 /
  bf16 embeddings accepted and accumulated in fp32 whatever `fp16` says (their fp16=True computes the
  logits in fp16; here the flag is kept for the signature only).
- Angular margin at c >= 1 - 1e-7: the op evaluates arccos at the clamped cosine 1 - 1e-7 (theirs at
  c), a difference of at most s sin(m2) 4.5e-4 in that row's target logit.
- A label outside [0, num_classes) is an error (theirs: a row of loss 69.08).
- Sampling always draws torch.rand(num_local) on the labels' device (theirs: on the CPU, and only when
  the positives fit in num_sample), so the RNG stream after a step can differ from theirs.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.distributed as dist
from torch import nn

from ..loss import l2_softmax_loss
from ..options import L2SMOptions, check_int

__all__ = ["CombinedMarginLoss", "PartialFC_V2", "margin_spec"]

# their DistCrossEntropy takes -log(clamp_min(p_y, 1e-30)) in fp32: no row's loss value exceeds this
LOSS_CAP = -math.log(float(torch.tensor(1e-30, dtype=torch.float32)))


def _real(name: str, v, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not -math.inf < v < math.inf:
        raise ValueError(f"{where}: {name} must be a finite number, got {v!r}")
    return float(v)


def margin_spec(margin_loss) -> dict:
    """What PartialFC_V2 takes from its margin_loss: {"s", "m2", "m3", "threshold"} with their
    CombinedMarginLoss's rules (m1 == 1 and m3 == 0: ArcFace with m2; m3 > 0: CosFace with m3; anything
    else a ValueError). Accepts this module's CombinedMarginLoss, theirs (attributes s, m1, m2, m3,
    interclass_filtering_threshold), and their losses.ArcFace (s, margin) and CosFace (s, m)."""
    name = type(margin_loss).__name__
    if all(hasattr(margin_loss, a) for a in ("s", "m1", "m2", "m3")):
        where = f"{name}(s, m1, m2, m3)"
        s, m1, m2, m3 = (_real(a, getattr(margin_loss, a), where) for a in ("s", "m1", "m2", "m3"))
        t = _real("interclass_filtering_threshold", getattr(margin_loss, "interclass_filtering_threshold", 0),
                  where)
        if m1 == 1.0 and m3 == 0.0:
            if not 0.0 <= m2 < math.pi:
                raise ValueError(f"{where}: the ArcFace margin m2 must be in [0, pi), got {m2!r}")
            m3 = 0.0
        elif m3 > 0.0:
            m2 = 0.0  # their CosFace branch ignores m1 and m2
        else:
            raise ValueError(f"{where} = ({m1!r}, {m2!r}, {m3!r}): arcface_torch's CombinedMarginLoss supports "
                             "m1 == 1 and m3 == 0 (ArcFace, angular margin m2) or m3 > 0 (CosFace, m1 and m2 "
                             "ignored); it raises on anything else, and so does this layer")
    elif hasattr(margin_loss, "s") and hasattr(margin_loss, "margin"):  # their losses.ArcFace
        where = f"{name}(s, margin)"
        s, m2, m3, t = _real("s", margin_loss.s, where), _real("margin", margin_loss.margin, where), 0.0, 0.0
        if not 0.0 <= m2 < math.pi:
            raise ValueError(f"{where}: margin must be in [0, pi), got {m2!r}")
    elif hasattr(margin_loss, "s") and hasattr(margin_loss, "m"):  # their losses.CosFace
        where = f"{name}(s, m)"
        s, m2, m3, t = _real("s", margin_loss.s, where), 0.0, _real("m", margin_loss.m, where), 0.0
        if m3 < 0:
            raise ValueError(f"{where}: m must be >= 0, got {m3!r}")
    else:
        raise TypeError(f"margin_loss must be a CombinedMarginLoss (this module's or arcface_torch's) or their "
                        f"ArcFace / CosFace: the fused op needs its s and margins, got {name}")
    if not s > 0:
        raise ValueError(f"{where}: s must be > 0, got {s!r}")
    if t < 0:
        raise ValueError(f"{where}: interclass_filtering_threshold must be >= 0, got {t!r}")
    return {"s": s, "m2": m2, "m3": m3, "threshold": t}


def loss_options(spec: dict) -> dict:
    """The keyword arguments of l2_softmax_loss / the class-parallel loss that compute their margin."""
    kw = dict(normalize_weight=True, margin_type="combined", margin=(1.0, spec["m2"], spec["m3"]),
              margin_grad="detached", margin_fallback=False)
    if spec["threshold"] > 0:
        kw.update(negatives="filter", negatives_t=spec["threshold"])
    return kw


class CombinedMarginLoss(nn.Module):
    """arcface_torch's CombinedMarginLoss(s, m1, m2, m3, interclass_filtering_threshold=0): the margin
    specification PartialFC_V2 fuses into its op (module docstring for the rules; refused combinations
    raise here, at construction).

    forward(logits, labels) is theirs, out of place, for code that applies it to a cosine matrix of
    its own (B x C: it builds what PartialFC_V2 avoids): logits (B, C) cosines, labels (B,) or (B, 1)
    column indices with -1 for rows whose target is not among the columns; returns s times the
    logits with the filtering and the target-column margin applied (ArcFace's detached)."""

    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0):
        super().__init__()
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.interclass_filtering_threshold = interclass_filtering_threshold
        self.spec = margin_spec(self)  # validates (theirs raises in forward)

    @property
    def kind(self) -> str:
        return "cosface" if self.spec["m3"] > 0 else "arcface"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        labels = labels.reshape(-1)
        if labels.shape[0] != logits.shape[0]:
            raise ValueError(f"labels must have {logits.shape[0]} entries (one per row of logits), got "
                             f"shape {tuple(labels.shape)}")
        pos = labels != -1
        col = torch.where(pos, labels, torch.zeros_like(labels)).long()
        target_col = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, col[:, None], pos[:, None])
        if spec["threshold"] > 0:  # a constant mask: filtered cosines are 0 with no gradient
            with torch.no_grad():
                keep = ~((logits > spec["threshold"]) & ~target_col)
            logits = logits * keep
        c_t = logits.gather(1, col[:, None])
        if self.kind == "arcface":
            with torch.no_grad():  # detached: the gradient passes as if f(c) = c
                delta = torch.cos(torch.acos(c_t) + spec["m2"]) - c_t
        else:
            delta = torch.full_like(c_t, -spec["m3"])
        logits = logits + torch.where(target_col, delta, torch.zeros_like(delta))
        return logits * spec["s"]

    def extra_repr(self) -> str:
        return (f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, "
                f"interclass_filtering_threshold={self.interclass_filtering_threshold}")


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies by `factor` (their AllGather's backward: grad * world_size)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class PartialFC_V2(nn.Module):  # noqa: N801 - their name
    """arcface_torch's PartialFC_V2(margin_loss, embedding_size, num_classes, sample_rate=1.0, fp16=False)
    on the fused op (module docstring: what matches and what differs).

    Shard of rank r of W ranks (their layout): num_local = C // W + (r < C % W) classes starting at
    class_start = C // W * r + min(r, C % W). With torch.distributed initialized the ranks of `group`
    (default: the world) share the classes through the class-parallel loss
    (l2sm_kernels.distributed); without it this is world size 1 in one process.

    forward(local_embeddings (B, embedding_size), local_labels (B,) or (B, 1) global class indices,
    batch_sizes=None) -> the mean loss over the global batch (the same on every rank). batch_sizes:
    every rank's B when they differ (the same list on every rank); equal batch sizes may change from
    step to step. After a sampled step, `weight_index` holds the sampled local class indices.

    Keyword-only extras: group, backend ("auto", "eager", "cpu", "triton"), device, max_logits_bytes (the
    memory dial: the most bytes of this rank's logits kept between forward and backward; None: the
    backend's default, 0: none, docs/memory_dial.md).
    """

    _version = 2

    def __init__(self, margin_loss, embedding_size: int, num_classes: int, sample_rate: float = 1.0,
                 fp16: bool = False, *, group=None, backend: str = "auto", device=None, max_logits_bytes=None):
        super().__init__()
        self.spec = margin_spec(margin_loss)
        self.options = loss_options(self.spec)
        if max_logits_bytes is not None:
            self.options["max_logits_bytes"] = max_logits_bytes
        self.margin_softmax = margin_loss
        self.embedding_size = check_int("embedding_size", embedding_size, 1)
        num_classes = check_int("num_classes", num_classes, 1)
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real) or not 0 <= sample_rate <= 1:
            raise ValueError(f"sample_rate must be a number in [0, 1], got {sample_rate!r}")
        if not isinstance(fp16, bool):
            raise TypeError(f"fp16 must be a bool, got {fp16!r}")
        self.sample_rate, self.fp16, self.backend = float(sample_rate), fp16, backend
        self.distributed = dist.is_available() and dist.is_initialized()
        self.group = group
        if self.distributed:
            self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        elif group is not None:
            raise ValueError("group was given but torch.distributed is not initialized")
        else:
            self.world_size, self.rank = 1, 0
        W, r = self.world_size, self.rank
        self.num_classes = num_classes
        self.num_local = num_classes // W + int(r < num_classes % W)
        self.class_start = num_classes // W * r + min(r, num_classes % W)
        self.num_sample = int(self.sample_rate * self.num_local)
        self.weight_index = None
        # their initialization, with the same call (the same draw from the same RNG state)
        self.weight = nn.Parameter(torch.normal(0, 0.01, (self.num_local, self.embedding_size), device=device))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.normal_(0, 0.01)

    def _rate(self) -> float:
        """The library's sample rate giving their num_sample: max(int(q n), positives) classes, with
        sample_rate 0 (positives only) as the smallest positive q (int(q n) = 0)."""
        if self.sample_rate >= 1:
            return 1.0
        return self.sample_rate if self.sample_rate > 0 else 5e-324

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor, batch_sizes=None) -> torch.Tensor:
        if not isinstance(local_labels, torch.Tensor):
            raise TypeError(f"local_labels must be a torch.Tensor, got {type(local_labels).__name__}")
        if not isinstance(local_embeddings, torch.Tensor) or local_embeddings.dim() != 2:
            raise ValueError("local_embeddings must be a 2-D tensor (batch, embedding_size), got "
                             f"{getattr(local_embeddings, 'shape', type(local_embeddings).__name__)}")
        B = local_embeddings.shape[0]
        if local_labels.numel() != B or (local_labels.dim() == 2 and local_labels.shape[1] != 1) or \
                local_labels.dim() > 2:
            raise ValueError(f"local_labels must have shape ({B},) or ({B}, 1) to match local_embeddings, got "
                             f"{tuple(local_labels.shape)}")
        labels = local_labels.reshape(-1)  # a view: the caller's tensor is never changed
        if labels.dtype not in (torch.int64, torch.int32):
            labels = labels.long()
        s, q = self.spec["s"], self._rate()
        if self.distributed:
            from ..distributed.class_parallel import _class_parallel

            x = _ScaleGrad.apply(local_embeddings, self.world_size) if self.world_size > 1 else local_embeddings
            rows, sampled = _class_parallel(x, self.weight, labels, self.class_start, s, None, group=self.group,
                                            reduction="none", ignore_index=-100, label_smoothing=0.0, eps=1e-12,
                                            backend=self.backend, batch_sizes=batch_sizes, sample_rate=q,
                                            generator=None, check_key=self, **self.options)
        else:
            if batch_sizes is not None and list(batch_sizes) != [B]:
                raise ValueError(f"batch_sizes must be [{B}] without torch.distributed, got {batch_sizes!r}")
            box = [] if q < 1 else None
            rows = l2_softmax_loss(local_embeddings, self.weight, labels, s, reduction="none", sample_rate=q,
                                   backend=self.backend, _sampled=box, **self.options)
            sampled = box[0] if box else None
        self.weight_index = sampled
        # their value: -log(clamp_min(p_y, 1e-30)); their gradient ignores the clamp (softmax - onehot)
        rows = rows + (rows.clamp_max(LOSS_CAP) - rows).detach()
        return rows.mean()

    def extra_repr(self) -> str:
        sp = self.spec
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"shard=[{self.class_start}, {self.class_start + self.num_local}) of rank {self.rank}/"
                f"{self.world_size}, s={sp['s']:g}, m2={sp['m2']:g}, m3={sp['m3']:g}, "
                f"interclass_filtering_threshold={sp['threshold']:g}, sample_rate={self.sample_rate:g}, "
                f"fp16={self.fp16}, backend={self.backend!r}")
