"""The suite every backend runs (backend is a fixture, see conftest.py): each backend against the
float64 reference (l2sm_kernels.reference) by the accuracy relation (docs/conventions.md), for every option and
their combinations, plus the numbered cases of docs/reliability.md that the op boundary owns
("reliability case N" below).

Interpreted backends (triton without CUDA) get small shapes and a covering subset of the option
combinations (every pair of option values appears together at least once)."""
import itertools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import l2sm_kernels as L
from l2sm_kernels.backends import ops_for
from l2sm_kernels.testing.combinations import pairwise_cover
from l2sm_kernels.testing import assert_accurate, check_case, make_case, max_err, run, run_reference
from l2sm_kernels.testing.accuracy import confident_case, confident_exact

from conftest import is_slow, supports_fp64

MARGINS = [("none", 0.0), ("cosface", 0.35), ("arcface", 0.5)]
# the option matrix's margins: the three above and a combined margin with per-row (B,) m2 and m3
# (ElasticFace / AdaFace style; m2 = 0 on some rows, negative on one)
ROWS = "per-row"
OPTION_AXES = {
    "margin": MARGINS + [("combined", ROWS)],
    "subcenters": [1, 2],
    "normalize_weight": [False, True],
    "bias": [False, True],
    "label_smoothing": [0.0, 0.1],
    "ignore_rows": [0, 2],
    "reduction": ["mean", "sum", "none"],
    "alpha_grad": [False, True],
}


def _all_combos():
    keys = list(OPTION_AXES)
    return [dict(zip(keys, vals)) for vals in itertools.product(*OPTION_AXES.values())]


def _pairwise_combos():
    """Greedy all-pairs covering subset of _all_combos() (deterministic)."""
    return pairwise_cover(OPTION_AXES)


ALL_COMBOS = _all_combos()
PAIRWISE = {tuple(sorted((k, str(v)) for k, v in c.items())) for c in _pairwise_combos()}


def _combo_id(c):
    return "-".join([c["margin"][0], f"K{c['subcenters']}", "nw" if c["normalize_weight"] else "w",
                     "b" if c["bias"] else "nob",
                     f"ls{c['label_smoothing']}", f"ig{c['ignore_rows']}", c["reduction"],
                     "agrad" if c["alpha_grad"] else "afloat"])


def per_row_margins(B, device, seed=3):
    """(1, m2, m3) with (B,) float64 tensors: m2 in [0.1, 0.6] with zeros and one negative, m3 in [0, 0.3]."""
    g = torch.Generator().manual_seed(seed)
    m2 = 0.1 + 0.5 * torch.rand(B, generator=g, dtype=torch.float64)
    m2[::3] = 0.0
    m2[min(1, B - 1)] = -0.2
    m3 = 0.3 * torch.rand(B, generator=g, dtype=torch.float64)
    return 1.0, m2.to(device), m3.to(device)


def _case_from_combo(c, device, dtype=torch.float32, B=9, D=20, C=37, seed=0):
    mt, m = c["margin"]
    if m == ROWS:
        m = per_row_margins(B, device)
    return make_case(B, D, C, dtype=dtype, device=device, seed=seed, bias=c["bias"], alpha=16.0,
                     alpha_grad=c["alpha_grad"], ignore_rows=c["ignore_rows"], margin_type=mt, margin=m,
                     normalize_weight=c["normalize_weight"], label_smoothing=c["label_smoothing"],
                     reduction=c["reduction"], subcenters=c["subcenters"])


def _grad_output(case, seed=1):
    """A random upstream gradient for reduction none, a constant 3 otherwise ("not the last layer")."""
    if case.kwargs.get("reduction") == "none":
        g = torch.Generator().manual_seed(seed)
        return torch.randn(case.x.shape[0], generator=g).to(case.x.device)
    return torch.tensor(3.0, device=case.x.device)


# ---------------------------------------------------------------------------------------------
# every option and their combinations, fp32, against the float64 reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("combo", ALL_COMBOS, ids=_combo_id)
def test_options_match_reference(backend, device, combo):
    if is_slow(backend) and tuple(sorted((k, str(v)) for k, v in combo.items())) not in PAIRWISE:
        pytest.skip("interpreted backend: covered by the all-pairs subset")
    case = _case_from_combo(combo, device)
    check_case(case, backend, _grad_output(case))


@pytest.mark.parametrize("combo", ALL_COMBOS[::11], ids=_combo_id)
def test_options_float64_tight(backend, device, combo):
    """In float64 every backend that takes it agrees with the reference to ~1e-10 (no tolerance
    games: the relation's atol for float64 is 1e-10 x scale)."""
    if not supports_fp64(backend):
        pytest.skip(f"{backend} does not take float64")
    case = _case_from_combo(combo, device, dtype=torch.float64)
    check_case(case, backend, _grad_output(case))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("margin", MARGINS, ids=[m[0] for m in MARGINS])
def test_dtypes(backend, device, dtype, margin):
    case = make_case(16, 64, 53, dtype=dtype, device=device, seed=3, bias=True, alpha_grad=True,
                     margin_type=margin[0], margin=margin[1], normalize_weight=True, label_smoothing=0.05)
    check_case(case, backend, torch.tensor(1.0, device=device))


@pytest.mark.parametrize("xdt,wdt", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                     (torch.float32, torch.bfloat16)])
def test_mixed_dtypes(backend, device, xdt, wdt):
    """fp32 master weights with bf16 features (and the reverse): each gradient in its input's dtype."""
    case = make_case(12, 32, 41, dtype=xdt, wdtype=wdt, device=device, seed=4, bias=True)
    out, grads = run(case, backend)
    assert out.dtype == torch.float32
    assert grads["x"].dtype == xdt and grads["weight"].dtype == wdt and grads["bias"].dtype == wdt
    ref, rg = run_reference(case, True)
    plain, pg = run_reference(case, False)
    lowest = xdt if wdt == torch.float32 else wdt
    assert_accurate("loss", out, ref, plain, lowest)
    for k in grads:
        assert_accurate(f"grad {k}", grads[k], rg[k], pg[k], lowest)


# ---------------------------------------------------------------------------------------------
# shapes: ragged, tiny, empty (reliability cases 2, 3)
# ---------------------------------------------------------------------------------------------
SHAPES = [(3, 127, 1), (1, 1, 2), (3, 5, 2), (4, 16, 97), (5, 33, 257), (2, 8, 65537), (0, 8, 5), (7, 1, 13)]


@pytest.mark.parametrize("B,D,C", SHAPES, ids=[f"B{b}-D{d}-C{c}" for b, d, c in SHAPES])
def test_shapes(backend, device, B, D, C):
    if is_slow(backend) and C > 300:
        pytest.skip("interpreted backend: large C is covered on the GPU")
    case = make_case(B, D, C, device=device, seed=B + D + C, bias=True, alpha_grad=True,
                     margin_type="arcface", margin=0.3, label_smoothing=0.1, reduction="sum")
    check_case(case, backend, torch.tensor(1.0, device=device))


def test_empty_batch_mean_is_nan_with_zero_grads(backend, device):
    case = make_case(0, 8, 5, device=device, bias=True)
    out, grads = run(case, backend)
    assert torch.isnan(out)
    for k, g in grads.items():
        assert torch.count_nonzero(g) == 0, k


def test_all_ignored_mean_is_nan_with_zero_grads(backend, device):
    """Reliability case 5: NaN like torch, zero gradients, no crash."""
    case = make_case(6, 8, 5, device=device, bias=True, ignore_rows=6, alpha_grad=True)
    out, grads = run(case, backend)
    ref, _ = run_reference(case, True)
    assert torch.isnan(out) and torch.isnan(ref)
    for k, g in grads.items():
        assert torch.count_nonzero(g) == 0, k
    case.kwargs["reduction"] = "sum"
    out, grads = run(case, backend)
    assert out == 0


@pytest.mark.parametrize("ignore_index", [-100, 0, 3])
def test_ignore_index_values(backend, device, ignore_index):
    """ignore_index may itself be a valid class: those rows are ignored, the class still competes."""
    case = make_case(10, 12, 7, device=device, seed=5, ignore_index=ignore_index, reduction="none")
    case.target[::3] = ignore_index
    out, _ = run(case, backend)
    assert torch.all(out[case.target == ignore_index] == 0)
    check_case(case, backend, _grad_output(case))


# ---------------------------------------------------------------------------------------------
# targets out of range (reliability case 4)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-1, 7, 1000, -101])
def test_target_out_of_range_is_an_error(backend, device, bad):
    case = make_case(4, 8, 7, device=device)
    case.target[2] = bad
    with pytest.raises(ValueError, match=r"target\[2\] = .* outside \[0, 7\)"):
        run(case, backend)


def test_op_gives_nan_for_out_of_range_target(backend, device):
    """Called below the public API (no validation), the op never reads out of bounds and gives the
    offending row a NaN loss, never a plausible number; the other rows are unaffected."""
    case = make_case(4, 8, 7, device=device, grad=False)
    fwd, bwd = ops_for(backend)
    t = case.target.clone()
    t[1] = 7_000_000
    alpha = torch.tensor(16.0, device=device)
    opts = L.L2SMOptions().op_arguments(4, device)
    loss, lse, aux = fwd(case.x, case.weight, t, alpha, None, *opts, False, False, False, False)
    assert torch.isnan(loss[1])
    ref = L.l2_softmax_loss_ref(case.x, case.weight, case.target, reduction="none")
    keep = torch.tensor([0, 2, 3])
    assert max_err(loss[keep], ref[keep]) < 1e-4


# ---------------------------------------------------------------------------------------------
# numerics (reliability cases 6-12)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_zero_feature_row(backend, device, dtype):
    """Reliability cases 6, 7: finite loss, the gradient F.normalize gives (dL/dx_hat / eps), no NaN.
    That gradient is ~1e10 here: finite in fp32 and bf16; in fp16 it overflows to +-inf, the
    correctly rounded value, so there the zero rows are compared for sign only."""
    case = make_case(5, 16, 11, dtype=dtype, device=device, seed=6, normalize_weight=True)
    with torch.no_grad():
        case.x[1].zero_()
        case.weight[3].zero_()
    out, grads = run(case, backend)
    ref, rg = run_reference(case, True)
    plain, pg = run_reference(case, False)
    assert torch.isfinite(out)
    assert_accurate("loss", out, ref, plain, dtype)
    for k, g in grads.items():
        assert not torch.isnan(g).any(), k
        rows = torch.ones(g.shape[0], dtype=torch.bool)
        if dtype == torch.float16:
            z = {"x": 1, "weight": 3}[k]
            rows[z] = False
            assert torch.equal(torch.sign(g[z].double().cpu()), torch.sign(rg[k][z].cpu()))
        assert torch.isfinite(g[rows]).all(), k
        # plain torch NaNs on zero rows in half precision (pytorch #32137): the relation then
        # holds the backend to its atol alone
        assert_accurate(f"grad {k}", g[rows], rg[k][rows], pg[k][rows], dtype)


@pytest.mark.parametrize("scale", [1e-13, 5e-13, "eps", 2e-12, 1e-9, 1e-6])
def test_norm_near_eps(backend, device, scale):
    """Reliability case 8: both sides of max(|x|, eps) match the reference (eps = 1e-12), and a row whose
    norm is exactly eps (eps e_0: sqrt(fl(eps^2)) = eps) takes the |v| >= eps branch, as autograd
    through clamp_min does (the projection term is kept)."""
    dtype = torch.float64 if supports_fp64(backend) else torch.float32
    case = make_case(4, 8, 9, dtype=dtype, device=device, seed=7, normalize_weight=True)
    with torch.no_grad():
        for t, r in ((case.x, 0), (case.weight, 2)):
            if scale == "eps":
                t[r].zero_()
                t[r, 0] = 1e-12
            else:
                t[r] *= scale / t[r].norm()
    check_case(case, backend)


@pytest.mark.parametrize("which", ["features", "weight"])
def test_rows_of_huge_norm(backend, device, which):
    """Reliability case 31: rows of norm 1e30 (float32) on every backend, against float64 directly (plain
    torch's F.normalize overflows its float32 sum of squares too and gives such a row the uniform loss,
    which would excuse a broken backend under the accuracy relation). Features huge, or (with
    normalize_weight) weight rows huge: not both (|x| |W| must stay below float32's 3.4e38)."""
    case = make_case(6, 12, 9, device=device, seed=23, normalize_weight=True, margin_type="arcface", margin=0.3,
                     reduction="none")
    with torch.no_grad():
        t = case.x if which == "features" else case.weight
        t[::2] *= 1e30 / t[::2].double().norm(dim=1, keepdim=True).to(t.dtype)
        assert torch.isfinite(t).all() and float(t.double().norm(dim=1).max()) > 1e29
    out, grads = run(case, backend, torch.ones(6, device=device))
    ref, rgrads = run_reference(case, True, torch.ones(6, device=device))
    assert max_err(out, ref) <= 1e-5 * float(ref.abs().max()), (out, ref)
    for k in grads:  # the huge rows' gradients are ~1e-30: compare each row to its own scale
        g, r = grads[k].double().cpu(), rgrads[k].cpu()
        scale = r.abs().amax(dim=1, keepdim=True).clamp_min(1e-300) if r.dim() == 2 else r.abs().max()
        assert float(((g - r).abs() / scale).max()) <= 1e-4, k


@pytest.mark.parametrize("where", ["x", "weight", "bias", "alpha"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nan_inf_propagate(backend, device, where, value):
    """Reliability case 9: a NaN or inf input gives NaN (or inf), never a finite number."""
    case = make_case(4, 8, 9, device=device, seed=8, bias=True, alpha_grad=True, reduction="none", grad=False)
    with torch.no_grad():
        if where == "x":
            case.x[1, 3] = value
        elif where == "weight":
            case.weight[4, 0] = value
        elif where == "bias":
            case.bias[4] = value
        else:
            case.alpha.fill_(value)
    out, _ = run(case, backend)
    ref, _ = run_reference(case, True)
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref)), (out, ref)
    assert not torch.isfinite(out).all()


def test_neg_inf_bias(backend, device):
    """Reliability case 10: -inf bias on some classes: finite loss and gradients unless a target's own bias is -inf."""
    case = make_case(6, 8, 9, device=device, seed=9, bias=True, reduction="none")
    with torch.no_grad():
        case.bias[[1, 5]] = -math.inf
        case.target[:] = torch.tensor([0, 2, 3, 4, 6, 8])
    out, grads = run(case, backend, torch.ones(6, device=device))
    assert torch.isfinite(out).all()
    for g in grads.values():
        assert torch.isfinite(g).all()
    check_case(case, backend, torch.ones(6, device=device))
    case.target[0] = 5
    out, _ = run(case, backend, torch.ones(6, device=device))
    assert out[0] == math.inf and torch.isfinite(out[1:]).all()


@pytest.mark.parametrize("alpha", [64.0, 1e3])
def test_large_alpha_and_bias_offset(backend, device, alpha):
    """Reliability case 11: shift-invariant (a common bias offset changes nothing), no overflow."""
    case = make_case(8, 16, 23, device=device, seed=10, bias=True, alpha=alpha, normalize_weight=True)
    check_case(case, backend)
    out0, g0 = run(case, backend)
    with torch.no_grad():
        case.bias += 1e4
    out1, g1 = run(case, backend)
    assert torch.isfinite(out1)
    ref, rg = run_reference(case, True)
    plain, pg = run_reference(case, False)
    assert_accurate("loss", out1, ref, plain, torch.float32)


def test_confident_rows_bf16(backend, device):
    """Reliability case 12: p_target in [0.999, 0.99999] in bf16: the target column's gradient (p - 1,
    ~1e-4 here) stays accurate, which it does not if p is rounded to bf16 before subtracting 1."""
    case = make_case(8, 32, 29, dtype=torch.bfloat16, device=device, seed=11, alpha=16.0,
                     normalize_weight=True, reduction="none")
    with torch.no_grad():
        w_hat = torch.nn.functional.normalize(case.weight.float(), dim=1)
        noise = torch.randn(case.x.shape, generator=torch.Generator().manual_seed(11)).to(w_hat.device)
        case.x.copy_((w_hat[case.target] + 0.02 * noise).to(case.x.dtype))
    ref, _ = run_reference(case, True)
    assert ref.max() < 1e-3 and ref.min() > 1e-5  # every row confident, none saturated
    check_case(case, backend, torch.ones(8, device=device))


CONFIDENT_Q = [1e-7, 1e-8, 1e-9, 1e-10, 1e-11, 1e-12, 1e-13]
# largest relative error against float64 of each row's loss and of its target's db, per dtype
CONFIDENT_RTOL = {torch.float32: 1e-5, torch.float64: 1e-13}  # seen on cpu: 3.0e-6, 8.1e-15


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("margin_type,margin", [("none", 0.0), ("combined", (1.0, 0.2, 0.1))], ids=["plain", "combined"])
def test_confident_rows_absolute(backend, device, dtype, margin_type, margin):
    """An absolute accuracy claim of the cpu and triton backends (docs/design.md, "Confident rows"):
    rows with 1 - p_y from 1e-7 down to 1e-13: each row's loss (about 1 - p_y) and its target's
    gradient, seen through db of the row's own target class (no other row puts more than 1e-12 of
    that there: db_y = dz_yy = -(1 - p_y)), within CONFIDENT_RTOL relative of float64 computed without
    cancellation (_confident_exact). fp32: the inputs' cosines carry ~1e-7 relative rounding, 64
    times that in the logit differences, about 4e-6 in 1 - p_y. The forward keeps the target's logit
    apart from the non-target sum (loss = log1p(...), never lse - z_y), the backward takes 1 - p_y
    from the forward's aux (never p - 1). With lse - z_y in fp32 the loss was 0 below ~1e-7 (a
    relative error of 1), in fp64 1e-3 off at 1e-13; with p - 1 the fp32 target gradient was 0."""
    if backend == "eager":
        pytest.skip("eager is plain torch: it forms p - 1 and lse - z_y (held to the accuracy relation only)")
    if dtype == torch.float64 and not supports_fp64(backend):
        pytest.skip(f"{backend} does not take float64")
    x, W, t, alpha, kw = confident_case(dtype, margin_type, margin, CONFIDENT_Q)
    b = torch.zeros(W.shape[0], dtype=dtype, device=device, requires_grad=True)
    loss = L.l2_softmax_loss(x.to(device), W.to(device), t.to(device), alpha, b, backend=backend, **kw)
    (db,) = torch.autograd.grad(loss, [b], torch.ones_like(loss))
    loss, db = loss.cpu(), db.cpu()
    exact_loss, exact_db = confident_exact(x, W, t, alpha, kw)
    q = -torch.expm1(-exact_loss)
    assert torch.allclose(q, torch.tensor(CONFIDENT_Q, dtype=torch.float64), rtol=0.01), q  # the rows' 1 - p_y
    assert torch.allclose(exact_db, -q, rtol=1e-11)  # no other row's probability on the target class
    # the exact values are F.cross_entropy's where that is accurate (1 - p_y = 1e-7: 1e-9 relative)
    ref = L.l2_softmax_loss_ref(x.double(), W.double(), t, alpha, **kw)
    assert abs(float(ref[0] / exact_loss[0]) - 1) < 1e-8
    rel_loss = ((loss.detach().double() - exact_loss) / exact_loss).abs()
    rel_db = ((db[t].double() - exact_db) / exact_db).abs()
    tol = CONFIDENT_RTOL[dtype]
    assert float(rel_loss.max()) <= tol, rel_loss
    assert float(rel_db.max()) <= tol, rel_db


# ---------------------------------------------------------------------------------------------
# alpha (reliability case 13) and gradcheck
# ---------------------------------------------------------------------------------------------
GRADCHECK_COMBOS = [("none", 0.0, False, False, 0.0), ("cosface", 0.2, True, True, 0.1),
                    ("arcface", 0.5, True, True, 0.2), ("arcface", 0.3, False, True, 0.0)]


@pytest.mark.parametrize("mt,m,nw,bias,ls", GRADCHECK_COMBOS)
def test_gradcheck_float64(backend, device, mt, m, nw, bias, ls):
    if not supports_fp64(backend):
        pytest.skip(f"{backend} does not take float64 (gradcheck needs it)")
    case = make_case(5, 6, 7, dtype=torch.float64, device=device, seed=12, bias=bias, alpha=3.0,
                     alpha_grad=True, ignore_rows=1)
    leaves = [case.x, case.weight, case.alpha] + ([case.bias] if bias else [])

    def f(x, w, a, *b):
        return L.l2_softmax_loss(x, w, case.target, a, b[0] if b else None, margin_type=mt, margin=m,
                                 normalize_weight=nw, label_smoothing=ls, reduction="none", backend=backend)

    assert torch.autograd.gradcheck(f, leaves)


def test_alpha_rules(backend, device):
    case = make_case(3, 4, 5, device=device)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="alpha must be > 0"):
            L.l2_softmax_loss(case.x, case.weight, case.target, bad, backend=backend)
    with pytest.raises(ValueError, match="alpha must be a Python number or a 0-d tensor"):
        L.l2_softmax_loss(case.x, case.weight, case.target, torch.ones(2, device=device), backend=backend)
    # a tensor alpha is used as given, even <= 0 (no host sync to inspect it): the formula as written
    a = torch.tensor(-2.0, device=device, requires_grad=True)
    out = L.l2_softmax_loss(case.x, case.weight, case.target, a, backend=backend)
    ref = L.l2_softmax_loss_ref(case.x.detach(), case.weight.detach(), case.target, a.detach())
    assert max_err(out, ref) < 1e-5
    # NaN alpha (float) propagates rather than being rejected
    assert torch.isnan(L.l2_softmax_loss(case.x, case.weight, case.target, math.nan, backend=backend))
    # an infinite alpha (every logit infinite: NaN silently) and one beyond float32 (inf once converted) are
    # errors naming alpha; float64 inputs take 1e39 (it is representable there)
    with pytest.raises(ValueError, match="alpha must be finite"):
        L.l2_softmax_loss(case.x, case.weight, case.target, math.inf, backend=backend)
    with pytest.raises(ValueError, match=r"alpha = 1e\+39 overflows torch.float32"):
        L.l2_softmax_loss(case.x, case.weight, case.target, 1e39, backend=backend)
    with pytest.raises(ValueError, match=r"alpha = 1e\+39 overflows torch.float32"):
        L.L2SoftmaxLoss(4, 5, alpha=1e39, backend=backend)
    assert torch.isfinite(L.l2_softmax_loss(case.x, case.weight, case.target, 3e38, backend=backend))
    if supports_fp64(backend):
        out = L.l2_softmax_loss(case.x.double(), case.weight.double(), case.target, 1e39, backend=backend)
        ref = L.l2_softmax_loss_ref(case.x.detach(), case.weight.detach(), case.target, 1e39)
        assert torch.isfinite(out) and max_err(out, ref) <= 1e-10 * float(ref.abs())


# ---------------------------------------------------------------------------------------------
# layouts (reliability case 14), reductions and upstream gradients (16, 17)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["x_sliced", "x_transposed", "x_expanded", "w_transposed", "w_sliced"])
def test_non_contiguous(backend, device, layout):
    g = torch.Generator().manual_seed(13)
    B, D, C = 6, 10, 17
    x = torch.randn(B, D, generator=g)
    w = torch.randn(C, D, generator=g) * 0.1
    if layout == "x_sliced":
        x = torch.randn(B, 2 * D, generator=g)[:, ::2]
    elif layout == "x_transposed":
        x = torch.randn(D, B, generator=g).T
    elif layout == "x_expanded":
        x = torch.randn(1, D, generator=g).expand(B, D)
    elif layout == "w_transposed":
        w = (torch.randn(D, C, generator=g) * 0.1).T
    else:
        w = (torch.randn(C + 3, D + 2, generator=g) * 0.1)[2:-1, 1:-1]
    x, w = x.to(device).requires_grad_(), w.to(device).requires_grad_()
    assert not (x.is_contiguous() and w.is_contiguous())
    case = make_case(B, D, C, device=device, seed=14, normalize_weight=True, margin_type="cosface", margin=0.2)
    case.x, case.weight = x, w
    check_case(case, backend)


def test_batch_split_independence(backend, device):
    """Reliability case 16: the sum over a batch equals the sum over its halves (and so does dW)."""
    case = make_case(12, 16, 31, device=device, seed=15, bias=True, reduction="sum", normalize_weight=True)
    out, grads = run(case, backend)
    halves = [make_case(6, 16, 31, device=device, seed=15, bias=True, reduction="sum", normalize_weight=True)
              for _ in range(2)]
    for i, h in enumerate(halves):
        h.x = case.x.detach()[6 * i:6 * (i + 1)].clone().requires_grad_()
        h.target = case.target[6 * i:6 * (i + 1)]
        h.weight, h.bias = case.weight, case.bias
    parts = [run(h, backend) for h in halves]
    # fp32 rounding only: summation order differs, so compare relative to each tensor's scale
    assert max_err(out, parts[0][0] + parts[1][0]) <= 1e-5 * out.abs()
    dw = parts[0][1]["weight"] + parts[1][1]["weight"]
    assert max_err(grads["weight"], dw) <= 1e-5 * dw.abs().max()
    dx = torch.cat([parts[0][1]["x"], parts[1][1]["x"]])
    assert max_err(grads["x"], dx) <= 1e-5 * dx.abs().max()


def test_reduction_none_random_grad_and_scaled_loss(backend, device):
    """Reliability case 17: any upstream gradient: reduction none with random grad_output, loss * 3."""
    case = make_case(9, 12, 19, device=device, seed=16, bias=True, alpha_grad=True, reduction="none",
                     ignore_rows=2, label_smoothing=0.1, margin_type="arcface", margin=0.4)
    check_case(case, backend, _grad_output(case))
    case.kwargs["reduction"] = "mean"
    check_case(case, backend, torch.tensor(3.0, device=device))


# ---------------------------------------------------------------------------------------------
# what needs no gradient (18), retain_graph / double backward (19), inputs untouched (20),
# determinism (21)
# ---------------------------------------------------------------------------------------------
class _RecordNeeds(TorchDispatchMode):
    """Records the need_x, need_weight, need_bias, need_alpha flags of each l2sm op call."""

    def __init__(self):
        super().__init__()
        self.flags = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name().startswith("l2sm::"):
            self.flags.append((func.name().split("_")[-1], tuple(args[-4:])))
        return func(*args, **(kwargs or {}))


def test_frozen_inputs_and_no_grad(backend, device):
    """Reliability case 18: correct loss; no gradient work for what needs none."""
    case = make_case(6, 8, 11, device=device, seed=17, bias=True)
    x0, w0, b0 = case.x.detach(), case.weight.detach(), case.bias.detach()
    ref, _ = run_reference(case, True)
    with torch.no_grad(), _RecordNeeds() as rec:
        out = L.l2_softmax_loss(case.x, case.weight, case.target, bias=case.bias, backend=backend)
    assert out.grad_fn is None and max_err(out, ref) < 1e-5
    assert rec.flags == [("forward", (False, False, False, False))]
    for need, (x, w, b) in {
        (True, False, False, False): (x0.clone().requires_grad_(), w0, b0),   # W and b frozen
        (False, True, False, False): (x0, w0.clone().requires_grad_(), None),  # x frozen, no bias
        (False, False, True, False): (x0, w0, b0.clone().requires_grad_()),    # only the bias trains
    }.items():
        with _RecordNeeds() as rec:
            out = L.l2_softmax_loss(x, w, case.target, bias=b, backend=backend)
            out.backward()
        assert rec.flags == [("forward", need), ("backward", need)]
        ref_case = make_case(6, 8, 11, device=device, seed=17, bias=b is not None)
        _, rg = run_reference(ref_case, True)
        for t, k in ((x, "x"), (w, "weight"), (b, "bias")):
            if t is not None and t.requires_grad:
                assert max_err(t.grad, rg[k]) < 1e-5


@pytest.mark.parametrize("use_loss", [False, True])
def test_lse_is_differentiable(backend, device, use_loss):
    """The op's lse output has the gradient of logsumexp_j z_ij (what class-parallel training composes
    with), alone and together with the loss's, ignored rows included."""
    dtype = torch.float64 if supports_fp64(backend) else torch.float32
    case = make_case(7, 12, 23, dtype=dtype, device=device, seed=22, bias=True, alpha_grad=True, ignore_rows=2,
                     normalize_weight=True, margin_type="arcface", margin=0.3, label_smoothing=0.1)
    fwd, _ = ops_for(backend)
    g = torch.Generator().manual_seed(5)
    r_lse, r_loss = torch.randn(7, generator=g).to(device), torch.randn(7, generator=g).to(device)
    opts = L.L2SMOptions(normalize_weight=True, margin_type="arcface", margin=0.3,
                         label_smoothing=0.1).op_arguments(7, device)
    leaves = [case.x, case.weight, case.bias, case.alpha]
    loss, lse, _ = fwd(case.x, case.weight, case.target, case.alpha, case.bias, *opts, True, True, True, True)
    out = (lse * r_lse).sum() + ((loss * r_loss).sum() if use_loss else 0)
    grads = torch.autograd.grad(out, leaves)

    def ref_fn(upcast):
        c = make_case(7, 12, 23, dtype=dtype, device=device, seed=22, bias=True, alpha_grad=True, ignore_rows=2)
        leaves_r = [t.detach().to(torch.float64 if upcast else dtype).requires_grad_() for t in leaves]
        z = L.reference.l2_softmax_logits_ref(*leaves_r[:2], c.target, leaves_r[3], leaves_r[2],
                                              normalize_weight=True, margin=0.3, margin_type="arcface")
        out = (torch.logsumexp(z, 1) * r_lse.to(z)).sum()
        if use_loss:
            rows = torch.nn.functional.cross_entropy(z, c.target, reduction="none", label_smoothing=0.1)
            out = out + (rows * r_loss.to(z)).sum()
        return torch.autograd.grad(out, leaves_r)

    ref, plain = ref_fn(True), ref_fn(False)
    for name, a, r, p in zip(["x", "weight", "bias", "alpha"], grads, ref, plain):
        assert_accurate(f"grad {name}", a, r, p, dtype)


def test_backward_op_skips_unneeded_gradients(backend, device):
    """The backward op returns empty tensors for what is not needed (no work, no buffers)."""
    case = make_case(4, 8, 9, device=device, grad=False)
    fwd, bwd = ops_for(backend)
    alpha = torch.tensor(16.0, device=device)
    opts = L.L2SMOptions().op_arguments(4, device)
    needs = (True, False, False, False)
    loss, lse, aux = fwd(case.x, case.weight, case.target, alpha, None, *opts, *needs)
    gx, gw, gb, ga = bwd(torch.ones_like(loss), torch.zeros_like(lse), case.x, case.weight, case.target, alpha, None,
                         *opts[:3], lse, aux, *opts[3:], *needs)
    assert gx.shape == case.x.shape and gw.numel() == 0 and gb.numel() == 0 and ga.numel() == 0


def test_retain_graph_and_double_backward(backend, device):
    case = make_case(5, 8, 9, device=device, seed=18, bias=True)
    out = L.l2_softmax_loss(case.x, case.weight, case.target, bias=case.bias, backend=backend)
    g1 = torch.autograd.grad(out, [case.x, case.weight], retain_graph=True)
    g2 = torch.autograd.grad(out, [case.x, case.weight], retain_graph=True)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    gx, = torch.autograd.grad(out, [case.x], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        gx.sum().backward()


def test_inputs_untouched(backend, device):
    """Reliability case 20: bit-identical inputs after forward and backward."""
    case = make_case(7, 12, 13, device=device, seed=19, bias=True, alpha_grad=True, normalize_weight=True,
                     margin_type="arcface", margin=0.5, label_smoothing=0.1, ignore_rows=1)
    before = [t.detach().clone() for t in (case.x, case.weight, case.bias, case.alpha, case.target)]
    out = L.l2_softmax_loss(case.x, case.weight, case.target, case.alpha, case.bias, backend=backend,
                            **case.kwargs)
    out.backward()
    for b, t in zip(before, (case.x, case.weight, case.bias, case.alpha, case.target)):
        assert torch.equal(b, t.detach())


def test_deterministic(backend, device):
    """Reliability case 21: the same inputs twice give bitwise-identical loss and gradients."""
    case = make_case(16, 24, 67, device=device, seed=20, bias=True, alpha_grad=True)
    o1, g1 = run(case, backend)
    o2, g2 = run(case, backend)
    assert torch.equal(o1, o2)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


def test_opcheck(backend, device):
    """torch.library.opcheck on the backend's forward and backward ops."""
    if is_slow(backend):
        pytest.skip("opcheck's aot_dispatch test traces fake tensors, which the interpreter cannot run")
    dtype = torch.float64 if supports_fp64(backend) else torch.float32
    case = make_case(5, 8, 9, dtype=dtype, device=device, seed=21, bias=True, alpha_grad=True, grad=True)
    case.target[0] = -100
    fwd, bwd = ops_for(backend)
    margins = torch.rand(5, dtype=dtype, device=device) * 0.5  # per-row margins: the table has B rows
    neg = {} if is_slow(backend) or backend == "triton" else dict(negatives="curricular", negatives_t=0.3)
    opts = L.L2SMOptions(normalize_weight=True, margin_type="combined", margin=(1.0, margins, 0.1),
                         label_smoothing=0.1, **neg).op_arguments(5, device)
    for needs in [(True, True, True, True), (False, True, False, True), (False, False, False, False)]:
        torch.library.opcheck(fwd, (case.x, case.weight, case.target, case.alpha, case.bias, *opts, *needs))
        with torch.no_grad():
            loss, lse, aux = fwd(case.x, case.weight, case.target, case.alpha, case.bias, *opts, *needs)
        args = (torch.randn_like(loss), torch.randn_like(lse), case.x.detach(), case.weight.detach(), case.target,
                case.alpha.detach(), case.bias.detach(), *opts[:3], lse, aux, *opts[3:], *needs)
        torch.library.opcheck(bwd, args)


# ---------------------------------------------------------------------------------------------
# torch.compile (reliability case 23) and autocast (15)
# ---------------------------------------------------------------------------------------------
def test_compile_fullgraph(backend, device):
    if is_slow(backend):
        pytest.skip("torch.compile of an interpreted triton op fails in fake tracing; runs on the GPU")
    torch.manual_seed(0)
    head = L.L2SoftmaxLoss(16, 29, bias=True, learn_alpha=True, margin_type="arcface", margin=0.3,
                           backend=backend).to(device)
    net = torch.nn.Linear(8, 16).to(device)
    inp = torch.randn(12, 8, device=device)
    y = torch.randint(0, 29, (12,), device=device)

    def step(inp, y):
        return head(net(inp), y)

    compiled = torch.compile(step, fullgraph=True)
    l1 = compiled(inp, y)
    l1.backward()
    g1 = [p.grad.clone() for p in list(head.parameters()) + list(net.parameters())]
    for p in list(head.parameters()) + list(net.parameters()):
        p.grad = None
    l2 = step(inp, y)
    l2.backward()
    g2 = [p.grad for p in list(head.parameters()) + list(net.parameters())]
    assert max_err(l1, l2) < 1e-5
    for a, b in zip(g1, g2):
        assert max_err(a, b) < 1e-5


def test_autocast(backend, device):
    """Under autocast the features come in bf16 while the head's weight stays fp32."""
    torch.manual_seed(1)
    net = torch.nn.Linear(8, 16).to(device)
    head = L.L2SoftmaxLoss(16, 23, backend=backend).to(device)
    inp = torch.randn(10, 8, device=device)
    y = torch.randint(0, 23, (10,), device=device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        feats = net(inp)
        loss = head(feats, y)
    assert feats.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert head.weight.grad.dtype == torch.float32
    ref = L.l2_softmax_loss_ref(feats.detach(), head.weight.detach(), y)
    plain = L.l2_softmax_loss_ref(feats.detach(), head.weight.detach(), y, upcast=False)
    assert_accurate("loss", loss, ref, plain, torch.bfloat16)
