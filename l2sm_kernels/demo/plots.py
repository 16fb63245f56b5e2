"""The demo's figures (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .digits import METRIC_NAMES

_TITLES = {"softmax": "softmax", "l2-softmax": "L2-softmax"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_geometry(runs: dict, path: Path) -> Path:
    """The paper's figure: 2-D features of test images for both losses.

    runs: {loss: dict(features (N, 2) array of known-class test images, labels (N,) in 0..K-1,
    unknown (M, 2) array of held-out-class images, weight (K, 2), alpha (L2 only), accuracy,
    known_classes (digits))}. Panels: softmax features; L2-softmax features as the network emits
    them; L2-softmax alpha * x_hat, what its loss sees (on the circle of radius alpha, with radial
    jitter only so that points do not hide each other). Lines: class-weight directions.
    """
    plt = _plt()
    n_panels = 3 if "l2-softmax" in runs else len(runs)
    fig, axes = plt.subplots(1, n_panels, figsize=(5.2 * n_panels, 5.2))
    axes = np.atleast_1d(axes)
    tab10 = plt.get_cmap("tab10")
    palette = [tab10(i) for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)] + [plt.get_cmap("Dark2")(0)]  # no grey

    def cmap(k):
        return palette[k % len(palette)]
    panels = []
    if "softmax" in runs:
        panels.append(("softmax", "softmax: features", False))
    if "l2-softmax" in runs:
        panels += [("l2-softmax", "L2-softmax: features (network output)", False),
                   ("l2-softmax", r"L2-softmax: $\alpha\,\hat{x}$ (what the loss sees)", True)]
    rng = np.random.default_rng(0)
    for ax, (loss, title, on_sphere) in zip(axes, panels):
        r = runs[loss]
        f, u = np.asarray(r["features"], dtype=float), np.asarray(r["unknown"], dtype=float)
        if on_sphere:
            a = float(r["alpha"])
            f = a * f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
            u = a * u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
            f = f * (1 + 0.04 * rng.standard_normal((len(f), 1)))
            u = u * (1 + 0.04 * rng.standard_normal((len(u), 1)))
        ax.scatter(u[:, 0], u[:, 1], s=9, marker="x", c="0.45", lw=0.6, alpha=0.6, zorder=1,
                   label="held-out digits " + ", ".join(map(str, r.get("unknown_classes", ()))))
        for k, digit in enumerate(r["known_classes"]):
            sel = np.asarray(r["labels"]) == k
            ax.scatter(f[sel, 0], f[sel, 1], s=7, color=cmap(k), label=f"digit {digit}", zorder=2)
        lim = np.percentile(np.abs(np.r_[f, u]), 99.5) * 1.15
        w = np.asarray(r["weight"], dtype=float)
        for k, digit in enumerate(r["known_classes"]):  # class-weight directions
            d = w[k] / max(np.linalg.norm(w[k]), 1e-12) * lim
            ax.plot([0, d[0]], [0, d[1]], color=cmap(k), lw=1.2, alpha=0.8, zorder=3)
        if on_sphere:
            t = np.linspace(0, 2 * math.pi, 200)
            ax.plot(float(r["alpha"]) * np.cos(t), float(r["alpha"]) * np.sin(t), color="k", lw=0.5, zorder=0)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.axhline(0, color="0.85", lw=0.5, zorder=0)
        ax.axvline(0, color="0.85", lw=0.5, zorder=0)
        ax.set_title(f"{title}\ntest accuracy {r['accuracy']:.3f}", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, markerscale=1.8, frameon=False)
    fig.suptitle("2-D features of 8x8 digits test images (colours: training classes; x: held-out classes; "
                 "lines: class-weight directions)", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scores(raw: dict, metrics: dict, path: Path, title: str = "") -> Path:
    """Score distributions of one seed: rows = losses, columns = verification cosine (same vs
    different class, held-out classes), anomaly score by class weights and by kNN (training-class
    test images vs held-out-class images)."""
    plt = _plt()
    losses = list(raw)
    fig, axes = plt.subplots(len(losses), 3, figsize=(14, 3.3 * len(losses)), squeeze=False)
    cols = [
        ("verification_same", "verification_different", "same class", "different class",
         "cosine similarity of a pair", "verification_auc"),
        ("anomaly_weights_known", "anomaly_weights_unknown", "training classes", "held-out classes",
         "1 - max cosine to the class weights", "anomaly_auc_weights"),
        ("anomaly_knn_known", "anomaly_knn_unknown", "training classes", "held-out classes",
         "1 - mean cosine to the k nearest training embeddings", "anomaly_auc_knn"),
    ]
    for i, loss in enumerate(losses):
        for j, (ka, kb, la, lb, xlabel, metric) in enumerate(cols):
            ax = axes[i, j]
            a, b = np.asarray(raw[loss][ka]), np.asarray(raw[loss][kb])
            lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
            bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 50)
            ax.hist(a, bins=bins, density=True, alpha=0.55, color="tab:blue", label=la, histtype="stepfilled")
            ax.hist(b, bins=bins, density=True, alpha=0.55, color="tab:red", label=lb, histtype="stepfilled")
            ax.set_title(f"{_TITLES.get(loss, loss)}: {METRIC_NAMES[metric]} = {metrics[loss][metric]:.3f}",
                         fontsize=9)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
