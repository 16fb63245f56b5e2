"""Class-centre tools (l2sm_kernels.class_centers) on every backend of cosine_topk, against brute force
with the full C x C (or N x C K) cosine matrix in float64."""
import math

import pytest
import torch
import torch.nn.functional as F

from l2sm_kernels import class_centers as CC


def _weights(C, K, D, seed=0, dup=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C * K, D, generator=g)
    if dup is not None:  # class dup[1] duplicates class dup[0] (a duplicated identity), sub-center 0 of each
        w[dup[1] * K] = w[dup[0] * K] * 2.0
    return w


def _class_cos(w, K):
    wh = F.normalize(w.double(), dim=1)
    C = w.shape[0] // K
    return (wh @ wh.T).view(C, K, C, K).amax(dim=(1, 3))


@pytest.mark.parametrize("C,K", [(2, 1), (23, 1), (17, 2), (11, 3)])
def test_inter_class_similarity_is_brute_force(backend, device, C, K):
    w = _weights(C, K, 8, seed=C + K).to(device)
    got = CC.inter_class_similarity(w, K, query_block=5, backend=backend)
    full = _class_cos(w.cpu(), K)
    full.fill_diagonal_(-math.inf)
    want_v, want_i = full.max(dim=1)  # ties: the lower class (torch.max's first)
    assert torch.equal(got.nearest.cpu(), want_i)
    assert torch.allclose(got.max_cosine.cpu().double(), want_v, atol=1e-6)
    s = got.summary()
    assert s["classes"] == C and math.isclose(s["mean"], float(want_v.mean()), abs_tol=1e-6)
    counts, edges = got.histogram(bins=10)
    assert int(counts.sum()) == C and edges.shape == (11,)


def test_duplicated_identity_and_closest_pairs(backend, device):
    C, K = 19, 2
    w = _weights(C, K, 8, seed=3, dup=(4, 11)).to(device)
    sim = CC.inter_class_similarity(w, K, backend=backend)
    assert int(sim.nearest[4]) == 11 and int(sim.nearest[11]) == 4
    assert float(sim.max_cosine[4]) == pytest.approx(1.0, abs=1e-6)
    pairs = CC.closest_class_pairs(w, n=6, subcenters=K, query_block=7, backend=backend)
    assert pairs[0][:2] == (4, 11)
    full = _class_cos(w.cpu(), K)
    brute = sorted(((float(full[i, j]), i, j) for i in range(C) for j in range(i + 1, C)), key=lambda t: (-t[0], t[1:]))
    assert [(i, j) for i, j, _ in pairs] == [(i, j) for _, i, j in brute[:6]]
    assert all(math.isclose(v, bv, abs_tol=1e-6) for (_, _, v), (bv, _, _) in zip(pairs, brute))


def test_regularizer_value_and_gradient(backend, device):
    C, K = 13, 2
    w = _weights(C, K, 6, seed=5).to(device).requires_grad_(True)
    reg = CC.inter_class_regularizer(w, K, backend=backend)
    (g,) = torch.autograd.grad(reg, w)
    w64 = w.detach().cpu().double().requires_grad_(True)
    full = _class_cos(w64, K).clone()
    full = full - torch.diag(torch.full((C,), math.inf, dtype=torch.float64))
    want = full.max(dim=1).values.mean()
    (gw,) = torch.autograd.grad(want, w64)
    assert math.isclose(float(reg.detach()), float(want), abs_tol=1e-6)
    assert torch.allclose(g.cpu().double(), gw, atol=1e-5)


def test_subcenter_outliers_is_brute_force(backend, device):
    C, K, D = 7, 3, 5
    w = _weights(C, K, D, seed=6).to(device)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, D, generator=g).to(device)
    y = torch.randint(0, C, (40,), generator=g)
    y[5] = C  # an invalid label: no sub-center, no angle, never an outlier
    y = y.to(device)
    chunks = [(x[i:i + 9], y[i:i + 9]) for i in range(0, 40, 9)]
    got = CC.subcenter_outliers(chunks, w, K, max_angle=80.0, backend=backend)
    wh, xh = F.normalize(w.double().cpu(), dim=1), F.normalize(x.double().cpu(), dim=1)
    cos = (xh @ wh.T).view(40, C, K)
    yc = y.cpu()
    valid = yc < C
    own = cos[torch.arange(40), yc.clamp_max(C - 1)]
    sub = own.argmax(dim=1)
    assert torch.equal(got.subcenter.cpu()[valid], sub[valid]) and int(got.subcenter[5]) == -1
    counts = torch.zeros(C, K, dtype=torch.long)
    for i in range(40):
        if valid[i]:
            counts[yc[i], sub[i]] += 1
    assert torch.equal(got.counts.cpu(), counts)
    dom = counts.argmax(dim=1)
    angle = torch.rad2deg(torch.acos(own[torch.arange(40), dom[yc.clamp_max(C - 1)]].clamp(-1, 1)))
    assert torch.allclose(got.angle.cpu().double()[valid], angle[valid], atol=1e-3)
    assert math.isnan(float(got.angle[5])) and not bool(got.outlier[5])
    assert torch.equal(got.outlier.cpu(), valid & (angle > 80.0))
    assert bool(got.outlier.any()) and not bool(got.outlier.all())
    assert torch.equal(got.predicted.cpu(), cos.amax(dim=2).argmax(dim=1))


def test_bad_arguments():
    with pytest.raises(ValueError, match="not a multiple of subcenters=2"):
        CC.inter_class_similarity(torch.randn(5, 3), 2)
    with pytest.raises(ValueError, match="max_angle must be in"):
        CC.subcenter_outliers([], torch.randn(4, 3), 2, max_angle=200)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        CC.closest_class_pairs(torch.randn(4, 3), n=0)
