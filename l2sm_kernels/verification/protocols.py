"""The LFW-style pair protocol of InsightFace's verification sets (their eval/verification.py), and the
embedding of a set with a model (flip test, XNorm); docs/verification.md.

evaluate_pairs reproduces their numbers exactly (tests/test_verification.py compares it with a reference
written from their formulas, equal to the last digit), so a number it prints is comparable with a number
in their logs and papers:

- unit vectors (row / its L2 norm in float64, rows of norm below 10 float64 eps left as they are, as
  sklearn.preprocessing.normalize does), distance = squared L2 between the two rows of a pair;
- accuracy: thresholds np.arange(0, 4, 0.01); the pairs in `nfolds` contiguous folds in file order
  (scikit-learn's KFold(nfolds, shuffle=False)); per fold the threshold with the best accuracy on the
  other folds (the first of equal ones), "same" when distance < threshold (strict); the fold's accuracy;
  mean and population std over the folds;
- VAL at FAR 1e-3: thresholds np.arange(0, 4, 0.001); per fold the FAR of every threshold on the other
  folds, the threshold where it reaches 1e-3 by their interp1d(far, thresholds, kind="slinear") (a
  linear B-spline through the points sorted by FAR, as scipy <= 1.8 evaluated it: newer scipy refuses the
  repeated FAR values their code passes, so their script no longer runs there), or 0 when no threshold
  reaches 1e-3; VAL and FAR of that threshold on the fold; mean VAL, std VAL, mean FAR.

One difference, on purpose: a VAL fold without genuine pairs, or a FAR fold without impostor pairs, gives
NaN for that fold (theirs stops with ZeroDivisionError).
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np
import torch

from ..metrics import fold_slices
from .bin_files import to_model_input

__all__ = ["ACC_THRESHOLDS", "VAL_THRESHOLDS", "PairEmbeddings", "embed_pairs", "evaluate_pairs",
           "normalize_rows", "slinear_at"]

ACC_THRESHOLDS = np.arange(0, 4, 0.01)  # their grid, built the same way (not linspace: the values differ)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
FAR_TARGET = 1e-3


def _float64(v, name: str) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        v = v.float() if v.dtype in (torch.float16, torch.bfloat16) else v
        v = v.numpy()
    return np.asarray(v, dtype=np.float64)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """x / |x| per row in float64, as sklearn.preprocessing.normalize computes it (the norm from einsum,
    norms below 10 eps replaced by 1): their pipeline's unit vectors, bit for bit."""
    x = np.array(x, dtype=np.float64, copy=True)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms < 10 * np.finfo(np.float64).eps] = 1.0
    x /= norms[:, None]
    return x


def _counts_below(sorted_d: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many of the sorted distances are < each threshold (their np.less, as exact int64 counts)."""
    return np.searchsorted(sorted_d, thresholds, side="left").astype(np.int64)


def slinear_at(x: np.ndarray, y: np.ndarray, xp: float) -> float:
    """interp1d(x, y, kind="slinear")(xp) as scipy <= 1.8 computed it, repeated x values included: the points
    sorted by x (stable), a degree-1 B-spline with knots (x0, x0, x1, ..., x_last, x_last) and
    coefficients y, evaluated by de Boor's recursion on the knot interval t[l] <= xp < t[l + 1] (the last
    interval when xp is the largest x). xp must lie in [min x, max x] (interp1d raises otherwise)."""
    order = np.argsort(x, kind="mergesort")
    x, y = np.asarray(x, np.float64)[order], np.asarray(y, np.float64)[order]
    if not (x[0] <= xp <= x[-1]):
        raise ValueError(f"{xp!r} is outside the interpolation range [{x[0]!r}, {x[-1]!r}]")
    # knot interval: l = the first index with x[l] > xp (the right end), clipped to [1, len - 1]
    l = int(np.clip(np.searchsorted(x, xp, side="right"), 1, len(x) - 1))
    xa, xb = x[l - 1], x[l]
    if xb == xa:  # a zero-length knot interval: de Boor gives both basis functions 0
        return 0.0
    w = 1.0 / (xb - xa)  # the recursion's order of operations: w = 1 / (xb - xa), then w (xb - xp), w (xp - xa)
    h0, h1 = w * (xb - xp), w * (xp - xa)
    return float((0.0 + y[l - 1] * h0) + y[l] * h1)


def evaluate_pairs(embeddings, issame, nfolds: int = 10, normalize: bool = True) -> dict:
    """Their 10-fold verification protocol on (2N, D) embeddings (pair i = rows 2i, 2i + 1) and issame (N,)
    (module docstring). normalize=False uses the rows as given (already unit vectors, e.g. embed_pairs'
    output: normalizing twice can move the last bits).

    Returns a dict: "accuracy", "accuracy_std" (mean and population std of the folds' accuracies),
    "val", "val_std", "far" (VAL at FAR 1e-3: mean VAL, its std, mean FAR), and per fold
    "fold_accuracies", "fold_thresholds" (the chosen distance thresholds), "fold_val", "fold_far",
    "fold_val_thresholds"; "tpr", "fpr" (the ROC over ACC_THRESHOLDS, averaged over the test folds, as
    theirs returns), "pairs" N.
    """
    e = _float64(embeddings, "embeddings")
    same = np.asarray(issame.detach().cpu().numpy() if isinstance(issame, torch.Tensor) else issame)
    if e.ndim != 2 or e.shape[0] % 2:
        raise ValueError(f"embeddings must be (2N, D), got shape {e.shape}")
    if same.ndim != 1 or len(same) != e.shape[0] // 2:
        raise ValueError(f"issame must have N = {e.shape[0] // 2} entries (one per pair), got shape {same.shape}")
    same = same.astype(bool)
    if isinstance(nfolds, bool) or not isinstance(nfolds, numbers.Integral) or nfolds < 2:
        raise ValueError(f"nfolds must be an int >= 2, got {nfolds!r}")
    n = len(same)
    if n < nfolds:
        raise ValueError(f"evaluate_pairs needs at least nfolds = {nfolds} pairs, got {n}")
    if np.isnan(e).any():
        raise ValueError("embeddings contain NaN")
    if normalize:
        e = normalize_rows(e)
    diff = np.subtract(e[0::2], e[1::2])
    dist = np.sum(np.square(diff), 1)

    acc, thr, tprs, fprs = [], [], [], []
    val, far, vthr = [], [], []
    for sl in fold_slices(n, nfolds):
        test = np.zeros(n, dtype=bool)
        test[sl] = True
        train = ~test
        # accuracy: per threshold, correct = true accepts + true rejects (exact counts)
        d_same, d_diff = np.sort(dist[train & same]), np.sort(dist[train & ~same])
        tp = _counts_below(d_same, ACC_THRESHOLDS)
        tn = len(d_diff) - _counts_below(d_diff, ACC_THRESHOLDS)
        best = int(np.argmax((tp + tn) / int(train.sum())))  # their first argmax
        t = ACC_THRESHOLDS[best]
        dt, st = dist[test], same[test]
        pred = np.less(dt, t)
        acc.append(float(np.sum(pred & st) + np.sum(~pred & ~st)) / dt.size)
        thr.append(float(t))
        ts, td = np.sort(dt[st]), np.sort(dt[~st])
        tp_t = _counts_below(ts, ACC_THRESHOLDS)
        fp_t = _counts_below(td, ACC_THRESHOLDS)
        tprs.append(tp_t / len(ts) if len(ts) else np.zeros(len(ACC_THRESHOLDS)))
        fprs.append(fp_t / len(td) if len(td) else np.zeros(len(ACC_THRESHOLDS)))
        # VAL at FAR 1e-3: the threshold from the training folds' FAR curve
        n_diff = len(d_diff)
        far_train = (_counts_below(d_diff, VAL_THRESHOLDS) / n_diff) if n_diff else np.full(len(VAL_THRESHOLDS), np.nan)
        if np.max(far_train) >= FAR_TARGET:
            vt = slinear_at(far_train, VAL_THRESHOLDS, FAR_TARGET)
        else:
            vt = 0.0
        pred = np.less(dt, vt)
        ns, nd = int(st.sum()), int((~st).sum())
        val.append(float(np.sum(pred & st)) / ns if ns else math.nan)
        far.append(float(np.sum(pred & ~st)) / nd if nd else math.nan)
        vthr.append(float(vt))
    acc, val, far = np.asarray(acc), np.asarray(val), np.asarray(far)
    return {
        "accuracy": float(np.mean(acc)), "accuracy_std": float(np.std(acc)),
        "val": float(np.mean(val)), "val_std": float(np.std(val)), "far": float(np.mean(far)),
        "fold_accuracies": acc, "fold_thresholds": np.asarray(thr),
        "fold_val": val, "fold_far": far, "fold_val_thresholds": np.asarray(vthr),
        "tpr": np.mean(np.stack(tprs), 0), "fpr": np.mean(np.stack(fprs), 0), "pairs": n,
    }


class PairEmbeddings(NamedTuple):
    embeddings: torch.Tensor  # (2N, D) float64 unit rows: normalize(f(img) + f(flip(img))) (f(img) without flip)
    xnorm: float  # mean L2 norm of the raw model outputs (of the images and, with flip, their mirrors)


@torch.no_grad()
def embed_pairs(model, images: torch.Tensor, batch_size: int = 128, flip: bool = True, bgr: bool = False,
                device=None, dtype: torch.dtype = torch.float32, autocast_dtype: torch.dtype | None = None
                ) -> PairEmbeddings:
    """Embed a verification set with `model` (any module mapping (B, 3, H, W) to (B, D)), as their test()
    does: inputs to_model_input(images, bgr), the flip test (the embedding of each image plus that of its
    horizontal mirror, then normalized, in float64) and XNorm (the mean norm of all raw outputs, the mirrors'
    included). The model runs in eval mode (its mode is restored afterwards), in batches of batch_size on
    `device` (default: the model's), under autocast when autocast_dtype is given. Feed the result to
    evaluate_pairs(..., normalize=False)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        outs = []
        for flipped in ([False, True] if flip else [False]):
            rows = []
            for s in range(0, images.shape[0], batch_size):
                x = images[s:s + batch_size]
                x = x.flip(-1) if flipped else x  # the horizontal mirror (width is the last axis)
                x = to_model_input(x, bgr=bgr, dtype=dtype).to(device)
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    y = model(x)
                rows.append(y.float().cpu().double())  # their float64 buffer of the float32 outputs
            outs.append(torch.cat(rows))
    finally:
        model.train(was_training)
    raw = [o.numpy() for o in outs]
    # XNorm as theirs sums it: each row's norm sqrt(row . row) (np.linalg.norm of a vector) added one at a
    # time in a Python float, pass by pass, then divided by the count
    total_norm, count = 0.0, 0
    for r in raw:
        for row in r:
            total_norm += float(np.sqrt(row.dot(row)))
            count += 1
    xnorm = total_norm / count if count else math.nan
    total = raw[0] + raw[1] if flip else raw[0]
    return PairEmbeddings(torch.from_numpy(normalize_rows(total)), xnorm)
