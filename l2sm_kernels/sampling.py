"""Partial FC class sampling, shared by the single-process loss (l2_softmax_loss(sample_rate=q)) and
the class-parallel loss (each rank samples its own shard)."""
from __future__ import annotations

import torch


def partial_fc_sample(target: torch.Tensor, class_start: int, num_local: int, sample_rate: float, *,
                      ignore_index: int = -100, generator: torch.Generator | None = None) -> torch.Tensor:
    """Partial FC negative sampling (An et al., "Killing Two Birds with One Stone", CVPR 2022;
    InsightFace's PartialFC_V2.sample) of the classes [class_start, class_start + num_local) (one
    process: all of them, class_start = 0; class-parallel: one rank's shard): every one of them that is
    a target of the (global) batch `target`, plus random others, in all
    max(int(sample_rate * num_local), positives) classes. Returns their sorted LOCAL indices (int64).

    The draw uses torch.rand(num_local, generator=generator) on target's device (this rank's RNG when
    generator is None). Ranks need not agree on anything: each samples its own shard from the global
    targets, which every rank holds. Reading the number of positives is a host synchronization.
    """
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    local = target - class_start
    own = (local >= 0) & (local < num_local) & (target != ignore_index)
    # mark positives without a data-dependent shape: slot 0 collects the rows owned elsewhere
    slots = torch.zeros(num_local + 1, dtype=torch.bool, device=target.device)
    slots[torch.where(own, local + 1, 0)] = True
    positive = slots[1:]
    k = max(int(sample_rate * num_local), int(positive.sum()))
    score = torch.rand(num_local, generator=generator, device=target.device)
    score = torch.where(positive, torch.full_like(score, 2.0), score)  # rand < 1 < 2: positives first
    return torch.topk(score, k, sorted=False).indices.sort().values
