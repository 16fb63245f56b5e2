"""Partial FC class sampling, shared by the single-process loss (l2_softmax_loss(sample_rate=q)) and
the class-parallel loss (each rank samples its own shard)."""
from __future__ import annotations

import torch


def partial_fc_size(num_local: int, sample_rate: float, batch: int, min_size: int = 0):
    """The sample's size when it is known without reading the targets: k = max(int(q n), min_size) when
    k >= batch (the positives, at most one per row, always fit, so max(k, positives) = k), else None (the
    count of positives decides, read on the host). A shape rule only: under torch.compile it is a guard on
    the sizes, never a graph break."""
    k = max(int(sample_rate * num_local), min_size)
    return k if k >= batch else None


def partial_fc_sample(target: torch.Tensor, class_start: int, num_local: int, sample_rate: float, *,
                      ignore_index: int = -100, generator: torch.Generator | None = None,
                      min_size: int = 0) -> torch.Tensor:
    """Partial FC negative sampling (An et al., "Killing Two Birds with One Stone", CVPR 2022;
    InsightFace's PartialFC_V2.sample) of the classes [class_start, class_start + num_local) (one
    process: all of them, class_start = 0; class-parallel: one rank's shard): every one of them that is
    a target of the (global) batch `target`, plus random others, in all
    max(int(sample_rate * num_local), positives, min_size) classes (min_size <= num_local). Returns their
    sorted LOCAL indices (int64); empty when that number is 0. The single-process loss passes min_size = 1
    (no sample is empty: with every target ignored and int(q n) = 0, one random class); a class-parallel
    shard may sample none (min_size 0: its rank then contributes nothing).

    The draw uses torch.rand(num_local, generator=generator) on target's device (this rank's RNG when
    generator is None). Ranks need not agree on anything: each samples its own shard from the global
    targets, which every rank holds.

    The size is fixed by the shapes when int(q n) >= len(target) (partial_fc_size: the usual case, e.g.
    q = 0.1 of 1M classes against a batch of 512): then nothing is read on the host, and under
    torch.compile(fullgraph=True), dynamic or not, the sampling traces without a graph break. Otherwise the
    number of positives is read on the host (a synchronization; under torch.compile a graph break, an error
    with fullgraph=True). torch.compile cannot trace a torch.Generator: under it, pass generator=None (the
    default generator, whose state compiled code keeps in step); a generator is then a clear error.
    """
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if generator is not None and torch.compiler.is_compiling():
        raise ValueError("partial_fc_sample: torch.compile cannot trace a torch.Generator (the Partial FC draw's "
                         "generator); under torch.compile pass generator=None (torch's default generator), or draw "
                         "outside the compiled region")
    local = target - class_start
    own = (local >= 0) & (local < num_local) & (target != ignore_index)
    # mark positives without a data-dependent shape: slot 0 collects the rows owned elsewhere
    slots = torch.zeros(num_local + 1, dtype=torch.bool, device=target.device)
    slots[torch.where(own, local + 1, 0)] = True
    positive = slots[1:]
    k = partial_fc_size(num_local, sample_rate, target.shape[0], min_size)
    if k is None:  # host read: the positives may outnumber int(q n)
        k = max(int(sample_rate * num_local), min_size, int(positive.sum()))
    # no generator keyword when there is none: torch.rand(generator=None) fails on symbolic sizes under
    # torch.compile(dynamic=True)
    draw = {} if generator is None else {"generator": generator}
    score = torch.rand(num_local, device=target.device, **draw)
    score = torch.where(positive, torch.full_like(score, 2.0), score)  # rand < 1 < 2: positives first
    return torch.topk(score, k, sorted=False).indices.sort().values
