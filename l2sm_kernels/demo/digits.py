"""Train a small embedding network on scikit-learn's bundled 8x8 digits (1797 images, shipped inside
the package: nothing is downloaded) with the L2-softmax loss through the library's op, and with plain
softmax, and measure what the embeddings are good for:

- closed-set accuracy on test images of the training classes;
- open-set verification: classes held out of training, all pairs of their test images, cosine
  similarity, ROC AUC (same vs different class), TAR at FAR 1e-2 and 1e-3, 10-fold accuracy;
- anomaly detection: held-out classes as anomalies, scored by cosine to the class weights and by
  k-nearest-neighbour cosine to the training embeddings, AUROC.

Every head sees the same network initialization, the same batches and the same augmentation for a
given seed; only the head differs: plain softmax (nn.Linear with bias and F.cross_entropy, no
normalization), L2-softmax (l2sm_kernels.L2SoftmaxLoss), and the margin heads of l2sm_kernels.heads
(CosFace, ArcFace, AdaFace) with their papers' margins at the same scale s = alpha, so that the
margin is the only difference from L2-softmax with normalized weights.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import l2sm_kernels as L

from . import scores

LOSSES = ("softmax", "l2-softmax", "cosface", "arcface", "adaface", "curricularface", "mv-softmax")
HEAD_NAMES = {"softmax": "softmax", "l2-softmax": "L2-softmax", "cosface": "CosFace (m 0.35)",
              "arcface": "ArcFace (m 0.5)", "adaface": "AdaFace (m 0.4)", "curricularface": "CurricularFace (m 0.5)",
              "mv-softmax": "MV-AM-Softmax (m 0.35, t 1.2)"}
METRICS = ("accuracy", "verification_auc", "verification_tar_far1e-2", "verification_tar_far1e-3",
           "verification_kfold_accuracy", "anomaly_auc_weights", "anomaly_auc_knn")
METRIC_NAMES = {
    "accuracy": "closed-set accuracy",
    "verification_auc": "open-set verification AUC",
    "verification_tar_far1e-2": "open-set verification TAR @ FAR 1e-2",
    "verification_tar_far1e-3": "open-set verification TAR @ FAR 1e-3",
    "verification_kfold_accuracy": "open-set verification 10-fold accuracy",
    "anomaly_auc_weights": "anomaly AUROC, cosine to class weights",
    "anomaly_auc_knn": "anomaly AUROC, kNN cosine",
}


@dataclass(frozen=True)
class DemoConfig:
    """Everything about one training run that is not the seed or the loss."""

    epochs: int = 40
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    embed_dim: int = 64
    holdout: int = 3  # digit classes held out of training (open set / anomalies)
    test_fraction: float = 0.3  # of each training class's images, kept for the closed-set test
    alpha: float | None = None  # None: alpha_for(num_known_classes)
    normalize_weight: bool = False
    margin_type: str = "none"
    margin: float = 0.0
    k: int = 5  # neighbours of the kNN anomaly score
    backend: str = "auto"
    heads: tuple = LOSSES  # which heads to train (softmax and l2-softmax always come first)

    def resolved_alpha(self, num_classes: int) -> float:
        return float(self.alpha) if self.alpha is not None else alpha_for(num_classes)


def alpha_for(num_classes: int) -> float:
    """The default radius: the paper's lower bound (Ranjan et al. 2017, eq. 5) for target-class
    probability p = 0.9, but not below 16, the value the paper trains with. At 7 classes the bound
    is only log(0.9 * 5 / 0.1) = 3.8, a radius at which softmax probabilities cannot approach 1 and
    every sample keeps a large gradient; 16 is the paper's choice for face identities (and what
    the bound gives at C = 1M)."""
    return max(L.alpha_lower_bound(num_classes), 16.0) if num_classes >= 3 else 16.0


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
@dataclass
class Split:
    """Images (N, 1, 8, 8) in [0, 1]. Training-class labels are remapped to 0..K-1; held-out
    ("unknown") images keep their digit as label."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_unknown: torch.Tensor
    y_unknown: torch.Tensor
    known_classes: tuple
    unknown_classes: tuple

    @property
    def num_known(self) -> int:
        return len(self.known_classes)

    def to(self, device) -> "Split":
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device)
                                            for f in dataclasses.fields(self) if f.name.startswith(("x_", "y_"))})


def load_split(seed: int, holdout: int = 3, test_fraction: float = 0.3) -> Split:
    """The digits with `holdout` classes (chosen by the seed) removed from training entirely."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 1 <= holdout <= 7:
        raise ValueError(f"holdout must be in [1, 7] (at least 3 training classes remain), got {holdout}")
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    rng = np.random.default_rng(seed)
    unknown = tuple(sorted(int(c) for c in rng.choice(10, size=holdout, replace=False)))
    known = tuple(c for c in range(10) if c not in unknown)
    is_known = torch.isin(y, torch.tensor(known))
    remap = torch.full((10,), -1, dtype=torch.long)
    remap[torch.tensor(known)] = torch.arange(len(known))
    idx = torch.nonzero(is_known).squeeze(1).numpy()
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=y[idx].numpy())
    tr, te = torch.as_tensor(np.sort(tr)), torch.as_tensor(np.sort(te))
    return Split(x[tr], remap[y[tr]], x[te], remap[y[te]], x[~is_known], y[~is_known], known, unknown)


def random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by -1, 0 or +1 pixel in each direction (zero fill): the only augmentation."""
    B, _, H, W = x.shape
    p = F.pad(x, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (B,), generator=gen).to(x.device)
    dx = torch.randint(0, 3, (B,), generator=gen).to(x.device)
    rows = (dy[:, None] + torch.arange(H, device=x.device))[:, :, None]
    cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, :]
    return p[torch.arange(B, device=x.device)[:, None, None], 0, rows, cols].unsqueeze(1)


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
class EmbeddingNet(nn.Module):
    """8x8 image -> embed_dim features (linear last layer: signed features, any norm)."""

    def __init__(self, embed_dim: int):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.body = nn.Sequential(
            *block(1, 32), *block(32, 32), nn.MaxPool2d(2),  # 4x4
            *block(32, 64), nn.MaxPool2d(2),  # 2x2
            nn.Flatten(), nn.Linear(64 * 4, 128), nn.BatchNorm1d(128), nn.ReLU(),
            nn.Linear(128, embed_dim),
        )

    def forward(self, x):
        return self.body(x)


class SoftmaxHead(nn.Module):
    """The plain softmax baseline: a linear classifier with bias, F.cross_entropy, no normalization."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    @property
    def weight(self):
        return self.linear.weight

    def forward(self, features, target):
        return F.cross_entropy(self.linear(features), target)

    def logits(self, features):
        return self.linear(features)


def make_head(loss: str, cfg: DemoConfig, num_classes: int, device) -> nn.Module:
    if loss == "softmax":
        return SoftmaxHead(cfg.embed_dim, num_classes).to(device)
    alpha = cfg.resolved_alpha(num_classes)
    if loss == "l2-softmax":
        return L.L2SoftmaxLoss(cfg.embed_dim, num_classes, alpha=alpha,
                               normalize_weight=cfg.normalize_weight, margin_type=cfg.margin_type,
                               margin=cfg.margin, backend=cfg.backend, device=device)
    heads = {"cosface": L.CosFaceLoss, "arcface": L.ArcFaceLoss, "adaface": L.AdaFaceLoss,
             "curricularface": L.CurricularFaceLoss, "mv-softmax": L.MVSoftmaxLoss}
    if loss in heads:  # the paper's margin at the demo's scale (s = alpha)
        return heads[loss](cfg.embed_dim, num_classes, s=alpha, backend=cfg.backend, device=device)
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


@torch.no_grad()
def predict_logits(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Test-time class scores: the plain head's logits; for L2-softmax alpha * x_hat . W_hat (the
    loss's logits without the training-only margin; argmax is the class with the largest cosine
    when normalize_weight)."""
    if isinstance(head, SoftmaxHead):
        return head.logits(features)
    w = F.normalize(head.weight, dim=1) if head.options.normalize_weight else head.weight
    return head.alpha * F.normalize(features, dim=1) @ w.T


@dataclass
class Trained:
    loss: str
    net: EmbeddingNet
    head: nn.Module
    epoch_losses: list


def train(loss: str, split: Split, cfg: DemoConfig, seed: int,
          on_epoch: Callable[[float], None] | None = None) -> Trained:
    """Train net + head from scratch. The seed fixes the initialization, the batch order and the
    augmentation, identically for both losses."""
    device = split.x_train.device
    torch.manual_seed(seed)
    net = EmbeddingNet(cfg.embed_dim).to(device)
    head = make_head(loss, cfg, split.num_known, device)
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(split.x_train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    # one-cycle schedule: warm-up then annealing, so that a few epochs already converge
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
             if cfg.epochs > 0 else None)
    gen = torch.Generator().manual_seed(seed)
    epoch_losses = []
    for _ in range(cfg.epochs):
        net.train()
        perm = torch.randperm(n, generator=gen).to(device)
        total = torch.zeros((), device=device)
        for s in range(steps_per_epoch):
            idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            x = random_shift(split.x_train[idx], gen)
            loss_value = head(net(x), split.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss_value.backward()
            opt.step()
            sched.step()
            total += loss_value.detach() * len(idx)
        epoch_losses.append(float(total) / n)
        if on_epoch is not None:
            on_epoch(epoch_losses[-1])
    net.eval()
    return Trained(loss, net, head, epoch_losses)


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def embed(net: nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    net.eval()
    return torch.cat([net(x[i:i + batch]) for i in range(0, len(x), batch)])


@torch.no_grad()
def evaluate(t: Trained, split: Split, k: int = 5) -> tuple[dict, dict]:
    """(metrics, raw scores for the plots). Every score is a cosine, so it ignores feature norms:
    for plain softmax, the norm its features carry is thrown away at test time; for L2-softmax,
    the norm was never part of the training signal."""
    f_train, f_test, f_unk = embed(t.net, split.x_train), embed(t.net, split.x_test), embed(t.net, split.x_unknown)
    acc = (predict_logits(t.head, f_test).argmax(1) == split.y_test).float().mean()
    ver_score, ver_same = scores.verification_pairs(f_unk, split.y_unknown)
    ver = scores.verification_metrics(ver_score, ver_same)
    w = t.head.weight.detach()
    aw_known, aw_unk = scores.weight_anomaly_score(f_test, w), scores.weight_anomaly_score(f_unk, w)
    ak_known, ak_unk = scores.knn_anomaly_score(f_test, f_train, k), scores.knn_anomaly_score(f_unk, f_train, k)

    metrics = {
        "accuracy": float(acc),
        "verification_auc": ver["auc"],
        "verification_tar_far1e-2": ver["tar@0.01"],
        "verification_tar_far1e-3": ver["tar@0.001"],
        "verification_kfold_accuracy": ver["kfold_accuracy"],
        "anomaly_auc_weights": scores.anomaly_auc(aw_known, aw_unk),
        "anomaly_auc_knn": scores.anomaly_auc(ak_known, ak_unk),
    }
    raw = {
        "verification_same": ver_score[ver_same == 1], "verification_different": ver_score[ver_same == 0],
        "anomaly_weights_known": aw_known.cpu().numpy(), "anomaly_weights_unknown": aw_unk.cpu().numpy(),
        "anomaly_knn_known": ak_known.cpu().numpy(), "anomaly_knn_unknown": ak_unk.cpu().numpy(),
        "train_feature_norm": f_train.norm(dim=1).cpu().numpy(),
    }
    return metrics, raw


def summarize(per_seed: dict) -> dict:
    """{loss: {metric: [value per seed]}} -> {loss: {metric: (mean, sample std)}} plus, for every head
    but softmax, the paired per-seed difference head - softmax ({"diff": {head: {metric: (mean, std,
    seeds where it is > 0, seeds)}}})."""
    out = {}
    for loss, ms in per_seed.items():
        out[loss] = {m: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0) for m, v in ms.items()}
    if "softmax" in per_seed:
        out["diff"] = {}
        for loss in per_seed:
            if loss == "softmax":
                continue
            out["diff"][loss] = {}
            for m in per_seed["softmax"]:
                d = np.asarray(per_seed[loss][m]) - np.asarray(per_seed["softmax"][m])
                out["diff"][loss][m] = (float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else 0.0,
                                        int((d > 0).sum()), len(d))
    return out
