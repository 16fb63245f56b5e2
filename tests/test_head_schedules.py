"""The heads' margin schedules at their edges, on every backend (issue 18, part 3): every clamp and clip
of AdaFace, MagFace and ElasticFace reached from both sides, sub-centers K > 1 (with winners other than
sub-center 0), and target cosines past the switch point (arccos(c) + m2 >= pi: the monotonic fallback
c - m2 sin(m2) - m3), for those heads and for sub-center ArcFace / CosFace / combined margins.

Each case is checked against the paper's formula written out here in float64 (the schedule, the
sub-center maximum, the target logit with the fallback, the cross-entropy; autograd for the gradients)
by the accuracy relation (docs/conventions.md), the same formula in float32 being plain torch. Every case
first asserts that its inputs do reach the regions it names, so a case cannot silently drift inside the
clamps. (tests/test_heads.py checks the heads inside their clips; this file the edges.)"""
import math

import pytest
import torch
import torch.nn.functional as F

import l2sm_kernels as L
from l2sm_kernels.testing import assert_accurate

D, C = 8, 5


# ---------------------------------------------------------------------------------------------
# the formula, written out (float64 for the reference, float32 for plain torch)
# ---------------------------------------------------------------------------------------------
def class_cosine(x, W, K):
    """(B, C) class cosines: the largest over each class's K sub-centers (rows jK .. jK + K - 1)."""
    xh = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    wh = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = xh @ wh.T
    return cos.view(x.shape[0], -1, K).max(dim=2).values


def target_logit(c, m2, m3):
    """cos(theta + m2) - m3 while theta + m2 < pi (theta = arccos of c clamped to 1e-7 inside +-1), else
    InsightFace's monotonic fallback c - m2 sin(m2) - m3."""
    theta = torch.acos(c.clamp(-1 + 1e-7, 1 - 1e-7))
    return torch.where(theta + m2 < math.pi, torch.cos(theta + m2) - m3, c - m2 * torch.sin(m2) - m3)


def written_out(x, W, y, s, K, margins, extra=None):
    """Per-row loss: cross-entropy of s cos with the target column s f(c_y); margins(x) -> (m2, m3), (B,)
    tensors (functions of x for MagFace, constants otherwise); extra(x): a per-row term added."""
    cos = class_cosine(x, W, K)
    m2, m3 = (v.to(x.dtype) for v in margins(x))
    c_y = cos.gather(1, y[:, None])[:, 0]
    z = (s * cos).scatter(1, y[:, None], (s * target_logit(c_y, m2, m3))[:, None])
    rows = F.cross_entropy(z, y, reduction="none")
    return rows + extra(x) if extra is not None else rows


def check_head(head, x, y, margins, extra=None):
    """head(x, y) (reduction "none") and its gradients (x, weight) against written_out in float64, with
    the float32 written-out formula as plain torch."""
    g = torch.Generator().manual_seed(5)
    go = torch.randn(x.shape[0], generator=g, dtype=torch.float64)
    xs = x.clone().requires_grad_(True)
    out = head(xs, y)
    got = (out.detach(),) + torch.autograd.grad(out, [xs, head.weight], go.to(out))

    def formula(dt):
        xr = x.detach().to(dt).requires_grad_(True)
        wr = head.weight.detach().to(dt).requires_grad_(True)
        rows = written_out(xr, wr, y, head.s, head.options.subcenters, margins, extra)
        return (rows,) + torch.autograd.grad(rows, [xr, wr], go.to(dt))

    ref, plain = formula(torch.float64), formula(torch.float32)
    for name, a, r, p in zip(("loss", "grad x", "grad weight"), got, ref, plain):
        assert_accurate(name, a, r, p, torch.float32)


# ---------------------------------------------------------------------------------------------
# inputs that reach the regions
# ---------------------------------------------------------------------------------------------
def make_problem(K, kinds, norms, seed=0):
    """Class weights (C K, D): each class's sub-centers near one direction (so that a feature opposite
    to the class is opposite to all of them); features of the given kinds and norms:
    "aligned" near sub-center (i mod K) of its class (that sub-center wins), "opposite" near minus the
    class's direction (its class cosine near -1: past the switch for any m2 > 0.2), "weak" (cosine about
    0.33 to sub-center (i mod K), which wins), "random"."""
    g = torch.Generator().manual_seed(seed)
    B = len(kinds)
    d = F.normalize(torch.randn(C, D, generator=g, dtype=torch.float64), dim=1)
    W = d.repeat_interleave(K, 0) + 0.05 * torch.randn(C * K, D, generator=g, dtype=torch.float64)
    W = W * (0.5 + 1.5 * torch.rand(C * K, 1, generator=g, dtype=torch.float64))
    y = torch.randint(0, C, (B,), generator=g)
    wh = F.normalize(W, dim=1)
    x = torch.empty(B, D, dtype=torch.float64)
    for i, kind in enumerate(kinds):
        noise = torch.randn(D, generator=g, dtype=torch.float64)
        if kind == "aligned":
            x[i] = wh[y[i] * K + i % K] + 0.01 * noise
        elif kind == "opposite":
            x[i] = -d[y[i]] + 0.02 * noise
        elif kind == "weak":  # cosine about 0.33 to sub-center (i mod K), which wins: noise orthogonal to the class
            basis = torch.linalg.qr(wh[y[i] * K:(y[i] + 1) * K].T).Q
            perp = noise - basis @ (basis.T @ noise)
            x[i] = 0.35 * wh[y[i] * K + i % K] + perp / perp.norm()
        else:
            x[i] = noise
    x = F.normalize(x, dim=1) * torch.tensor(norms, dtype=torch.float64)[:, None]
    return x.float(), W.float(), y


def regions(x, W, y, K, m2):
    """Per row: class cosine of the target, whether it is past the switch (fallback), and the winning
    sub-center (float64)."""
    xh = F.normalize(x.double(), dim=1)
    cos = (xh @ F.normalize(W.double(), dim=1).T).view(x.shape[0], -1, K)
    c, win = cos[torch.arange(len(y)), y].max(dim=1)
    m2 = torch.as_tensor(m2, dtype=torch.float64).expand_as(c)
    angle = torch.acos(c.clamp(-1, 1)) + m2
    past = (angle >= math.pi) & (m2 > 0)
    # no row within rounding of the switch (float32 could take the other branch there)
    assert not bool((m2 > 0).any()) or float((angle - math.pi)[m2 > 0].abs().min()) > 1e-3
    return c, past, win


def _head(cls, K, backend, **kw):
    torch.manual_seed(0)
    return cls(D, C, subcenters=K, reduction="none", backend=backend, **kw)


KS = [1, 3]


# ---------------------------------------------------------------------------------------------
# AdaFace: the norm clip [0.001, 100] and the g clip [-1, 1]
# ---------------------------------------------------------------------------------------------
ADA_KINDS = ["opposite", "aligned", "opposite", "aligned", "random", "random", "opposite", "random"]


def ada_g(norms, mean, std, h=0.333, eps=1e-3):
    """AdaFace's g (Kim et al. 2022, eq. 7-8) from the moving averages."""
    return ((norms.clamp(0.001, 100.0) - mean) / (std + eps) * h).clamp(-1.0, 1.0)


@pytest.mark.parametrize("K", KS)
def test_adaface_g_clipped_on_both_sides(backend, device, K):
    """mean 20, std 5 (eval mode: no update): norms 1e-4 and 1e3 give h (n - mean) / std beyond -1 and +1,
    g = -1 (m2 = 0.4 > 0: opposite rows fall back) and g = +1 (m2 = -0.4 < 0: never past pi, and aligned
    rows with theta < 0.4 get cos(theta - 0.4)); 12 and 28 lie inside."""
    norms = [1e-4, 1e-4, 1e3, 1e3, 12.0, 20.0, 28.0, 31.0]
    x, W, y = make_problem(K, ADA_KINDS, norms, seed=1)
    head = _head(L.AdaFaceLoss, K, backend).to(device).eval()
    head.batch_mean.fill_(20.0)
    head.batch_std.fill_(5.0)
    with torch.no_grad():
        head.weight.copy_(W.to(device))
    g = ada_g(x.double().norm(dim=1), 20.0, 5.0)
    raw = (x.double().norm(dim=1) - 20.0) / 5.001 * 0.333
    assert (raw[:2] < -1).all() and (raw[2:4] > 1).all() and (raw[4:].abs() < 1).all()
    _, past, win = regions(x, W, y, K, -0.4 * g)
    assert past[0] and not past[2:4].any()  # g = -1: past pi; g = +1: m2 < 0, never
    if K > 1:
        assert set(win[[1, 3]].tolist()) != {0}  # winners other than sub-center 0
    m2, m3 = -0.4 * g, 0.4 + 0.4 * g
    check_head(head, x.to(device), y.to(device), lambda _: (m2.to(device), m3.to(device)))


@pytest.mark.parametrize("K", KS)
def test_adaface_norm_clipped_above(backend, device, K):
    """std 400: g stays inside [-1, 1], so a norm of 1e3 differs from the clip value 100 only through the
    norm clip (g 0.067 instead of 0.82)."""
    norms = [1e3, 1e3, 150.0, 60.0, 20.0, 0.5, 99.0, 1e4]
    kinds = ["aligned", "opposite", "random", "random", "aligned", "opposite", "random", "random"]
    x, W, y = make_problem(K, kinds, norms, seed=2)
    head = _head(L.AdaFaceLoss, K, backend).to(device).eval()
    head.batch_mean.fill_(20.0)
    head.batch_std.fill_(400.0)
    with torch.no_grad():
        head.weight.copy_(W.to(device))
    n = x.double().norm(dim=1)
    g = ada_g(n, 20.0, 400.0)
    assert (g.abs() < 1).all()
    assert ((n - 20.0) / 400.001 * 0.333 - g).abs()[[0, 1, 7]].min() > 0.1  # the clip changes g visibly
    m2, m3 = -0.4 * g, 0.4 + 0.4 * g
    regions(x, W, y, K, m2)
    check_head(head, x.to(device), y.to(device), lambda _: (m2.to(device), m3.to(device)))


def test_adaface_moving_averages_use_clipped_norms(backend, device):
    """Training mode: the batch mean and (unbiased) std that update the moving averages are of the
    clipped norms (a norm of 1e4 counts as 100); the margins use the updated averages; a batch of one
    row does not update them."""
    norms = [1e4, 3.0, 50.0, 1e-5, 20.0, 250.0]
    kinds = ["random", "opposite", "aligned", "opposite", "random", "aligned"]
    x, W, y = make_problem(2, kinds, norms, seed=3)
    head = _head(L.AdaFaceLoss, 2, backend).to(device)
    with torch.no_grad():
        head.weight.copy_(W.to(device))
    n = x.double().norm(dim=1).clamp(0.001, 100.0)
    mean = 0.99 * 20.0 + 0.01 * n.mean()
    std = 0.99 * 100.0 + 0.01 * n.std()
    g = ada_g(x.double().norm(dim=1), mean, std)
    m2, m3 = -0.4 * g, 0.4 + 0.4 * g
    regions(x, W, y, 2, m2)
    check_head(head, x.to(device), y.to(device), lambda _: (m2.to(device), m3.to(device)))
    assert float(head.batch_mean) == pytest.approx(float(mean), rel=1e-6)
    assert float(head.batch_std) == pytest.approx(float(std), rel=1e-6)
    before = (float(head.batch_mean), float(head.batch_std))
    head(x[:1].to(device), y[:1].to(device))
    assert (float(head.batch_mean), float(head.batch_std)) == before


# ---------------------------------------------------------------------------------------------
# MagFace: the magnitude clip [l_a, u_a], the margin's gradient on both branches
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("K", KS)
def test_magface_clips_and_fallback(backend, device, K):
    """Magnitudes below l_a = 10 (m = 0.45, no gradient through a), inside (the margin's and the
    regularizer's gradients reach |x|), above u_a = 110 (m = 0.8); opposite rows past the switch
    (-cos(m) >= -0.9), where dCE/dm is the fallback's -(sin m + m cos m), with a inside the clip."""
    norms = [4.0, 4.0, 40.0, 70.0, 100.0, 300.0, 300.0, 55.0, 60.0]
    kinds = ["opposite", "aligned", "opposite", "aligned", "aligned", "opposite", "aligned", "opposite", "weak"]
    x, W, y = make_problem(K, kinds, norms, seed=4)
    head = _head(L.MagFaceLoss, K, backend).to(device)
    with torch.no_grad():
        head.weight.copy_(W.to(device))

    def mag(xr):
        return xr.norm(dim=1).clamp(10.0, 110.0)

    def margins(xr):  # Meng et al. 2021, eq. 4 with the paper's l_a, u_a, l_m, u_m
        return (0.8 - 0.45) / (110.0 - 10.0) * (mag(xr) - 10.0) + 0.45, torch.zeros_like(xr[:, 0])

    def reg(xr):  # lambda_g g(a), g(a) = 1 / a + a / u_a^2
        a = mag(xr)
        return 35.0 * (1.0 / a + a / 110.0 ** 2)

    m = margins(x.double())[0]
    _, past, win = regions(x, W, y, K, m)
    assert past[[0, 2, 5, 7]].all() and not past[[1, 3, 4, 6, 8]].any()
    assert float(m[0]) == pytest.approx(0.45) and float(m[5]) == pytest.approx(0.8) and 0.45 < float(m[2]) < 0.8
    if K > 1:
        # rows inside the clip whose winner is not sub-center 0: an aligned one (p near 1: a small margin
        # gradient) and a weak one (p small: dCE/dm near -s df, df = -sin(theta + m) from the winner's cosine)
        assert win[4] != 0 and win[8] != 0, win
    check_head(head, x.to(device), y.to(device), margins, extra=reg)


# ---------------------------------------------------------------------------------------------
# ElasticFace: draws of either sign and past pi
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["arc", "cos"])
@pytest.mark.parametrize("K", KS)
def test_elasticface_wide_draws(backend, device, variant, K):
    """std = 0.8: the per-row margins include negative ones (arc: th = -inf, never past pi; cos: a
    negative additive margin) and ones above 1 (arc: the switch at -cos(m) > -0.55 reached by opposite
    and random rows), each drawn from the head's generator."""
    kinds = ["opposite", "aligned", "random", "opposite", "aligned", "random", "opposite", "random"]
    x, W, y = make_problem(K, kinds, [5.0, 9.0, 3.0, 7.0, 2.0, 6.0, 4.0, 8.0], seed=5)
    head = _head(L.ElasticFaceLoss, K, backend, variant=variant, std=0.8).to(device)
    with torch.no_grad():
        head.weight.copy_(W.to(device))
    mean = 0.5 if variant == "arc" else 0.35
    head.generator = torch.Generator(device=device).manual_seed(3)
    draws = torch.normal(mean, 0.8, (8,), generator=torch.Generator(device=device).manual_seed(3),
                         device=device).double().cpu()
    assert (draws < 0).any() and (draws > 1).any()
    zero = torch.zeros(8, dtype=torch.float64)
    m2, m3 = (draws, zero) if variant == "arc" else (zero, draws)
    if variant == "arc":
        _, past, _ = regions(x, W, y, K, m2)
        assert past.any() and (~past & (m2 > 0)).any()
    check_head(head, x.to(device), y.to(device), lambda _: (m2.to(device), m3.to(device)))


# ---------------------------------------------------------------------------------------------
# fixed margins with sub-centers, past pi
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kw,m2,m3", [("arcface", dict(m=0.5), 0.5, 0.0), ("cosface", dict(m=0.35), 0.0, 0.35),
                                           ("combined", dict(m2=0.3, m3=0.2), 0.3, 0.2),
                                           ("combined-wide", dict(m2=2.0, m3=0.1), 2.0, 0.1)])
@pytest.mark.parametrize("K", [2, 3])
def test_fixed_margins_subcenters_past_pi(backend, device, name, kw, m2, m3, K):
    """Sub-center ArcFace / CosFace / combined margins with K sub-centers, rows on both sides of the
    switch (m2 = 2.0: the switch at c = -cos(2) = 0.42, so random rows fall back and aligned ones not)."""
    cls = {"arcface": L.ArcFaceLoss, "cosface": L.CosFaceLoss}.get(name, L.CombinedMarginLoss)
    kinds = ["opposite", "aligned", "random", "aligned", "opposite", "random", "aligned", "random"]
    x, W, y = make_problem(K, kinds, [5.0] * 8, seed=6 + K)
    head = _head(cls, K, backend, **kw).to(device)
    with torch.no_grad():
        head.weight.copy_(W.to(device))
    _, past, win = regions(x, W, y, K, m2)
    if m2 > 0:
        assert past.any() and (~past).any()
    assert set(win[[1, 3, 6]].tolist()) != {0}
    B = x.shape[0]
    const = (torch.full((B,), float(m2), dtype=torch.float64), torch.full((B,), float(m3), dtype=torch.float64))
    check_head(head, x.to(device), y.to(device), lambda xr: tuple(v.to(xr) for v in const))
