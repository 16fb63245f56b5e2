"""Option combinations the tests run: a greedy all-pairs covering subset of a product of axes."""
from __future__ import annotations

import itertools


def pairwise_cover(axes: dict) -> list[dict]:
    """A deterministic greedy subset of the product of `axes` (name -> list of values) in which every
    pair of values of every two axes occurs at least once: each step takes the first combination (in
    product order) that covers the most pairs not yet covered."""
    keys = list(axes)
    pairs = list(itertools.combinations(range(len(keys)), 2))
    uncovered = {(a, i, b, j) for a, b in pairs for i in range(len(axes[keys[a]])) for j in range(len(axes[keys[b]]))}
    combos = list(itertools.product(*[range(len(v)) for v in axes.values()]))
    chosen = []
    while uncovered:
        best = max(combos, key=lambda c: sum((a, c[a], b, c[b]) in uncovered for a, b in pairs))
        chosen.append(best)
        uncovered -= {(a, best[a], b, best[b]) for a, b in pairs}
    return [{k: axes[k][i] for k, i in zip(keys, c)} for c in chosen]
