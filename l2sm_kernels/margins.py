"""The per-row margin table every backend reads, and the label smoothing as a tensor.

The target column's logit is alpha f(c) + b with (docs/design.md, "The margins"):

    f(c) = cos(arccos(c~) + m2) - m3    while c > th, i.e. while arccos(c) + m2 < pi
         = c - m2 sin(m2) - m3          otherwise (monotonic fallback)
    c~ = clamp(c, -1 + 1e-7, 1 - 1e-7)

with th = cos(pi - m2) = -cos(m2) for 0 < m2 < pi; th = +inf where m2 = 0 (f = c - m3 exactly, no
clamp: that is cosface) or m2 >= pi; th = -inf where m2 < 0 (arccos(c) + m2 < pi always). The table
holds, per row, the values a kernel needs, computed here once in float64 with torch ops (no host
synchronization, traces under torch.compile, the same numbers for every backend):

    column 0  cos(m2)     column 1  sin(m2)     column 2  th     column 3  m2 sin(m2) + m3     column 4  m3

Backends round it to their compute dtype once (so a threshold is compared in that dtype, as rounded
from float64). Shape (R, 5), R = B when m2 or m3 is given per row, else 1 (backends broadcast a
single row). No gradient flows to the margins.
"""
from __future__ import annotations

import math

import torch

MARGIN_COLUMNS = ("cos_m2", "sin_m2", "threshold", "offset", "m3")
COS_M2, SIN_M2, THRESHOLD, OFFSET, M3 = range(5)


def _column(v, device) -> torch.Tensor:
    if v is None:
        return torch.zeros((), dtype=torch.float64, device=device)
    if isinstance(v, torch.Tensor):
        return v.detach().to(device=device, dtype=torch.float64)
    return torch.full((), v, dtype=torch.float64, device=device)


def margin_table(m2, m3, batch: int, device, fallback: bool = True) -> torch.Tensor:
    """(R, 5) float64 table of the margin (m2, m3: numbers, 0-d or (batch,) tensors, or None).
    fallback=False: th = -inf wherever m2 != 0, so the angular branch cos(arccos(c~) + m2) - m3 applies
    to every target cosine (InsightFace's CombinedMarginLoss, which has no fallback past pi)."""
    with torch.no_grad():
        a, b = _column(m2, device), _column(m3, device)
        rows = batch if (a.dim() == 1 or b.dim() == 1) else 1
        a, b = a.expand(rows), b.expand(rows)
        cos, sin = torch.cos(a), torch.sin(a)
        inf = torch.full((), math.inf, dtype=torch.float64, device=device)
        th = torch.where((a > 0) & (a < math.pi), -cos, torch.where(a < 0, -inf, inf))
        if not fallback:
            th = torch.where(a != 0, -inf, th)
        return torch.stack([cos, sin, th, a * sin + b, b], dim=1)


def smoothing_tensor(s, device) -> torch.Tensor | None:
    """The label smoothing as the op takes it: None when it is the number 0, else a 0-d float64 tensor."""
    if isinstance(s, torch.Tensor):
        return s.detach().to(device=device, dtype=torch.float64)
    if s == 0:
        return None
    return torch.full((), s, dtype=torch.float64, device=device)


# ---------------------------------------------------------------------------------------------
# the non-target transform's table (options.py, `negatives`; docs/design.md, "The non-target transforms")
# ---------------------------------------------------------------------------------------------
NEGATIVES_COLUMNS = ("t", "threshold")
NEG_T, NEG_THRESHOLD = range(2)
NEGATIVES_KINDS = ("none", "mv", "curricular", "filter")


def negatives_table(kind: str, t, device, thresholds=None) -> torch.Tensor | None:
    """(R, 2) float64 [t, threshold] of the non-target transform, or None for kind "none".

    The hard mask of row i is c_ij > threshold_i (j != y_i). A NaN threshold means the row's own
    margined target cosine f_i, which the kernels compute before the class pass ("mv",
    "curricular"); "filter" puts t there. thresholds: a (B,) tensor of per-row thresholds given from
    outside (the class-parallel loss: the rows whose target another shard owns); then R = B. No
    gradient (t is detached, as in the papers' code); no host synchronization."""
    if kind == "none":
        return None
    with torch.no_grad():
        tt = _column(t, device)
        if thresholds is not None:
            th = thresholds.detach().to(device=device, dtype=torch.float64)
            return torch.stack([tt.expand(th.shape[0]), th], dim=1)
        th = tt if kind == "filter" else torch.full((), math.nan, dtype=torch.float64, device=device)
        return torch.stack([tt, th]).view(1, 2)
