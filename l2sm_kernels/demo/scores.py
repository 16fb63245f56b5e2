"""Cosine scoring of embeddings: the consumers of an L2-softmax-trained network (docs/design.md, "The
application the seed describes"). Pure functions of tensors; the demo and its tests share them.

- verification: pairs of samples from classes never seen in training, scored by cosine similarity;
  ROC AUC of "same class" against "different class" (the face-verification setting).
- anomaly detection: test samples of held-out classes are the anomalies, test samples of the
  training classes the normal data. Two scores, higher = more anomalous:
  1 - max_j cos(x, W_j) (cosine to the class weights) and 1 - mean of the k largest cosines to the
  training embeddings (k-nearest neighbours).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a_i, b_j), (len(a), len(b)), in float32 (a zero row has cosine 0 to everything)."""
    return F.normalize(a.float(), dim=1) @ F.normalize(b.float(), dim=1).T


def verification_pairs(emb: torch.Tensor, labels: torch.Tensor):
    """Every unordered pair i < j: (cosine similarity, 1 if same class else 0), as numpy arrays."""
    sim = cosine_matrix(emb, emb)
    i, j = torch.triu_indices(len(emb), len(emb), offset=1)
    same = (labels[i] == labels[j]).long()
    return sim[i, j].cpu().numpy(), same.cpu().numpy()


def verification_auc(emb: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC of cosine similarity separating same-class pairs from different-class pairs."""
    score, same = verification_pairs(emb, labels)
    if same.min() == same.max():
        raise ValueError("verification needs both same-class and different-class pairs")
    return float(roc_auc_score(same, score))


def weight_anomaly_score(emb: torch.Tensor, class_weight: torch.Tensor) -> torch.Tensor:
    """1 - max_j cos(x, W_j): far from every known class direction = anomalous."""
    return 1.0 - cosine_matrix(emb, class_weight).max(dim=1).values


def knn_anomaly_score(emb: torch.Tensor, gallery: torch.Tensor, k: int = 5) -> torch.Tensor:
    """1 - mean of the k largest cosines to the gallery (the training embeddings of normal data)."""
    if not 1 <= k <= len(gallery):
        raise ValueError(f"k must be in [1, {len(gallery)}] (the gallery size), got {k}")
    return 1.0 - cosine_matrix(emb, gallery).topk(k, dim=1).values.mean(dim=1)


def anomaly_auc(score_normal: torch.Tensor, score_anomaly: torch.Tensor) -> float:
    """AUROC of anomaly scores (higher = more anomalous): anomalies are the positive class."""
    y = np.r_[np.zeros(len(score_normal)), np.ones(len(score_anomaly))]
    s = np.r_[score_normal.detach().cpu().numpy(), score_anomaly.detach().cpu().numpy()]
    return float(roc_auc_score(y, s))
