"""The non-target transform (`negatives` = "none" | "mv" | "curricular" | "filter", `negatives_t`):
docs/design.md, "The non-target transforms"; docs/non_target_heads.md.

Every backend against the float64 reference (l2sm_kernels.reference.non_target_transform) by the
accuracy relation, with rows where no negative is hard, where all are, and at the boundary
c_ij == f_i made exact with representable inputs; the reference itself against the papers' formulas
written out element by element; float64 gradcheck where the backend takes float64; bad values."""
import math

import pytest
import torch

import l2sm_kernels as L
from l2sm_kernels.reference import l2_softmax_logits_ref
from l2sm_kernels.testing.combinations import pairwise_cover
from l2sm_kernels.testing import check_case, make_case

from conftest import is_slow, supports_fp64

KINDS = [("mv", 1.2), ("curricular", 0.4), ("filter", 0.05)]
MARGINS = [("none", 0.0), ("cosface", 0.35), ("arcface", 0.5)]


def _grad_output(case, seed=1):
    if case.kwargs.get("reduction") == "none":
        g = torch.Generator().manual_seed(seed)
        return torch.randn(case.x.shape[0], generator=g).to(case.x.device)
    return torch.tensor(3.0, device=case.x.device)


# ---------------------------------------------------------------------------------------------
# the reference against the papers' formulas, written out one entry at a time
# ---------------------------------------------------------------------------------------------
def _papers_logits(cos, target, alpha, kind, t, margin_type, m):
    """z (B x C) from the papers, one entry at a time, in float64.

    target: f = cos(theta_y + m) for ArcFace (CurricularFace's T(cos theta_y)), cos theta_y - m for
    CosFace (MV-AM-Softmax's f(m, theta_y)).
    MV-Softmax (Wang et al. 2020, eq. 6-7, fixed): I_k = 1 if cos theta_k > f(m, theta_y) (k != y),
        h(t, theta_k, I_k) = exp(s (t - 1)(cos theta_k + 1)) as a factor of exp(s cos theta_k), i.e. the
        logit s (t cos theta_k + t - 1).
    CurricularFace (Huang et al. 2020, eq. 7): N(t, cos theta_j) = cos theta_j if T(cos theta_y) >=
        cos theta_j, else cos theta_j (t + cos theta_j).
    InsightFace (arcface_torch losses.py, interclass_filtering_threshold): cos theta_j > t -> 0 (j != y).
    """
    B, C = cos.shape
    z = torch.empty_like(cos)
    for i in range(B):
        y = int(target[i])
        ct = float(cos[i, y])
        if margin_type == "arcface":
            f = math.cos(math.acos(ct) + m)
        elif margin_type == "cosface":
            f = ct - m
        else:
            f = ct
        for j in range(C):
            c = float(cos[i, j])
            if j == y:
                v = f
            elif kind == "mv":
                v = t * c + t - 1 if c > f else c
            elif kind == "curricular":
                v = c * (t + c) if f < c else c
            else:  # filter
                v = 0.0 if c > t else c
            z[i, j] = alpha * v
    return z


@pytest.mark.parametrize("kind,t", KINDS)
@pytest.mark.parametrize("margin_type,m", MARGINS)
def test_reference_is_the_papers_formula(kind, t, margin_type, m):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    w = torch.randn(11, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 11, (6,), generator=g)
    z = l2_softmax_logits_ref(x, w, y, 16.0, normalize_weight=True, margin_type=margin_type, margin=m,
                              negatives=kind, negatives_t=t)
    cos = torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(w).T
    want = _papers_logits(cos, y, 16.0, kind, t, margin_type, m)
    assert torch.allclose(z, want, rtol=0, atol=1e-12)
    # the transform changed something (the test data has hard negatives) and not everything
    plain = l2_softmax_logits_ref(x, w, y, 16.0, normalize_weight=True, margin_type=margin_type, margin=m)
    assert 0 < int((z != plain).sum()) < z.numel() - 6


# ---------------------------------------------------------------------------------------------
# every backend against the float64 reference: the option matrix's axes with each transform
# ---------------------------------------------------------------------------------------------
AXES = {
    "negatives": KINDS,
    "margin": MARGINS,
    "subcenters": [1, 2],
    "normalize_weight": [False, True],
    "bias": [False, True],
    "label_smoothing": [0.0, 0.1],
    "ignore_rows": [0, 2],
    "reduction": ["mean", "sum", "none"],
    "alpha_grad": [False, True],
}


PAIRWISE = pairwise_cover(AXES)  # greedy all-pairs covering subset (deterministic)


def _id(c):
    return "-".join([c["negatives"][0], c["margin"][0], f"K{c['subcenters']}", "nw" if c["normalize_weight"] else "w",
                     "b" if c["bias"] else "nob", f"ls{c['label_smoothing']}", f"ig{c['ignore_rows']}",
                     c["reduction"], "agrad" if c["alpha_grad"] else "afloat"])


def _case(c, device, dtype=torch.float32, B=9, D=20, C=37, seed=0, t_tensor=False):
    (kind, t), (mt, m) = c["negatives"], c["margin"]
    if t_tensor:
        t = torch.tensor(t, dtype=torch.float64)
    return make_case(B, D, C, dtype=dtype, device=device, seed=seed, bias=c["bias"], alpha=16.0,
                     alpha_grad=c["alpha_grad"], ignore_rows=c["ignore_rows"], margin_type=mt, margin=m,
                     normalize_weight=c["normalize_weight"], label_smoothing=c["label_smoothing"],
                     reduction=c["reduction"], subcenters=c["subcenters"], negatives=kind, negatives_t=t,
                     weight_scale=0.3)


@pytest.mark.parametrize("combo", PAIRWISE, ids=_id)
def test_matches_reference(backend, device, combo):
    case = _case(combo, device)
    check_case(case, backend, _grad_output(case))


@pytest.mark.parametrize("combo", PAIRWISE[::3], ids=_id)
def test_float64_tight(backend, device, combo):
    if not supports_fp64(backend):
        pytest.skip(f"{backend} does not take float64")
    case = _case(combo, device, dtype=torch.float64, t_tensor=True)
    check_case(case, backend, _grad_output(case))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,t", KINDS)
def test_half_dtypes(backend, device, dtype, kind, t):
    combo = dict(negatives=(kind, t), margin=("arcface", 0.5), subcenters=1, normalize_weight=True, bias=True,
                 label_smoothing=0.1, ignore_rows=1, reduction="none", alpha_grad=False)
    case = _case(combo, device, dtype=dtype, B=6, D=16, C=13)
    check_case(case, backend, _grad_output(case))


@pytest.mark.parametrize("kind,t", KINDS)
def test_t_as_a_tensor_equals_t_as_a_number(backend, device, kind, t):
    """A 0-d tensor t (a schedule: CurricularFace's running average) gives the number's result and
    gets no gradient; nothing is written into it."""
    combo = dict(negatives=(kind, t), margin=("cosface", 0.2), subcenters=1, normalize_weight=True, bias=False,
                 label_smoothing=0.0, ignore_rows=0, reduction="sum", alpha_grad=False)
    case = _case(combo, device, B=5, D=8, C=11)
    tt = torch.tensor(t, dtype=torch.float64, device=device, requires_grad=True)
    kw = dict(case.kwargs, negatives_t=t)
    a = L.l2_softmax_loss(case.x, case.weight, case.target, 16.0, backend=backend, **kw)
    kw["negatives_t"] = tt
    b = L.l2_softmax_loss(case.x, case.weight, case.target, 16.0, backend=backend, **kw)
    assert torch.allclose(a, b, rtol=1e-6, atol=0)
    b.backward()
    assert tt.grad is None and float(tt.detach()) == t


@pytest.mark.parametrize("kind,t", KINDS)
def test_lse_and_its_gradient_ignored_rows_included(backend, device, kind, t):
    """The op's lse (what the class-parallel loss composes) and its gradient: an ignored row has no
    target, so no hard column for mv / curricular and every column a negative for filter."""
    from l2sm_kernels.backends import ops_for
    from l2sm_kernels.testing import assert_accurate

    dtype = torch.float64 if supports_fp64(backend) else torch.float32
    B, D, C = 7, 12, 23
    case = make_case(B, D, C, dtype=dtype, device=device, seed=22, bias=True, ignore_rows=3, weight_scale=0.3)
    opts = L.L2SMOptions(normalize_weight=True, margin_type="cosface", margin=0.1, negatives=kind, negatives_t=t)
    g = torch.Generator().manual_seed(5)
    r_lse = torch.randn(B, generator=g).to(device)
    fwd, _ = ops_for(backend)
    leaves = [case.x, case.weight, case.bias]
    _, lse, _ = fwd(case.x, case.weight, case.target, torch.tensor(16.0, dtype=dtype, device=device), case.bias,
                    *opts.op_arguments(B, device), True, True, True, False)
    grads = torch.autograd.grad((lse * r_lse).sum(), leaves)

    def ref_fn(upcast):
        leaves_r = [v.detach().to(torch.float64 if upcast else dtype).requires_grad_() for v in leaves]
        z = l2_softmax_logits_ref(leaves_r[0], leaves_r[1], case.target, 16.0, leaves_r[2], normalize_weight=True,
                                  margin_type="cosface", margin=0.1, negatives=kind, negatives_t=t)
        out = torch.logsumexp(z, 1)
        return [out.detach()] + list(torch.autograd.grad((out * r_lse.to(z)).sum(), leaves_r))

    ref, plain = ref_fn(True), ref_fn(False)
    for name, a, r, p in zip(["lse", "x", "weight", "bias"], [lse.detach()] + list(grads), ref, plain):
        assert_accurate(name, a, r, p, dtype)


# ---------------------------------------------------------------------------------------------
# hard rows, easy rows and the boundary c_ij == f_i, with exactly representable cosines
# ---------------------------------------------------------------------------------------------
def _exact_case(device, dtype=torch.float32):
    """x_i = e_0 (|x_i| = 1: x_hat = x exactly), W_j = (a_j, b_j, 0, 0) unnormalized: c_ij = a_j exactly
    (dyadic values: every transform, t c + t - 1 and c (t + c), is exact in float32 too).
    CosFace m = 0.25, so f_i = a_{y_i} - 0.25:
      row 0: y = 0, f = 0.5: class 3 at exactly 0.5 (the boundary: not hard), class 4 at 0.5 + 2^-12
             (hard), class 8 at 0.5 - 2^-12 (not), classes 2, 7 hard
      row 1: y = 1, f = -0.75: every negative hard
      row 2: y = 2, f = 0.5: as row 0 with class 0 hard instead of class 2
      row 3: y = 7, f = 0.75: no negative hard (classes 0 and 2 at exactly 0.75: the boundary again)
      row 4: y = 4, f = 0.25 + 2^-12
    Filter at t = 0.5: classes 0, 2, 4, 7 (above 0.5) go on every row but their own; class 3 stays."""
    a = torch.tensor([0.75, -0.5, 0.75, 0.5, 0.5 + 2 ** -12, 0.25, -0.125, 1.0, 0.5 - 2 ** -12], dtype=torch.float64)
    C, D = a.numel(), 4
    w = torch.zeros(C, D, dtype=torch.float64)
    w[:, 0] = a
    w[:, 1] = torch.linspace(-0.5, 0.5, C, dtype=torch.float64)  # orthogonal to every x: no effect on c
    x = torch.zeros(5, D, dtype=torch.float64)
    x[:, 0] = 1.0
    x[:, 2] = 0.0
    y = torch.tensor([0, 1, 2, 7, 4])
    return x.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype), y.to(device), a


@pytest.mark.parametrize("kind,t", [("mv", 1.25), ("curricular", 0.5), ("filter", 0.5)])
def test_boundary_and_all_or_none_hard(backend, device, kind, t):
    """A backend that took c >= f (or c >= t) as hard, or skipped the mask, fails on rows 0, 2 and 3."""
    x, w, y, a = _exact_case(device)
    # the masks the contract asks for, from the exact cosines
    cos = a.expand(5, -1)
    f = a[y.cpu()] - 0.25
    thr = torch.full_like(f, t) if kind == "filter" else f
    hard = (cos > thr[:, None]) & (torch.arange(a.numel())[None, :] != y.cpu()[:, None])
    if kind != "filter":
        assert not bool(hard[0, 3]) and bool(hard[0, 4]) and not bool(hard[0, 8])
        assert int(hard[1].sum()) == a.numel() - 1
        assert not bool(hard[3].any())
    else:
        assert hard[:, [0, 2, 4, 7]].sum() == 4 * 5 - 4 and not bool(hard[:, 3].any())
    x.requires_grad_(True)
    w.requires_grad_(True)
    b = torch.zeros(w.shape[0], device=device, requires_grad=True)
    kw = dict(margin_type="cosface", margin=0.25, negatives=kind, negatives_t=t, reduction="none")
    g = torch.linspace(0.5, 1.5, x.shape[0], device=device)
    loss = L.l2_softmax_loss(x, w, y, 4.0, b, backend=backend, **kw)
    gx, gw, gb = torch.autograd.grad(loss, [x, w, b], g)
    x64, w64, b64 = (v.detach().double().requires_grad_(True) for v in (x, w, b))
    ref = L.l2_softmax_loss_ref(x64, w64, y, 4.0, b64, **kw)
    rx, rw, rb = torch.autograd.grad(ref, [x64, w64, b64], g.double())
    for name, u, v in (("loss", loss, ref), ("dx", gx, rx), ("dW", gw, rw), ("db", gb, rb)):
        assert torch.allclose(u.double(), v, rtol=1e-5, atol=1e-6), (name, u, v)
    # the reference's logits are the mask's: N(c) on the hard entries, c elsewhere, f on the target
    z = l2_softmax_logits_ref(x64.detach(), w64.detach(), y, 1.0, margin_type="cosface", margin=0.25,
                              negatives=kind, negatives_t=t).cpu()
    n = {"mv": t * cos + t - 1, "curricular": cos * (t + cos), "filter": torch.zeros_like(cos)}[kind]
    want = torch.where(hard, n, cos).scatter(1, y.cpu()[:, None], f[:, None])
    assert torch.equal(z, want)
    # the transform's slope on a hard entry (row 0, class 4): d loss_0 / d W_4 = alpha p_04 N'(c_04) e_0
    p = torch.softmax(4.0 * z, 1)
    slope = {"mv": t, "curricular": t + 2 * (0.5 + 2 ** -12), "filter": 0.0}[kind]
    g0 = torch.zeros(x.shape[0], device=device)
    g0[0] = 1.0
    gw0, = torch.autograd.grad(L.l2_softmax_loss(x, w, y, 4.0, b, backend=backend, **kw), [w], g0)
    assert math.isclose(float(gw0[4, 0]), 4.0 * float(p[0, 4]) * slope, rel_tol=1e-5, abs_tol=1e-7)


# ---------------------------------------------------------------------------------------------
# gradcheck (float64): the gradient is exact given the (constant) mask
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,t", KINDS)
@pytest.mark.parametrize("K", [1, 2])
def test_gradcheck_float64(backend, device, kind, t, K):
    if not supports_fp64(backend):
        pytest.skip(f"{backend} does not take float64 (gradcheck needs it)")
    case = make_case(5, 6, 7, dtype=torch.float64, device=device, seed=12, bias=True, alpha=3.0, alpha_grad=True,
                     ignore_rows=1, subcenters=K, weight_scale=0.4)
    leaves = [case.x, case.weight, case.alpha, case.bias]

    def f(x, w, a, b):
        return L.l2_softmax_loss(x, w, case.target, a, b, margin_type="arcface", margin=0.3, normalize_weight=True,
                                 label_smoothing=0.1, reduction="none", subcenters=K, negatives=kind, negatives_t=t,
                                 backend=backend)

    assert torch.autograd.gradcheck(f, leaves)


# ---------------------------------------------------------------------------------------------
# bad values: clear errors naming the argument, nothing run
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,err,match", [
    (dict(negatives="sphere"), ValueError, "negatives must be one of"),
    (dict(negatives="mv", negatives_t=0.9), ValueError, "negatives_t must be >= 1 for negatives='mv'"),
    (dict(negatives="mv", negatives_t=torch.ones(2)), ValueError, "negatives_t as a tensor must be a 0-d"),
    (dict(negatives="curricular", negatives_t=torch.tensor(1)), ValueError,
     "negatives_t as a tensor must be a 0-d floating"),
    (dict(negatives="curricular", negatives_t=math.inf), ValueError, "negatives_t must be finite"),
    (dict(negatives="curricular", negatives_t=math.nan), ValueError, "negatives_t must be finite"),
    (dict(negatives="filter", negatives_t=True), TypeError, "negatives_t must be a number"),
    (dict(negatives="filter", negatives_t="0.2"), TypeError, "negatives_t must be a number"),
    (dict(negatives="filter"), ValueError, "negatives='filter' needs negatives_t"),
    (dict(negatives_t=0.3), ValueError, "negatives_t=0.3 has no effect with negatives='none'"),
])
def test_bad_values(backend, device, kw, err, match):
    case = make_case(3, 4, 5, device=device)
    with pytest.raises(err, match=match):
        L.l2_softmax_loss(case.x, case.weight, case.target, backend=backend, **kw)
    with pytest.raises(err, match=match):
        L.L2SoftmaxLoss(4, 5, **kw)


def test_defaults_and_repr():
    assert L.L2SMOptions(negatives="mv").negatives_t == 1.2
    assert L.L2SMOptions(negatives="curricular").negatives_t == 0.0
    m = L.L2SoftmaxLoss(4, 5, negatives="filter", negatives_t=0.2)
    assert "negatives='filter', negatives_t=0.2" in repr(m)
    # a checkpoint made without the transform does not load into a head with it
    with pytest.raises(RuntimeError, match="negatives"):
        m.load_state_dict(L.L2SoftmaxLoss(4, 5).state_dict())
