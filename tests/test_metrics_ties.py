"""The metrics (l2sm_kernels.metrics) where small bugs hide: genuine and impostor pairs tied at one score
level (ROC points, AUC halves, TAR at FAR, the EER on a tie's segment, k-fold thresholds between
levels and "accept when score > t"), scores at exactly +-1 and beyond, the histogram's end bins and
edges (its metrics are the exact metrics of the scores moved to their bin's lower edge); and every
public score function of l2sm_kernels.scoring called with non-default arguments, on every backend,
against float64."""
import numpy as np
import pytest
import torch

import l2sm_kernels as L
from l2sm_kernels import metrics as M

sklearn_metrics = pytest.importorskip("sklearn.metrics")

G, I = True, False


# ---------------------------------------------------------------------------------------------
# tied genuine / impostor pairs, by hand and against scikit-learn
# ---------------------------------------------------------------------------------------------
def test_tied_levels_by_hand():
    # levels 0.9 (1 G), 0.7 (2 G, 1 I), 0.4 (1 G, 1 I), 0.1 (2 I); in a shuffled order
    s = np.array([0.7, 0.1, 0.4, 0.9, 0.7, 0.1, 0.4, 0.7])
    y = np.array([G, I, I, G, I, I, G, G])
    fpr, tpr, th = M.roc_curve(s, y)
    np.testing.assert_array_equal(fpr, [0, 0, 0.25, 0.5, 1])
    np.testing.assert_array_equal(tpr, [0, 0.25, 0.75, 1, 1])
    np.testing.assert_array_equal(th, [np.inf, 0.9, 0.7, 0.4, 0.1])
    # impostors x (genuine above + half the genuine at their level): 0 + 1 (1 + 1/2 2) + 1 (3 + 1/2) + 2 (4)
    assert M.roc_auc(s, y) == 13.5 / 16 == sklearn_metrics.roc_auc_score(y, s)
    assert M.tar_at_far(s, y, 0.0) == 0.25 and M.tar_at_far(s, y, 0.24) == 0.25
    assert M.tar_at_far(s, y, 0.25) == 0.75 and M.tar_at_far(s, y, 0.5) == 1.0
    assert M.eer(s, y) == 0.25  # the crossing is the ROC point (0.25, 0.75) itself
    # every pair at one level: the diagonal, AUC 1/2, EER 1/2, no TAR below FAR 1
    flat = np.full(6, 0.3), np.array([G, I, G, I, I, G])
    assert M.roc_auc(*flat) == 0.5 and M.eer(*flat) == 0.5
    assert M.tar_at_far(*flat, 0.99) == 0.0 and M.tar_at_far(*flat, 1.0) == 1.0


def test_eer_inside_a_tie_segment():
    # levels 0.9 (1 G), 0.5 (1 G, 2 I), 0.1 (1 I): ROC (0, 0) (0, 1/2) (2/3, 1) (1, 1); on the tie's
    # segment tpr = 1/2 + 3/4 fpr meets 1 - fpr at fpr = 2/7
    s = np.array([0.5, 0.9, 0.1, 0.5, 0.5])
    y = np.array([I, G, I, G, I])
    assert M.eer(s, y) == pytest.approx(2 / 7, abs=1e-15)
    h = M.ScoreHistogram(bins=10).update(torch.tensor(s), torch.tensor(y))
    assert h.eer() == pytest.approx(2 / 7, abs=1e-15)  # the same levels in distinct bins
    # 7 of the 10 bins are empty and add no ROC point: the curve of the three lower edges 0.8, 0.4, 0.0
    fpr, tpr, th = h.roc_curve()
    ef, et, eth = M.roc_curve(np.array([0.4, 0.8, 0.0, 0.4, 0.4]), y)
    np.testing.assert_array_equal(fpr, ef)
    np.testing.assert_array_equal(tpr, et)
    np.testing.assert_allclose(th, eth, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_heavy_ties_against_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(400) < 0.4
    s = np.round(rng.normal(0, 1, 400) + 0.8 * y)  # a handful of levels, each with both kinds
    fpr, tpr, th = M.roc_curve(s, y)
    rf, rt, rth = sklearn_metrics.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_array_equal(fpr, rf)
    np.testing.assert_array_equal(tpr, rt)
    assert np.array_equal(th[1:], rth[1:])
    assert M.roc_auc(s, y) == pytest.approx(sklearn_metrics.roc_auc_score(y, s), abs=1e-14)
    for far in (0.0, 0.05, 0.3, 0.6):
        assert M.tar_at_far(s, y, far) == rt[rf <= far].max()


def test_best_threshold_between_tied_levels():
    # increasing: 0.1 (I), 0.3 (2 G, 1 I), 0.8 (G): accept > 0.2 gets 4 of 5 (the tie cannot be split)
    assert M.best_threshold([0.3, 0.1, 0.8, 0.3, 0.3], [G, I, G, I, G]) == pytest.approx(0.2)
    # two best candidates (0.2 and 0.6, 3 of 4 each): the smaller
    assert M.best_threshold([0.1, 0.3, 0.5, 0.7], [I, G, I, G]) == pytest.approx(0.2)
    # all genuine above all impostors: the midpoint of the gap; all genuine: -inf; all impostor: +inf
    assert M.best_threshold([0.2, 0.9, 0.1], [I, G, I]) == pytest.approx(0.55)
    assert M.best_threshold([0.2, 0.9], [G, G]) == -np.inf and M.best_threshold([0.2, 0.9], [I, I]) == np.inf


def test_kfold_accepts_strictly_above_the_threshold():
    """Fold 1 is scored with fold 0's threshold 0.2 (between its levels 0.1 and 0.3), and two of fold 1's
    impostors score exactly 0.2: rejected (accept when score > t)."""
    s = np.array([0.1, 0.3, 0.1, 0.3, 0.2, 0.2, 0.5, 0.0])
    y = np.array([I, G, I, G, I, I, G, I])
    r = M.kfold_accuracy(s, y, folds=2)
    assert r.thresholds[1] == 0.2 and r.thresholds[0] == pytest.approx(0.35)
    np.testing.assert_array_equal(r.accuracies, [0.5, 1.0])
    assert r.mean == 0.75 and r.std == 0.25


def test_kfold_uneven_folds():
    """n = 23, 5 folds: sizes 5 5 5 4 4 (the first n % folds one longer, scikit-learn's KFold)."""
    assert [(sl.start, sl.stop) for sl in M.fold_slices(23, 5)] == [(0, 5), (5, 10), (10, 15), (15, 19), (19, 23)]
    rng = np.random.default_rng(3)
    y = rng.random(23) < 0.5
    y[:2] = [True, False]
    s = np.round(rng.normal(0, 1, 23) + y, 1)
    r = M.kfold_accuracy(s, y, folds=5)
    from sklearn.model_selection import KFold

    for (train, test), acc, t in zip(KFold(5).split(s), r.accuracies, r.thresholds):
        assert t == M.best_threshold(s[train], y[train])
        assert acc == np.mean((s[test] > t) == y[test])


# ---------------------------------------------------------------------------------------------
# scores at +-1 and beyond; the histogram's end bins and edges
# ---------------------------------------------------------------------------------------------
def test_scores_at_and_beyond_one():
    s = np.array([1.0, 1.0, -1.0, -1.0, 1.5, -2.0, 0.0, 1.0])
    y = np.array([G, I, I, G, G, I, I, G])
    assert M.roc_auc(s, y) == pytest.approx(sklearn_metrics.roc_auc_score(y, s), abs=1e-15)
    fpr, tpr, th = M.roc_curve(s, y)
    assert th.tolist() == [np.inf, 1.5, 1.0, 0.0, -1.0, -2.0]
    assert M.tar_at_far(s, y, 0.0) == 0.25  # only 1.5 is accepted without an impostor


def test_histogram_end_bins_and_edges():
    """4 bins over [-1, 1] (edges -1, -0.5, 0, 0.5): -1 and below in bin 0, 1 and above in bin 3, an
    edge value in the bin above it."""
    s = torch.tensor([-1.0, -2.0, -0.5, -0.5000001, 0.0, 0.4999999, 0.5, 1.0, 1.0, 7.0, -1.0, 0.25])
    y = torch.tensor([G, I, G, I, I, G, G, I, G, G, I, I])
    h = M.ScoreHistogram(bins=4).update(s, y)
    assert h.pos.tolist() == [1, 1, 1, 3] and h.neg.tolist() == [3, 0, 2, 1]
    fpr, tpr, th = h.roc_curve()
    assert th.tolist() == [np.inf, 0.5, 0.0, -0.5, -1.0]
    # the histogram's metrics are the exact metrics of the scores moved to their bin's lower edge
    edge = torch.tensor([-1.0, -1.0, -0.5, -1.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, -1.0, 0.0], dtype=torch.float64)
    ex = M.roc_curve(edge, y)
    for a, b in zip((fpr, tpr, th), ex):
        np.testing.assert_array_equal(a, b)
    assert h.roc_auc() == M.roc_auc(edge, y) and h.eer() == M.eer(edge, y)
    assert h.tar_at_far(0.4) == M.tar_at_far(edge, y, 0.4)
    # the bound: sum_b P_b N_b / (2 P N)
    assert h.auc_error_bound() == pytest.approx((1 * 3 + 0 + 1 * 2 + 3 * 1) / (2 * 6 * 6), abs=1e-15)


def test_histogram_other_range_and_chunks():
    """bins over [0, 2] (lo != -1): the same counts whether the pairs come in one chunk or many, and
    the metrics of the lower edges."""
    rng = np.random.default_rng(5)
    s = rng.uniform(-0.5, 2.5, 500)
    y = rng.random(500) < 0.4
    h1 = M.ScoreHistogram(bins=6, lo=0.0, hi=2.0).update(torch.tensor(s), torch.tensor(y))
    h2 = M.ScoreHistogram(bins=6, lo=0.0, hi=2.0)
    for a in range(0, 500, 37):
        h2.update(torch.tensor(s[a:a + 37]), torch.tensor(y[a:a + 37]))
    assert torch.equal(h1.pos, h2.pos) and torch.equal(h1.neg, h2.neg)
    b = np.clip(np.floor(s * 3.0), 0, 5)
    edge = b / 3.0
    np.testing.assert_array_equal(h1.pos.numpy(), np.bincount(b[y].astype(int), minlength=6))
    assert h1.roc_auc() == pytest.approx(M.roc_auc(edge, y), abs=1e-15)
    assert h1.tar_at_far(0.1) == M.tar_at_far(edge, y, 0.1)


# ---------------------------------------------------------------------------------------------
# the score functions with non-default arguments, against float64
# ---------------------------------------------------------------------------------------------
def _unit(v, eps):
    v = v.double().cpu()
    return v / v.norm(dim=1, keepdim=True).clamp_min(eps)


def _data(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(7, 6, generator=g) * torch.tensor([0.2, 0.5, 1, 2, 3, 0.1, 4.0])[:, None]  # norms around eps
    gal = torch.randn(40, 6, generator=g) * (0.1 + 3 * torch.rand(40, 1, generator=g))
    return q.to(device), gal.to(device)


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a.double().cpu(), b, rtol=0, atol=tol)


def _separated(s, k, largest=True):
    """The data decide the first k + 1 places by more than rounding can (indices are then compared
    exactly; ties are never broken on computed values)."""
    top = torch.sort(s, dim=1, descending=largest).values[:, : k + 1]
    assert float((top[:, 1:] - top[:, :-1]).abs().min()) > 1e-4


def test_cosine_topk_non_default_arguments(backend, device):
    """largest=False, normalize_gallery=False and eps = 1.5 (rows of norm below it are divided by 1.5)."""
    q, gal = _data(device)
    s = _unit(q, 1.5) @ gal.double().cpu().T
    v, i = L.cosine_topk(q, gal, 4, normalize_gallery=False, largest=False, eps=1.5, backend=backend)
    rv, ri = torch.sort(s, dim=1, stable=True)
    _separated(s, 4, largest=False)
    _close(v, rv[:, :4])
    assert torch.equal(i.cpu(), ri[:, :4])
    v, i = L.cosine_topk(q, gal, 3, eps=1.5, backend=backend)
    s = _unit(q, 1.5) @ _unit(gal, 1.5).T
    rv, ri = torch.sort(s, dim=1, descending=True, stable=True)
    _separated(s, 3)
    _close(v, rv[:, :3])
    assert torch.equal(i.cpu(), ri[:, :3])


def test_max_cosine_and_weight_anomaly_non_default(backend, device):
    q, W = _data(device, seed=1)
    W = W[:9]
    for nw in (False, True):
        s = _unit(q, 2.0) @ (_unit(W, 2.0) if nw else W.double().cpu()).T
        _separated(s, 1)
        v, i = L.max_cosine(q, W, normalize_weight=nw, eps=2.0, backend=backend)
        _close(v, s.max(1).values)
        assert torch.equal(i.cpu(), s.argmax(1))
        a = L.weight_anomaly_score(q, W, normalize_weight=nw, eps=2.0, backend=backend)
        _close(a, 1 - s.max(1).values)


def test_knn_scores_non_default(backend, device):
    q, gal = _data(device, seed=2)
    s = _unit(q, 0.7) @ _unit(gal, 0.7).T
    for k in (1, 3, 40):
        top = s.topk(k, dim=1).values
        _close(L.knn_cosine(q, gal, k=k, eps=0.7, backend=backend), top.mean(1))
        _close(L.knn_anomaly_score(q, gal, k, eps=0.7, backend=backend), 1 - top.mean(1))


def test_verification_non_default():
    """eps = 1.2, block_rows 1 and 4, a histogram of 16 bins: the pairs i < j in row-major order."""
    g = torch.Generator().manual_seed(3)
    e = torch.randn(11, 5, generator=g) * (0.3 + 2 * torch.rand(11, 1, generator=g))
    lab = torch.randint(0, 3, (11,), generator=g)
    i, j = torch.triu_indices(11, 11, offset=1)
    u = _unit(e, 1.2)
    want = (u[i] * u[j]).sum(1)
    for rows in (1, 4, None):
        chunks = list(L.verification_pair_chunks(e, lab, eps=1.2, block_rows=rows))
        if rows == 1:
            assert len(chunks) == 10 and [len(c[0]) for c in chunks] == list(range(10, 0, -1))
        s = torch.cat([c[0] for c in chunks])
        same = torch.cat([c[1] for c in chunks])
        _close(s, want)
        assert torch.equal(same, lab[i] == lab[j])
    s, same = L.verification_scores(e, lab, eps=1.2, block_rows=4)
    _close(s, want)
    h = L.verification_histogram(e, lab, bins=16, eps=1.2, block_rows=3)
    assert float(((want + 1) * 8 - ((want + 1) * 8).round()).abs().min()) > 1e-4  # no score at a bin edge
    b = ((want + 1) * 8).floor().clamp(0, 15).long()
    sw = lab[i] == lab[j]
    assert h.pos.tolist() == torch.bincount(b[sw], minlength=16).tolist()
    assert h.neg.tolist() == torch.bincount(b[~sw], minlength=16).tolist()
