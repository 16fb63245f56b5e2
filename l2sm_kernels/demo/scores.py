"""Cosine scoring of embeddings: the consumers of an L2-softmax-trained network (docs/design.md, "The
application the seed describes"). The scores and metrics are the library's (l2sm_kernels.scoring: the
fused cosine top-k and the pair scores; l2sm_kernels.metrics: ROC AUC, TAR @ FAR, k-fold accuracy); this
module names them for the demo and its tests.

- verification: pairs of samples from classes never seen in training, scored by cosine similarity;
  ROC AUC of "same class" against "different class", TAR at FAR 1e-2 and 1e-3 (the IJB convention) and
  the 10-fold accuracy (the LFW protocol) -- the face-verification setting.
- anomaly detection: test samples of held-out classes are the anomalies, test samples of the
  training classes the normal data. Two scores, higher = more anomalous:
  1 - max_j cos(x, W_j) (cosine to the class weights, cosine_topk with k = 1) and 1 - mean of the k
  largest cosines to the training embeddings (k-nearest neighbours, cosine_topk with k).
"""
from __future__ import annotations

import numpy as np
import torch

from .. import metrics
from ..scoring import knn_anomaly_score, verification_scores, weight_anomaly_score

__all__ = ["anomaly_auc", "knn_anomaly_score", "verification_auc", "verification_metrics", "verification_pairs",
           "weight_anomaly_score"]

FARS = (1e-2, 1e-3)  # the operating points the demo reports


def verification_pairs(emb: torch.Tensor, labels: torch.Tensor):
    """Every unordered pair i < j: (cosine similarity, 1 if same class else 0), as numpy arrays."""
    score, same = verification_scores(emb, labels)
    return score.cpu().numpy(), same.long().cpu().numpy()


def verification_metrics(score, same) -> dict:
    """ROC AUC, TAR at each of FARS, and the 10-fold accuracy of the pairs (l2sm_kernels.metrics)."""
    out = {"auc": metrics.roc_auc(score, same)}
    for far, tar in zip(FARS, metrics.tar_at_far(score, same, list(FARS))):
        out[f"tar@{far:g}"] = float(tar)
    out["kfold_accuracy"] = metrics.kfold_accuracy(score, same, folds=10).mean
    return out


def verification_auc(emb: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC of cosine similarity separating same-class pairs from different-class pairs."""
    return metrics.roc_auc(*verification_pairs(emb, labels))


def anomaly_auc(score_normal: torch.Tensor, score_anomaly: torch.Tensor) -> float:
    """AUROC of anomaly scores (higher = more anomalous): anomalies are the positive class."""
    y = np.r_[np.zeros(len(score_normal), dtype=bool), np.ones(len(score_anomaly), dtype=bool)]
    s = np.r_[score_normal.detach().cpu().double().numpy(), score_anomaly.detach().cpu().double().numpy()]
    return metrics.roc_auc(s, y)
