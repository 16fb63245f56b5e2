"""l2sm_kernels.metrics against scikit-learn (roc_curve, roc_auc_score, KFold, accuracy_score), hand-built
cases for the IJB TAR@FAR convention and the EER, and the streaming histogram's AUC bound; and the scores of
l2sm_kernels.scoring built on cosine_topk."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import l2sm_kernels as L
from l2sm_kernels import metrics as M

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def _data(n=3000, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    s = rng.normal(0.0, 1.0, n) + 1.2 * y
    if ties:
        s = np.round(s * 4) / 4  # heavy ties
    return s, y


@pytest.mark.parametrize("ties", [False, True])
def test_roc_curve_and_auc_match_sklearn(ties):
    s, y = _data(ties=ties)
    fpr, tpr, th = M.roc_curve(s, y)
    rf, rt, rth = sklearn_metrics.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, rf, rtol=0, atol=1e-15)
    np.testing.assert_allclose(tpr, rt, rtol=0, atol=1e-15)
    assert th[0] == np.inf and np.array_equal(th[1:], rth[1:])
    assert M.roc_auc(s, y) == pytest.approx(sklearn_metrics.roc_auc_score(y, s), abs=1e-12)
    # torch inputs and numpy inputs agree
    assert M.roc_auc(torch.tensor(s), torch.tensor(y)) == M.roc_auc(s, y)


def test_tar_at_far_ijb_convention_by_hand():
    # 5 impostors, 4 genuine; scores decreasing: G I G G I I G I I
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    y = np.array([1, 0, 1, 1, 0, 0, 1, 0, 0], dtype=bool)
    # ROC points (fpr, tpr): (0,0) (0,.25) (.2,.25) (.2,.5) (.2,.75) (.4,.75) (.6,.75) (.6,1) (.8,1) (1,1)
    assert M.tar_at_far(s, y, 0.0) == 0.25  # largest FAR <= 0 is 0: the point (0, 0.25)
    assert M.tar_at_far(s, y, 0.1) == 0.25  # no point at FAR 0.1: the one at 0 (no interpolation)
    assert M.tar_at_far(s, y, 0.2) == 0.75  # FAR 0.2 exactly: the best TAR there
    assert M.tar_at_far(s, y, 0.59) == 0.75
    assert M.tar_at_far(s, y, 0.6) == 1.0
    np.testing.assert_array_equal(M.tar_at_far(s, y, [1e-3, 0.2, 1.0]), [0.25, 0.75, 1.0])
    with pytest.raises(ValueError, match="far must be in"):
        M.tar_at_far(s, y, 1.5)


def test_tar_at_far_against_sklearn_curve():
    s, y = _data(20000, seed=1)
    fpr, tpr, _ = sklearn_metrics.roc_curve(y, s, drop_intermediate=False)
    for far in (1e-3, 1e-2, 0.1):
        want = tpr[fpr <= far].max()  # the best TAR among points with FAR <= far
        assert M.tar_at_far(s, y, far) == want


def test_eer_by_hand_and_against_brentq():
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    y = np.array([1, 0, 1, 1, 0, 0, 1, 0, 0], dtype=bool)
    # fnr - fpr along the curve: ... (.2,.75): .25 - .2 = .05 > 0; (.4,.75): .25 - .4 < 0 -> between them
    # fpr = .2 + t .2 with .25 = .2 + t .2 -> t = .25, eer = .25
    assert M.eer(s, y) == pytest.approx(0.25, abs=1e-15)
    separable = np.array([3.0, 2.0, 1.0, 0.0]), np.array([1, 1, 0, 0], dtype=bool)
    assert M.eer(*separable) == 0.0
    from scipy.interpolate import interp1d
    from scipy.optimize import brentq

    s, y = _data(5000, seed=2)
    fpr, tpr, _ = sklearn_metrics.roc_curve(y, s)
    want = brentq(lambda x: 1.0 - x - interp1d(fpr, tpr)(x), 0.0, 1.0)
    assert M.eer(s, y) == pytest.approx(want, abs=1e-9)


def _kfold_bruteforce(s, y, folds):
    from sklearn.model_selection import KFold

    accs = []
    for train, test in KFold(n_splits=folds, shuffle=False).split(s):
        u = np.unique(s[train])
        cands = np.r_[-np.inf, (u[:-1] + u[1:]) / 2, np.inf]
        # accuracy_score's definition, vectorized over the candidates (sklearn itself per call is slow)
        tr = ((s[train][None, :] > cands[:, None]) == y[train][None, :]).mean(axis=1)
        assert sklearn_metrics.accuracy_score(y[train], s[train] > cands[1]) == tr[1]
        t = cands[int(np.argmax(tr))]
        accs.append(sklearn_metrics.accuracy_score(y[test], s[test] > t))
    return np.mean(accs), np.std(accs), np.asarray(accs)


@pytest.mark.parametrize("ties", [False, True])
def test_kfold_accuracy_matches_bruteforce_with_sklearn(ties):
    s, y = _data(1203, seed=3, ties=ties)
    r = M.kfold_accuracy(s, y, folds=10)
    mean, std, accs = _kfold_bruteforce(s, y, 10)
    np.testing.assert_allclose(r.accuracies, accs, rtol=0, atol=1e-15)
    assert r.mean == pytest.approx(mean, abs=1e-15) and r.std == pytest.approx(std, abs=1e-15)
    assert len(r.thresholds) == 10


def test_kfold_accuracy_constructed():
    # separable with a margin: every fold's threshold separates, accuracy 1 +- 0
    y = np.tile([True, False], 50)
    s = np.where(y, 0.8, 0.2) + np.linspace(0, 0.01, 100)
    r = M.kfold_accuracy(s, y)
    assert r.mean == 1.0 and r.std == 0.0 and ((r.thresholds > 0.21) & (r.thresholds < 0.8)).all()
    # one genuine pair scored like an impostor, in fold 0: only fold 0 loses one pair of its 10
    s2 = s.copy()
    s2[0] = 0.1
    r2 = M.kfold_accuracy(s2, y)
    assert r2.accuracies[0] == 0.9 and (r2.accuracies[1:] == 1.0).all()
    assert r2.mean == pytest.approx(0.99) and r2.std == pytest.approx(np.std([0.9] + [1.0] * 9))
    with pytest.raises(ValueError, match="folds must be an int >= 2"):
        M.kfold_accuracy(s, y, folds=1)


def test_input_errors():
    with pytest.raises(ValueError, match="both genuine"):
        M.roc_auc([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="NaN"):
        M.roc_auc([0.1, float("nan")], [True, False])
    # NaN and +-inf: the same clear error, naming the first position, from every exact metric (scikit-learn
    # refuses both); inf once made roc_auc depend on the input order and kfold_accuracy return NaN thresholds
    y = np.array([True, False, True, False, True, False, True, False, True, False, True, False])
    for bad, what in ((np.inf, "an infinite score"), (-np.inf, "an infinite score"), (np.nan, "NaN")):
        s = np.linspace(1.0, -1.0, 12)
        s[3] = bad
        for f in (M.roc_curve, M.roc_auc, M.eer, lambda s, y: M.tar_at_far(s, y, 0.1),
                  lambda s, y: M.kfold_accuracy(s, y, folds=3), M.best_threshold):
            with pytest.raises(ValueError, match=rf"scores contain {what} \(scores\[3\] = "):
                f(s, y)
            with pytest.raises(ValueError, match=rf"scores contain {what}"):
                f(torch.tensor(s, dtype=torch.float32), torch.tensor(y))
    # the levels are found by comparison: equal large scores are one level whatever their order
    a = M.roc_auc([1e308, 1e308, 0.1, 0.2], [1, 0, 1, 0])
    assert a == M.roc_auc([0.1, 1e308, 0.2, 1e308], [1, 0, 0, 1]) == 0.375
    # the streaming histogram counts +-inf exactly into its end bins (monotone), and refuses NaN
    h = M.ScoreHistogram(bins=8).update(torch.tensor([np.inf, 0.5, -np.inf, -0.5]), torch.tensor([1, 1, 0, 0]))
    assert h.roc_auc() == 1.0 and int(h.pos[-1]) == 1 and int(h.neg[0]) == 1
    with pytest.raises(ValueError, match="same length"):
        M.eer([0.1, 0.2, 0.3], [True, False])
    with pytest.raises(ValueError, match="1-D"):
        M.roc_curve(np.zeros((2, 2)), np.zeros((2, 2), dtype=bool))


def test_histogram_auc_within_its_bound_and_tar():
    s, y = _data(200000, seed=4)
    s = np.tanh(s / 3)  # into (-1, 1) like cosines
    h = M.ScoreHistogram(bins=256)
    for a in range(0, len(s), 30000):  # streamed in chunks
        h.update(torch.tensor(s[a:a + 30000], dtype=torch.float32), torch.tensor(y[a:a + 30000]))
    exact = sklearn_metrics.roc_auc_score(y, s.astype(np.float32))
    bound = h.auc_error_bound()
    assert abs(h.roc_auc() - exact) <= bound and 0 < bound < 0.01
    assert h.counts == (int(y.sum()), int((~y).sum()))
    # the default 2^16 bins: the bound shrinks with the bin width
    h2 = M.ScoreHistogram()
    h2.update(torch.tensor(s, dtype=torch.float32), torch.tensor(y))
    assert abs(h2.roc_auc() - exact) <= h2.auc_error_bound() < bound / 100
    # TAR at FAR: at bin edges; below the exact value by at most one bin's genuine fraction
    for far in (1e-3, 1e-2):
        t_exact = M.tar_at_far(s.astype(np.float32), y, far)
        assert t_exact - 0.01 <= h2.tar_at_far(far) <= t_exact + 1e-12
    assert h2.eer() == pytest.approx(M.eer(s.astype(np.float32), y), abs=1e-3)
    # a bin of identical scores: the bound is exactly the tie share
    h3 = M.ScoreHistogram(bins=4).update(torch.zeros(4), torch.tensor([True, False, True, False]))
    assert h3.roc_auc() == 0.5 and h3.auc_error_bound() == 0.5
    with pytest.raises(ValueError, match="NaN"):
        h3.update(torch.tensor([float("nan")]), torch.tensor([True]))
    with pytest.raises(ValueError, match="bins must be"):
        M.ScoreHistogram(bins=0)


# ---------------------------------------------------------------------------------------------
# scores built on cosine_topk (scoring.py)
# ---------------------------------------------------------------------------------------------
def _cos(a, b):
    return F.normalize(a.double(), dim=1) @ F.normalize(b.double(), dim=1).T


def test_max_cosine_and_anomaly_scores():
    torch.manual_seed(0)
    x, W = torch.randn(50, 16), torch.randn(9, 16) * 5
    v, i = L.max_cosine(x, W)
    c = _cos(x, W)
    for m in (c, F.normalize(x.double(), dim=1) @ W.double().T):  # no near-tie: argmax is the same on any BLAS
        top2 = m.topk(2, dim=1).values
        assert float((top2[:, 0] - top2[:, 1]).min()) > 1e-5
    assert torch.equal(i, c.argmax(1)) and torch.allclose(v.double(), c.max(1).values, atol=1e-6)
    torch.testing.assert_close(L.weight_anomaly_score(x, W), 1 - v)
    # normalize_weight=False: the raw product with the normalized features
    v2, i2 = L.max_cosine(x, W, normalize_weight=False)
    raw = F.normalize(x.double(), dim=1) @ W.double().T
    assert torch.equal(i2, raw.argmax(1))
    g = torch.randn(300, 16)
    kv = L.knn_cosine(x, g, k=5)
    assert torch.allclose(kv.double(), _cos(x, g).topk(5, dim=1).values.mean(1), atol=1e-6)
    torch.testing.assert_close(L.knn_anomaly_score(x, g, 5), 1 - kv)


@pytest.mark.parametrize("K", [2, 3])
def test_max_cosine_of_a_subcenter_head_returns_classes(backend, K):
    """Sub-center weights (C K rows, class j's rows [j K, (j + 1) K)): max_cosine and weight_anomaly_score
    with subcenters=K, or given the head, return classes and the class's best sub-center cosine, as the
    head's own (B, C) cosine has them; ties between classes to the lower class (exact inputs)."""
    from conftest import backend_device

    device = backend_device(backend)
    C, D = 7, 16
    torch.manual_seed(K)
    head = L.ArcFaceLoss(D, C, subcenters=K, backend=backend)
    x = torch.randn(40, D)
    full = head.cosine(x).double()  # (B, C): max over each class's sub-centers
    top2 = full.topk(2, dim=1).values
    assert float((top2[:, 0] - top2[:, 1]).min()) > 1e-5  # no near-tie: the same argmax on any BLAS
    for kw in (dict(weight=head.weight.detach().to(device), subcenters=K), dict(weight=head)):
        w = kw.pop("weight")
        v, i = L.max_cosine(x.to(device), w if isinstance(w, torch.Tensor) else head.to(device), backend=backend,
                            **kw)
        assert torch.equal(i.cpu(), full.argmax(1)) and int(i.max()) < C
        assert torch.allclose(v.cpu().double(), full.max(1).values, atol=1e-6)
        a = L.weight_anomaly_score(x.to(device), w if isinstance(w, torch.Tensor) else head, backend=backend, **kw)
        torch.testing.assert_close(a, 1 - v)
    # exact ties: class 1's second sub-center equals class 0's first: the lower class wins
    w = torch.zeros(C * K, D)
    w[:, 0] = -1.0
    w[0, 0], w[K + 1, 0] = 1.0, 1.0
    v, i = L.max_cosine(torch.eye(D)[:1].to(device), w.to(device), subcenters=K, backend=backend)
    assert i.tolist() == [0] and v.tolist() == [1.0]
    with pytest.raises(ValueError, match="not a multiple of subcenters=2"):
        L.max_cosine(x, torch.randn(7, D), subcenters=2)
    with pytest.raises(ValueError, match="subcenters must be an int >= 1"):
        L.max_cosine(x, torch.randn(7, D), subcenters=0)
    with pytest.raises(ValueError, match="contradicts the head's subcenters"):
        L.max_cosine(x, head, subcenters=K + 1)


def test_verification_pairs_in_chunks():
    torch.manual_seed(1)
    e, lab = torch.randn(41, 8), torch.randint(0, 5, (41,))
    s, same = L.verification_scores(e, lab)
    i, j = torch.triu_indices(41, 41, offset=1)
    assert torch.allclose(s.double(), _cos(e, e)[i, j], atol=1e-6) and torch.equal(same, lab[i] == lab[j])
    s2, same2 = L.verification_scores(e, lab, block_rows=3)  # same pairs, same order, other blocks
    assert torch.equal(same2, same) and torch.allclose(s2, s, atol=1e-6)
    h = L.verification_histogram(e, lab, bins=1 << 12, block_rows=7)
    assert h.counts == (int(same.sum()), int((~same).sum()))
    assert abs(h.roc_auc() - M.roc_auc(s, same)) <= h.auc_error_bound()
