"""Verification metrics of a face-verification toolkit, in numpy (float64, exact counts), checked against
scikit-learn in tests/test_metrics.py (docs/design.md, "Scoring", "Metrics").

Every function takes scores (higher = "same") and is_same (True for a genuine / same-identity pair, False
for an impostor pair) as 1-D torch tensors, numpy arrays or sequences of equal length, with at least one
pair of each kind; NaN and infinite scores raise a ValueError naming the first one (as scikit-learn does;
ScoreHistogram instead counts +-inf into its end bins, exactly, and refuses NaN).

- roc_curve(scores, is_same) -> (fpr, tpr, thresholds): scikit-learn's roc_curve with
  drop_intermediate=False: one point per distinct score, thresholds decreasing, a first point (0, 0) at
  threshold +inf; a pair is accepted at threshold t when score >= t.
- roc_auc(scores, is_same): the area under that curve (trapezoids), i.e. P(s_genuine > s_impostor) with
  ties counted one half (scikit-learn's roc_auc_score).
- tar_at_far(scores, is_same, far): the IJB convention: the true-accept rate at the operating point with the
  largest false-accept rate not above `far` (the last ROC point with fpr <= far; no interpolation).
- eer(scores, is_same): the equal error rate, where the false-accept rate equals the false-reject rate
  1 - tpr on the piecewise-linear ROC curve (the crossing is interpolated linearly between the two ROC
  points around it; the usual brentq(1 - x - interp1d(fpr, tpr)(x)) recipe, without its trouble at
  vertical segments).
- kfold_accuracy(scores, is_same, folds=10): the LFW / CFP / AgeDB protocol: the pairs in `folds`
  contiguous folds in their given order (scikit-learn's KFold(folds, shuffle=False)); for each fold the
  threshold with the best accuracy on the other folds (accept when score > t; candidates: -inf, the
  midpoints between consecutive distinct training scores, +inf; the smallest best one), then the accuracy
  on the fold. Returns KFold(mean, std, accuracies, thresholds), std the population std (numpy's default,
  what LFW tables report).
- ScoreHistogram: the streaming form for all-pairs protocols (N^2 / 2 pairs): counts of genuine and
  impostor scores in `bins` equal bins over [lo, hi] (default 2^16 bins over [-1, 1], bin width 3.1e-5;
  2 x bins int64 counts, 1 MiB, whatever the number of pairs), updated chunk by chunk on the scores'
  device. Its roc_curve / roc_auc / tar_at_far / eer treat each bin as one score level (thresholds at bin
  lower edges). AUC error bound: binning is monotone, so a genuine / impostor pair in different bins is
  ordered as the exact scores order it, and only pairs in the same bin (counted 1/2, exactly 0, 1/2 or
  1) can differ: |AUC_exact - AUC_hist| <= auc_error_bound() = sum_b P_b N_b / (2 P N), computed from the
  counts (P_b, N_b: genuine / impostor pairs in bin b). Scores outside [lo, hi] go to the end bins (the
  bound still holds). tar_at_far on the histogram is the exact value at bin edges, below the exact one by
  at most the genuine fraction of one bin.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np
import torch


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def _as_numpy(v, name: str, dtype) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        v = v.float() if v.dtype in (torch.float16, torch.bfloat16) else v
        v = v.numpy()
    a = np.asarray(v)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    return a.astype(dtype, copy=False)


def _finite_scores(s: np.ndarray) -> np.ndarray:
    """NaN and +-inf refused with the first position: a NaN has no place in the order; an infinite score
    has one, but no threshold of "accept when score > t" accepts -inf and the midpoints between levels
    are undefined at inf - inf, so the metrics would disagree about it (scikit-learn refuses both)."""
    bad = ~np.isfinite(s)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        what = "NaN" if np.isnan(s[i]) else "an infinite score"
        raise ValueError(f"scores contain {what} (scores[{i}] = {s[i]}); the metrics take finite scores, as "
                         "scikit-learn does (cosine scores are finite: check the embeddings; to keep an infinite "
                         "score as a certain decision, clip it, e.g. np.clip(scores, -1e300, 1e300))")
    return s


def _pairs(scores, is_same) -> tuple[np.ndarray, np.ndarray]:
    s = _finite_scores(_as_numpy(scores, "scores", np.float64))
    y = _as_numpy(is_same, "is_same", bool)
    if s.shape != y.shape:
        raise ValueError(f"scores and is_same must have the same length, got {len(s)} and {len(y)}")
    if y.all() or not y.any():
        raise ValueError("the metrics need both genuine (is_same) and impostor pairs")
    return s, y


class _Levels(NamedTuple):
    """Score levels in decreasing order with the genuine / impostor counts at each (int64)."""

    thresholds: np.ndarray
    pos: np.ndarray
    neg: np.ndarray


def _levels(s: np.ndarray, y: np.ndarray) -> _Levels:
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    starts = np.r_[0, np.flatnonzero(s[1:] != s[:-1]) + 1]  # first position of each distinct score (not
    # np.diff: inf - inf is NaN, which would split equal infinite scores into levels in input order)
    pos = np.add.reduceat(y.astype(np.int64), starts)
    neg = np.add.reduceat((~y).astype(np.int64), starts)
    return _Levels(s[starts], pos, neg)


# ---------------------------------------------------------------------------------------------
# the curve and the numbers read from it (shared by the exact metrics and the histogram)
# ---------------------------------------------------------------------------------------------
def _roc(lv: _Levels):
    tp = np.r_[0, np.cumsum(lv.pos)]
    fp = np.r_[0, np.cumsum(lv.neg)]
    return fp / fp[-1], tp / tp[-1], np.r_[np.inf, lv.thresholds]


def _auc(lv: _Levels) -> float:
    # sum over levels of impostors x (genuine pairs strictly above + half those at the level), over P N:
    # the trapezoids of the ROC curve, in exact integer counts
    P, N = int(lv.pos.sum()), int(lv.neg.sum())
    above = np.cumsum(lv.pos) - lv.pos
    num = float(np.sum(lv.neg.astype(np.float64) * (above + 0.5 * lv.pos)))
    return num / (float(P) * float(N))


def _tar_at_far(fpr, tpr, far):
    fars = np.atleast_1d(np.asarray(far, dtype=np.float64))
    if np.isnan(fars).any() or (fars < 0).any() or (fars > 1).any():
        raise ValueError(f"far must be in [0, 1], got {far!r}")
    i = np.searchsorted(fpr, fars, side="right") - 1  # the last point with fpr <= far (fpr[0] = 0)
    out = tpr[i]
    return float(out[0]) if np.ndim(far) == 0 else out


def _eer(fpr, tpr) -> float:
    f = (1.0 - tpr) - fpr  # false-reject minus false-accept rate: 1 at (0, 0), -1 at (1, 1), non-increasing
    i = int(np.argmax(f <= 0))  # first point at or past the crossing (exists: f[-1] = -1)
    if f[i] == 0 or i == 0:
        return float(fpr[i])
    t = f[i - 1] / (f[i - 1] - f[i])  # linear along the segment from point i - 1 to point i
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def roc_curve(scores, is_same):
    """(fpr, tpr, thresholds): every distinct score a point, thresholds decreasing from +inf (module doc)."""
    return _roc(_levels(*_pairs(scores, is_same)))


def roc_auc(scores, is_same) -> float:
    """Area under the ROC curve: P(genuine score > impostor score), ties one half."""
    return _auc(_levels(*_pairs(scores, is_same)))


def tar_at_far(scores, is_same, far):
    """True-accept rate at the largest false-accept rate <= far (IJB); far a number (-> float) or a sequence
    (-> array)."""
    fpr, tpr, _ = roc_curve(scores, is_same)
    return _tar_at_far(fpr, tpr, far)


def eer(scores, is_same) -> float:
    """Equal error rate (false accepts = false rejects), on the piecewise-linear ROC curve."""
    fpr, tpr, _ = roc_curve(scores, is_same)
    return _eer(fpr, tpr)


# ---------------------------------------------------------------------------------------------
# k-fold accuracy (LFW protocol)
# ---------------------------------------------------------------------------------------------
class KFold(NamedTuple):
    mean: float
    std: float  # population std over the folds (ddof = 0)
    accuracies: np.ndarray  # (folds,)
    thresholds: np.ndarray  # (folds,) the threshold chosen on the other folds (accept when score > t)


def fold_slices(n: int, folds: int) -> list[slice]:
    """scikit-learn's KFold(folds, shuffle=False): contiguous, the first n % folds folds one longer."""
    sizes = np.full(folds, n // folds, dtype=np.int64)
    sizes[: n % folds] += 1
    ends = np.cumsum(sizes)
    return [slice(int(e - z), int(e)) for e, z in zip(ends, sizes)]


def best_threshold(scores, is_same) -> float:
    """The threshold t with the best accuracy of "accept when score > t" on these pairs; candidates -inf,
    midpoints between consecutive distinct scores, +inf; the smallest of the best."""
    s = _finite_scores(_as_numpy(scores, "scores", np.float64))
    y = _as_numpy(is_same, "is_same", bool)
    lv = _levels(s, y)
    th, pos, neg = lv.thresholds[::-1], lv.pos[::-1], lv.neg[::-1]  # increasing score
    # candidate c accepts the levels above it: c = 0 is -inf (accept all), c = L is +inf (reject all)
    neg_below = np.r_[0, np.cumsum(neg)]  # impostors rejected by candidate c
    pos_above = int(pos.sum()) - np.r_[0, np.cumsum(pos)]  # genuine pairs accepted by candidate c
    correct = neg_below + pos_above
    c = int(np.argmax(correct))
    if c == 0:
        return -math.inf
    if c == len(th):
        return math.inf
    return float(0.5 * (th[c - 1] + th[c]))


def kfold_accuracy(scores, is_same, folds: int = 10) -> KFold:
    """The LFW protocol: per fold, the best threshold of the other folds, accuracy on the fold (module doc)."""
    if isinstance(folds, bool) or not isinstance(folds, numbers.Integral) or folds < 2:
        raise ValueError(f"folds must be an int >= 2, got {folds!r}")
    s, y = _pairs(scores, is_same)
    if len(s) < folds:
        raise ValueError(f"kfold_accuracy needs at least folds = {folds} pairs, got {len(s)}")
    accs, ths = [], []
    for sl in fold_slices(len(s), folds):
        train = np.ones(len(s), dtype=bool)
        train[sl] = False
        t = best_threshold(s[train], y[train])
        accs.append(float(np.mean((s[sl] > t) == y[sl])))
        ths.append(t)
    a = np.asarray(accs)
    return KFold(float(a.mean()), float(a.std()), a, np.asarray(ths))


# ---------------------------------------------------------------------------------------------
# streaming histogram (all-pairs protocols)
# ---------------------------------------------------------------------------------------------
class ScoreHistogram:
    """Genuine and impostor score counts in `bins` equal bins over [lo, hi], accumulated chunk by chunk
    (update), with the metrics of the binned scores and the bound of the binned AUC (module docstring).
    Memory: 2 x bins int64 counts on `device`."""

    DEFAULT_BINS = 1 << 16

    def __init__(self, bins: int = DEFAULT_BINS, lo: float = -1.0, hi: float = 1.0, device=None):
        if isinstance(bins, bool) or not isinstance(bins, numbers.Integral) or bins < 1:
            raise ValueError(f"bins must be an int >= 1, got {bins!r}")
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"need finite lo < hi, got lo={lo!r}, hi={hi!r}")
        self.bins, self.lo, self.hi = int(bins), float(lo), float(hi)
        self.pos = torch.zeros(self.bins, dtype=torch.int64, device=device)
        self.neg = torch.zeros(self.bins, dtype=torch.int64, device=device)

    @property
    def width(self) -> float:
        return (self.hi - self.lo) / self.bins

    def update(self, scores: torch.Tensor, is_same: torch.Tensor) -> "ScoreHistogram":
        """Add a chunk of pairs (1-D tensors of equal length; moved to the counts' device)."""
        s = torch.as_tensor(scores).detach().reshape(-1).to(self.pos.device)
        y = torch.as_tensor(is_same).detach().reshape(-1).to(self.pos.device, torch.bool)
        if s.shape != y.shape:
            raise ValueError(f"scores and is_same must have the same length, got {s.numel()} and {y.numel()}")
        if torch.isnan(s).any():
            raise ValueError("scores contain NaN")
        # bin of s: floor((s - lo) / width) in float64, clamped into [0, bins): monotone in s (+-inf: the end
        # bins, exactly)
        b = ((s.double() - self.lo) * (self.bins / (self.hi - self.lo))).floor_().clamp_(0, self.bins - 1).long()
        self.pos += torch.bincount(b[y], minlength=self.bins)
        self.neg += torch.bincount(b[~y], minlength=self.bins)
        return self

    def _lv(self) -> _Levels:
        pos, neg = self.pos.cpu().numpy()[::-1], self.neg.cpu().numpy()[::-1]
        if pos.sum() == 0 or neg.sum() == 0:
            raise ValueError("the metrics need both genuine (is_same) and impostor pairs")
        edges = self.lo + np.arange(self.bins - 1, -1, -1, dtype=np.float64) * self.width  # lower edges, decreasing
        keep = (pos + neg) > 0  # empty bins add no ROC point
        return _Levels(edges[keep], pos[keep].astype(np.int64), neg[keep].astype(np.int64))

    @property
    def counts(self) -> tuple[int, int]:
        """(genuine pairs, impostor pairs) so far."""
        return int(self.pos.sum()), int(self.neg.sum())

    def roc_curve(self):
        return _roc(self._lv())

    def roc_auc(self) -> float:
        return _auc(self._lv())

    def auc_error_bound(self) -> float:
        """sum_b P_b N_b / (2 P N): |exact AUC - roc_auc()| is at most this."""
        lv = self._lv()
        return float(np.sum(lv.pos.astype(np.float64) * lv.neg)) / (2.0 * float(lv.pos.sum()) * float(lv.neg.sum()))

    def tar_at_far(self, far):
        fpr, tpr, _ = self.roc_curve()
        return _tar_at_far(fpr, tpr, far)

    def eer(self) -> float:
        fpr, tpr, _ = self.roc_curve()
        return _eer(fpr, tpr)
