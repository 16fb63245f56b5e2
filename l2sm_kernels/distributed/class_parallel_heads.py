"""The face-recognition heads (heads.py) class-parallel: the class matrix sharded over the ranks as in
ClassParallelL2SoftmaxLoss, with each head's per-row state the same on every rank.

A per-row margin is computed on the rank that holds the row (from its features) and the class-parallel
loss gathers the margins of the global batch in rank order, so every shard applies the same margin to
the same row. What a head needs beyond its own rows comes from the global batch:
- AdaFace: the batch mean and standard deviation of the clipped feature norms (its moving averages)
  are those of the global batch (an all-gather of B_g norms), so the buffers stay equal on every rank
  and equal to the single-process head's on the concatenated batch.
- ElasticFace: the margins are drawn from a rank-agreed generator: every rank draws the B_g margins of
  the global batch from a CPU generator seeded alike (`seed`, or rank 0's draw broadcast) and keeps its
  rows', so a run draws what the single-process head draws on the concatenated batch with that seed.
- MagFace: its margin gradient needs each row's target cosine, which only the shard owning the target
  holds: the owner computes it for the rows it owns (on the gathered features, detached: one more
  all-gather of B_g x D and an all-reduce of B_g values) and the ranks sum them. The regularizer and
  the margin term of each rank's rows are summed over the ranks (an all-reduce whose backward is the
  identity, as the loss's statistics), so each rank's rows get their own gradient.
- ArcFace, CosFace, combined, sub-center (subcenters=K): fixed margins, nothing per row.
- MV-Softmax: a fixed t; the hard negatives' per-row threshold (the margined target cosine) is the
  class-parallel loss's own (negatives="mv"). CurricularFace's running t lives in
  ClassParallelCurricularFaceLoss (class_parallel_module.py) where the issue that added it put it.
The single-process heads' hyperparameters, defaults and docstrings apply (heads.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..heads import AdaFaceLoss, MagFaceLoss, _wide, magface_margin_slope
from .class_parallel import _class_parallel
from .class_parallel_module import ClassParallelL2SoftmaxLoss
from .collectives import _gather_rows, _SumOverRanks

__all__ = ["ClassParallelAdaFaceLoss", "ClassParallelArcFaceLoss", "ClassParallelCombinedMarginLoss",
           "ClassParallelCosFaceLoss", "ClassParallelElasticFaceLoss", "ClassParallelMVSoftmaxLoss",
           "ClassParallelMagFaceLoss"]


class _Head(ClassParallelL2SoftmaxLoss):
    """A class-parallel head: normalized class weights, alpha = s, the combined margin; forward asks
    batch_margin() for this batch's margin (per-row tensors hold this rank's rows)."""

    def __init__(self, in_features, num_classes, s=64.0, margin=(1.0, 0.0, 0.0), **kwargs):
        self.s = s
        super().__init__(in_features, num_classes, alpha=s, normalize_weight=True, margin_type="combined",
                         margin=margin, **kwargs)

    def batch_sizes_of(self, features, batch_sizes):
        """Every rank's batch size (a list, the same on every rank)."""
        if batch_sizes is None:
            return [features.shape[0]] * self.world_size
        if isinstance(batch_sizes, str):  # "auto": ask the ranks (a host read of the gathered sizes)
            mine = torch.tensor([features.shape[0]], dtype=torch.int64, device=features.device)
            return [int(v) for v in _gather_rows(mine, [1] * self.world_size, self.group).tolist()]
        return [int(b) for b in batch_sizes]

    def batch_margin(self, features, target, sizes):
        return self.options.margin

    def forward(self, features, target, batch_sizes=None, generator=None):
        sizes = self.batch_sizes_of(features, batch_sizes)
        return self._loss(features, target, self.batch_margin(features, target, sizes), self.reduction,
                          batch_sizes, generator)

    def _loss(self, features, target, margin, reduction, batch_sizes, generator):
        o = self.options
        loss, sampled = _class_parallel(
            features, self.weight, target, self.class_start, self._alpha_value(), self.bias, group=self.group,
            normalize_weight=o.normalize_weight, margin=margin, margin_type=o.margin_type, reduction=reduction,
            ignore_index=o.ignore_index, label_smoothing=o.label_smoothing, eps=o.eps, backend=self.backend,
            batch_sizes=batch_sizes, sample_rate=self.sample_rate, generator=generator, subcenters=o.subcenters,
            margin_grad=o.margin_grad, check_key=self, negatives=o.negatives, negatives_t=o.negatives_t)
        self.last_sampled = None if sampled is None else sampled + self.class_start
        return loss

    def _first_row(self, sizes) -> int:
        return sum(sizes[: self.rank])


class ClassParallelCombinedMarginLoss(_Head):
    """heads.CombinedMarginLoss class-parallel: target logit s (cos(theta + m2) - m3), m1 = 1."""

    def __init__(self, in_features, num_classes, m1=1.0, m2=0.5, m3=0.0, s=64.0, **kwargs):
        super().__init__(in_features, num_classes, s=s, margin=(m1, m2, m3), **kwargs)


class ClassParallelArcFaceLoss(ClassParallelCombinedMarginLoss):
    """heads.ArcFaceLoss class-parallel (subcenters=K: sub-center ArcFace)."""

    def __init__(self, in_features, num_classes, s=64.0, m=0.5, **kwargs):
        super().__init__(in_features, num_classes, 1.0, m, 0.0, s, **kwargs)


class ClassParallelCosFaceLoss(ClassParallelCombinedMarginLoss):
    """heads.CosFaceLoss class-parallel."""

    def __init__(self, in_features, num_classes, s=64.0, m=0.35, **kwargs):
        super().__init__(in_features, num_classes, 1.0, 0.0, m, s, **kwargs)


class ClassParallelMVSoftmaxLoss(_Head):
    """heads.MVSoftmaxLoss class-parallel: margin_type "am" (cos theta_y - m) or "arc" (cos(theta_y + m)),
    hard negatives t c + t - 1; s = 32, t = 1.2."""

    def __init__(self, in_features, num_classes, s=32.0, margin_type="am", m=None, t=1.2, **kwargs):
        if margin_type not in ("am", "arc"):
            raise ValueError(f"margin_type must be 'am' or 'arc', got {margin_type!r}")
        self.variant, self.t = margin_type, t
        self.m = (0.35 if margin_type == "am" else 0.5) if m is None else m
        margin = (1.0, 0.0, self.m) if margin_type == "am" else (1.0, self.m, 0.0)
        super().__init__(in_features, num_classes, s=s, margin=margin, negatives="mv", negatives_t=t, **kwargs)


class ClassParallelAdaFaceLoss(_Head):
    """heads.AdaFaceLoss class-parallel: the norm statistics of the global batch (module docstring)."""

    def __init__(self, in_features, num_classes, s=64.0, m=0.4, h=0.333, t_alpha=0.01, eps=1e-3, **kwargs):
        self.m, self.h, self.t_alpha, self.norm_eps = m, h, t_alpha, eps
        super().__init__(in_features, num_classes, s=s, **kwargs)
        device = self.weight.device
        self.register_buffer("batch_mean", torch.full((), 20.0, device=device))
        self.register_buffer("batch_std", torch.full((), 100.0, device=device))

    @torch.no_grad()
    def reset_parameters(self, seed=None) -> None:
        super().reset_parameters(seed)
        if hasattr(self, "batch_mean") and not self.batch_mean.is_meta:
            self.batch_mean.fill_(20.0)
            self.batch_std.fill_(100.0)

    scaler_from_norms = AdaFaceLoss.scaler_from_norms

    def batch_margin(self, features, target, sizes):
        norms = _gather_rows(AdaFaceLoss.clipped_norms(features), sizes, self.group)
        first = self._first_row(sizes)
        g = self.scaler_from_norms(norms)[first: first + features.shape[0]]
        return (1.0, -self.m * g, self.m + self.m * g)


class ClassParallelElasticFaceLoss(_Head):
    """heads.ElasticFaceLoss class-parallel: margins from a rank-agreed generator (module docstring).
    `seed`: the margins' generator's seed (None: rank 0's draw, broadcast; a collective)."""

    def __init__(self, in_features, num_classes, s=64.0, m=None, std=0.05, variant="arc", margin_seed=None,
                 **kwargs):
        if variant not in ("arc", "cos"):
            raise ValueError(f"variant must be 'arc' or 'cos', got {variant!r}")
        self.variant, self.std = variant, std
        self.m = (0.5 if variant == "arc" else 0.35) if m is None else m
        super().__init__(in_features, num_classes, s=s, **kwargs)
        seed = margin_seed if margin_seed is not None else self._shared_seed()
        self.margin_generator = torch.Generator().manual_seed(int(seed))

    def batch_margin(self, features, target, sizes):
        with torch.no_grad():
            every = torch.normal(self.m, self.std, (sum(sizes),), generator=self.margin_generator)
            first = self._first_row(sizes)
            mine = every[first: first + features.shape[0]].to(features.device, non_blocking=True)
        return (1.0, mine, 0.0) if self.variant == "arc" else (1.0, 0.0, mine)


class ClassParallelMagFaceLoss(_Head):
    """heads.MagFaceLoss class-parallel (module docstring). reduction "mean" or "sum"."""

    def __init__(self, in_features, num_classes, s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0,
                 **kwargs):
        if kwargs.get("label_smoothing", 0.0) != 0.0:
            raise ValueError("ClassParallelMagFaceLoss does not take label_smoothing (its margin gradient needs "
                             "p_y = exp(-CE))")
        if kwargs.get("reduction", "mean") == "none":
            raise ValueError("ClassParallelMagFaceLoss takes reduction 'mean' or 'sum'")
        self.l_a, self.u_a, self.l_m, self.u_m, self.lambda_g = l_a, u_a, l_m, u_m, lambda_g
        super().__init__(in_features, num_classes, s=s, **kwargs)

    magnitude = MagFaceLoss.magnitude
    margin_of = MagFaceLoss.margin_of
    regularizer = MagFaceLoss.regularizer

    @torch.no_grad()
    def _target_cosines(self, features, target_g, sizes):
        """The target cosine of every row of the global batch (the max over a class's sub-centers),
        computed by the shard that owns the target and summed over the ranks; in float64 for float64
        features and weights (as the single-process MagFaceLoss), else float32 (the dtypes agree over the
        ranks: the agreement check)."""
        o, K = self.options, self.options.subcenters
        dt = torch.promote_types(_wide(features), _wide(self.weight))
        x = F.normalize(_gather_rows(features.detach().to(dt), sizes, self.group), dim=1, eps=o.eps)
        local = target_g - self.class_start
        own = (target_g != o.ignore_index) & (local >= 0) & (local < self.num_local)
        col = torch.where(own, local, torch.zeros_like(local))
        c = torch.zeros(x.shape[0], dtype=dt, device=x.device)
        if self.num_local > 0:
            rows = (col[:, None] * K + torch.arange(K, device=col.device)).reshape(-1)
            w = F.normalize(self.weight.detach().to(dt).index_select(0, rows), dim=1)
            c = torch.where(own, (w.view(-1, K, w.shape[1]) * x[:, None, :]).sum(2).amax(1), c)
        dist.all_reduce(c, group=self.group)
        return c

    def forward(self, features, target, batch_sizes=None, generator=None):
        sizes = self.batch_sizes_of(features, batch_sizes)
        first, B = self._first_row(sizes), features.shape[0]
        a = self.magnitude(features)
        m = self.margin_of(a)
        ce_g = self._loss(features, target, (1.0, m.detach(), 0.0), "none", batch_sizes, generator)
        target_g = _gather_rows(target.long(), sizes, self.group)
        valid_g = target_g != self.options.ignore_index
        c = self._target_cosines(features, target_g, sizes)[first: first + B]
        valid, ce = valid_g[first: first + B], ce_g[first: first + B]
        slope = magface_margin_slope(c, m.detach(), ce, self.s, valid)
        mine = torch.where(valid, self.lambda_g * self.regularizer(a), torch.zeros_like(a)) + slope * (m - m.detach())
        extra = _SumOverRanks.apply(mine.sum().reshape(1).to(ce_g.dtype), self.group)[0]
        total = ce_g.sum() + extra
        return total if self.reduction == "sum" else total / valid_g.sum()
