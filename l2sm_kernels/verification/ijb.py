"""IJB-B / IJB-C style template evaluation (InsightFace's eval_ijbc.py and ijb_1n.py protocols);
docs/verification.md.

- template_features: image features (already f(img) + f(flip), and optionally times the detector's
  faceness score, as theirs) -> one unit vector per template: the images of one media averaged, the media
  features of a template summed, the sum normalized (float64).
- pair_scores: the cosine of template pairs (1:1 verification).
- tar_at_far: TAR at each FAR in two conventions: "nearest" (theirs: sklearn's roc_curve with its default
  drop_intermediate=True, then the TPR of the ROC point whose FPR is nearest the target, the first of
  equal distances) and "at_most" (this library's l2sm_kernels.metrics.tar_at_far: the last point of the
  full ROC whose FPR is not above the target). Neither interpolates; "nearest" can read a point above the
  target FAR.
- identification: 1:N search of probe templates in a gallery with l2sm_kernels.cosine_topk (no probe x
  gallery matrix): top-k accuracy, and TPIR at FPIR as ijb_1n.py computes it (every probe's subject is in
  the gallery exactly once; the impostor scores are all non-mated probe-gallery scores; the threshold at
  FPIR f is the ceil(f P)-th largest of them; TPIR = the fraction of probes whose mated score is above it).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .. import metrics as M
from ..scoring import cosine_topk
from .protocols import _float64

__all__ = ["template_features", "pair_scores", "tar_at_far", "identification", "IJB_FARS"]

IJB_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # the columns of their TAR@FAR table


def _ints(v, name: str) -> np.ndarray:
    a = np.asarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D integer array, got dtype {a.dtype}, shape {a.shape}")
    return a.astype(np.int64)


def template_features(features, templates, medias, faceness=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(template ids (T,) int64 sorted, features (T, D) float64 unit rows) from per-image features (M, D),
    template ids (M,) and media ids (M,); faceness (M,) multiplies each image's feature first when given."""
    f = _float64(features, "features")
    t, m = _ints(templates, "templates"), _ints(medias, "medias")
    if f.ndim != 2 or len(t) != f.shape[0] or len(m) != f.shape[0]:
        raise ValueError(f"features (M, D), templates (M,) and medias (M,) must agree, got {f.shape}, {t.shape}, "
                         f"{m.shape}")
    if faceness is not None:
        s = _float64(faceness, "faceness")
        if s.shape != (f.shape[0],):
            raise ValueError(f"faceness must have shape ({f.shape[0]},), got {s.shape}")
        f = f * s[:, None]
    ids, t_idx = np.unique(t, return_inverse=True)
    # media average: the mean of each (template, media) group's image features
    keys = np.stack([t_idx, m], 1)
    groups, g_idx = np.unique(keys, axis=0, return_inverse=True)
    g_idx = g_idx.reshape(-1)
    media_sum = np.zeros((len(groups), f.shape[1]))
    np.add.at(media_sum, g_idx, f)
    media_mean = media_sum / np.bincount(g_idx, minlength=len(groups))[:, None]
    # template sum of its media features, then the unit vector (a zero sum stays zero)
    tf = np.zeros((len(ids), f.shape[1]))
    np.add.at(tf, groups[:, 0], media_mean)
    norms = np.sqrt(np.sum(tf ** 2, -1, keepdims=True))
    tf = np.divide(tf, norms, out=np.zeros_like(tf), where=norms > 0)
    return torch.from_numpy(ids), torch.from_numpy(tf)


def pair_scores(template_ids, template_feats, p1, p2) -> torch.Tensor:
    """Cosine scores (P,) float64 of the template pairs (p1[i], p2[i]) (template ids), from
    template_features' output."""
    ids = _ints(template_ids, "template_ids")
    f = _float64(template_feats, "template_feats")
    a, b = _ints(p1, "p1"), _ints(p2, "p2")
    ia, ib = np.searchsorted(ids, a), np.searchsorted(ids, b)
    for name, want, i in (("p1", a, ia), ("p2", b, ib)):
        bad = (i >= len(ids)) | (ids[np.minimum(i, len(ids) - 1)] != want)
        if bad.any():
            raise ValueError(f"{name} names template {int(want[bad][0])}, which has no feature")
    return torch.from_numpy(np.sum(f[ia] * f[ib], -1))


def _sklearn_roc(s: np.ndarray, y: np.ndarray):
    """sklearn.metrics.roc_curve(y, s) with its default drop_intermediate=True: the points where the curve
    turns (a point whose neighbours' steps equal its own in both counts is dropped), then (0, 0)."""
    lv = M._levels(s, y)
    tps, fps = np.cumsum(lv.pos), np.cumsum(lv.neg)
    if len(fps) > 2:
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        tps, fps = tps[keep], fps[keep]
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    return fps / fps[-1], tps / tps[-1]


def tar_at_far(scores, is_same, fars: Sequence[float] = IJB_FARS) -> dict:
    """{"nearest": (len(fars),) theirs, "at_most": (len(fars),) the library's} (module docstring)."""
    s, y = M._pairs(scores, is_same)
    fars = np.asarray(fars, dtype=np.float64)
    fpr, tpr = _sklearn_roc(s, y)
    nearest = np.array([tpr[int(np.argmin(np.abs(fpr - f)))] for f in fars])  # argmin: the first of equals
    return {"fars": fars, "nearest": nearest, "at_most": np.asarray(M.tar_at_far(s, y, fars))}


def identification(probe_feats, probe_ids, gallery_feats, gallery_ids, ks: Sequence[int] = (1, 5, 10),
                   fpirs: Sequence[float] = (0.01, 0.1), backend: str = "auto") -> dict:
    """1:N identification of probes (P, D) with subject ids (P,) in a gallery (G, D) with ids (G,), each
    probe's subject in the gallery exactly once (as ijb_1n.py requires). Scores are cosines from
    l2sm_kernels.cosine_topk (float64 here; ties to the lower gallery index).

    Returns {"top{k}": fraction of probes whose gallery entry is among the k best, "fpir": fpirs,
    "tpir": (len(fpirs),), "thresholds": the score threshold of each FPIR}."""
    q, g = _float64(probe_feats, "probe_feats"), _float64(gallery_feats, "gallery_feats")
    qi, gi = _ints(probe_ids, "probe_ids"), _ints(gallery_ids, "gallery_ids")
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1] or len(qi) != len(q) or len(gi) != len(g):
        raise ValueError(f"probe (P, D) / gallery (G, D) features and their ids must agree, got {q.shape}, "
                         f"{qi.shape}, {g.shape}, {gi.shape}")
    order = np.argsort(gi, kind="stable")
    sorted_ids = gi[order]
    if (np.diff(sorted_ids) == 0).any():
        raise ValueError("gallery_ids must be unique (one gallery template per subject)")
    pos = np.searchsorted(sorted_ids, qi)
    ok = (pos < len(gi)) & (sorted_ids[np.minimum(pos, len(gi) - 1)] == qi)
    if not ok.all():
        raise ValueError(f"probe subject {int(qi[~ok][0])} is not in the gallery")
    mate = order[pos]  # the gallery row of each probe's subject
    P, G = len(q), len(g)
    ks = [int(k) for k in ks]
    fpirs = np.asarray(fpirs, dtype=np.float64)
    need = [math.ceil(P * f) for f in fpirs]  # their required_topk: the rank of each threshold
    if max(need, default=0) > P * (G - 1):
        raise ValueError(f"fpir {fpirs.max()} needs {max(need)} impostor scores, there are {P * (G - 1)}")
    # the global m largest impostor scores lie among each probe's m + 1 largest scores (one is its mate)
    k_all = min(G, max(ks + [max(need, default=0) + 1]))
    qt, gt = torch.from_numpy(q), torch.from_numpy(g)
    vals, idx = cosine_topk(qt, gt, k_all, backend=backend)
    vals, idx = vals.numpy(), idx.numpy()
    hit = idx == mate[:, None]
    out = {f"top{k}": float(hit[:, :min(k, G)].any(1).mean()) for k in ks}
    mated = (qt / qt.norm(dim=1, keepdim=True).clamp_min(1e-12) *
             (gt[mate] / gt[mate].norm(dim=1, keepdim=True).clamp_min(1e-12))).sum(1).numpy()
    imp = np.sort(vals[~hit])[::-1]
    th = np.array([imp[m - 1] if m >= 1 else np.inf for m in need])
    out.update({"fpir": fpirs, "thresholds": th, "tpir": np.array([float(np.mean(mated > t)) for t in th])})
    return out
