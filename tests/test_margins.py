"""The margin family on every backend (backend is a fixture, conftest.py), against the float64
reference (l2sm_kernels.reference: arccos / cos from the definition, the switch compared as angles):
cosface, arcface, combined (m1 = 1), per-row margins (tensors), 0-d tensor margins (schedules),
sub-centers, and the "detached" margin gradient; then the edge cases a one-line bug in a margin hides
in: the monotonic fallback region, c = 1 exactly (the clamp), and one ulp on either side of the switch
point. The edge cases are held to absolute bounds against float64, not to plain torch's error (plain
torch flips sides at the switch point, which would excuse any backend)."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import l2sm_kernels as L
from l2sm_kernels.testing import check_case, make_case, max_err, run, run_reference

from conftest import is_slow, supports_fp64

pytestmark = pytest.mark.filterwarnings("ignore:l2sm_kernels. margin_type:UserWarning")


def _rows(B, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(B, generator=g, dtype=torch.float64)


def margin_cases(B):
    """(id, margin_type, margin) with per-row tensors sized for B rows (float64 CPU tensors; the tests
    move them to the device)."""
    m2 = _rows(B, 0.2, 0.6, 1)
    m2_mixed = m2.clone()
    m2_mixed[::3] = 0.0  # rows whose m2 is 0: exactly c - m3, no clamp
    if B > 1:
        m2_mixed[1] = -0.3  # a negative angular margin (AdaFace's high-quality rows)
    return [
        ("cosface", "cosface", 0.35),
        ("arcface", "arcface", 0.5),
        ("combined", "combined", (1.0, 0.3, 0.2)),
        ("cosface-rows", "cosface", _rows(B, 0.2, 0.5, 2)),
        ("arcface-rows", "arcface", m2),
        ("combined-rows", "combined", (1.0, m2_mixed, _rows(B, 0.0, 0.4, 3))),
        ("arcface-0d", "arcface", torch.tensor(0.45, dtype=torch.float64)),
    ]


CASE_IDS = [c[0] for c in margin_cases(4)]
SLOW_SUBSET = {"combined-rows", "arcface", "cosface-rows"}


def _to(margin, device, dtype=None):
    def one(v):
        return v.to(device=device, dtype=dtype or v.dtype) if isinstance(v, torch.Tensor) else v
    return tuple(one(v) for v in margin) if isinstance(margin, tuple) else one(margin)


def _case(device, case_id, *, B=9, D=20, C=37, dtype=torch.float32, K=1, margin_grad="exact", seed=0, **kw):
    (_, mt, m), = [c for c in margin_cases(B) if c[0] == case_id]
    return make_case(B, D, C, dtype=dtype, device=device, seed=seed, alpha=16.0, margin_type=mt,
                     margin=_to(m, device), subcenters=K, margin_grad=margin_grad, **kw)


def _grad_out(case):
    g = torch.Generator().manual_seed(7)
    return torch.randn(case.x.shape[0], generator=g).to(case.x.device)


# ---------------------------------------------------------------------------------------------
# every margin x gradient mode, fp32 and fp64, against the float64 reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("margin_grad", ["exact", "detached"])
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_margin_matches_reference(backend, device, case_id, margin_grad):
    if is_slow(backend) and (case_id not in SLOW_SUBSET or margin_grad == "detached" and case_id != "arcface"):
        pytest.skip("interpreted backend: a subset")
    case = _case(device, case_id, margin_grad=margin_grad, bias=True, alpha_grad=True, ignore_rows=2,
                 normalize_weight=True, label_smoothing=0.1, reduction="none")
    check_case(case, backend, _grad_out(case))


@pytest.mark.parametrize("case_id", ["arcface", "combined-rows", "cosface-rows"])
def test_margin_float64_tight(backend, device, case_id):
    if not supports_fp64(backend):
        pytest.skip(f"{backend} does not take float64")
    for margin_grad in ("exact", "detached"):
        case = _case(device, case_id, dtype=torch.float64, margin_grad=margin_grad, bias=True, alpha_grad=True,
                     ignore_rows=1, normalize_weight=True, label_smoothing=0.2, reduction="none")
        check_case(case, backend, _grad_out(case))


@pytest.mark.parametrize("case_id", ["arcface", "combined-rows"])
def test_margin_gradcheck_float64(backend, device, case_id):
    if not supports_fp64(backend):
        pytest.skip(f"{backend} does not take float64 (gradcheck needs it)")
    # (the "detached" mode is not the function's derivative by design: test_margin_matches_reference
    # checks it against autograd of the formula with the margin's difference detached)
    case = _case(device, case_id, B=5, D=6, C=7, dtype=torch.float64, bias=True, alpha_grad=True, ignore_rows=1,
                 K=2, normalize_weight=True, label_smoothing=0.1)
    kw = dict(case.kwargs, reduction="none", backend=backend)

    def f(x, w, a, b):
        return L.l2_softmax_loss(x, w, case.target, a, b, **kw)

    assert torch.autograd.gradcheck(f, [case.x, case.weight, case.alpha, case.bias])


def test_detached_differs_from_exact_only_in_the_gradient(backend, device):
    """The detached mode keeps the value and drops f'(c) (as InsightFace's no_grad margin): the loss is
    bit-identical to "exact", the features' gradient is not (the check above would pass a backend that
    ignores the flag only if the two modes agreed, which this rules out)."""
    exact = _case(device, "arcface", normalize_weight=True)
    detached = _case(device, "arcface", normalize_weight=True, margin_grad="detached")
    (o1, g1), (o2, g2) = run(exact, backend), run(detached, backend)
    assert torch.equal(o1, o2)
    assert max_err(g1["x"], g2["x"]) > 1e-3 * float(g1["x"].abs().max())


def test_combined_equals_arcface_and_cosface_bitwise(backend, device):
    """(1, m, 0) is "arcface" and (1, 0, m) is "cosface", bit for bit (they take the same path)."""
    base = make_case(9, 20, 37, device=device, seed=3, bias=True, alpha_grad=True, normalize_weight=True,
                     reduction="none")
    g = _grad_out(base)
    for named, combined in ((dict(margin_type="arcface", margin=0.5), dict(margin_type="combined", margin=(1, 0.5, 0))),
                            (dict(margin_type="cosface", margin=0.35), dict(margin_type="combined", margin=(1.0, 0, 0.35)))):
        base.kwargs.update(named)
        o1, g1 = run(base, backend, g)
        base.kwargs.update(combined)
        o2, g2 = run(base, backend, g)
        assert torch.equal(o1, o2)
        for k in g1:
            assert torch.equal(g1[k], g2[k]), k


def test_per_row_margin_equals_scalar_when_constant(backend, device):
    """A (B,) margin holding one value everywhere gives the scalar margin's result (same table values)."""
    case = make_case(9, 20, 37, device=device, seed=4, normalize_weight=True, margin_type="arcface", margin=0.4,
                     reduction="none")
    o1, g1 = run(case, backend)
    case.kwargs["margin"] = torch.full((9,), 0.4, dtype=torch.float64, device=device)
    o2, g2 = run(case, backend)
    assert torch.equal(o1, o2) and all(torch.equal(g1[k], g2[k]) for k in g1)


def test_margins_get_no_gradient_and_are_untouched(backend, device):
    m2 = _rows(9, 0.2, 0.5, 5).to(device).requires_grad_()
    before = m2.detach().clone()
    case = make_case(9, 20, 37, device=device, seed=5, normalize_weight=True, margin_type="combined",
                     margin=(1.0, m2, 0.1))
    loss = L.l2_softmax_loss(case.x, case.weight, case.target, backend=backend, **case.kwargs)
    loss.backward()
    assert m2.grad is None and torch.equal(m2.detach(), before)


# ---------------------------------------------------------------------------------------------
# sub-centers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("K,C", [(1, 13), (2, 13), (3, 7), (3, 29)])
def test_subcenters_match_reference(backend, device, K, C):
    if is_slow(backend) and (K, C) == (3, 29):
        pytest.skip("interpreted backend: a subset")
    case = _case(device, "combined-rows", C=C, K=K, bias=True, alpha_grad=True, ignore_rows=1,
                 normalize_weight=True, label_smoothing=0.1, reduction="none")
    check_case(case, backend, _grad_out(case))
    case = make_case(9, 20, C, device=device, seed=1, subcenters=K, normalize_weight=False, reduction="sum")
    check_case(case, backend, torch.tensor(1.0, device=device))


def test_subcenter_gradient_goes_to_the_winner_ties_to_the_lowest(backend, device):
    """Class j's gradient reaches only its winning sub-center; two identical sub-centers tie, and the
    lower row wins (the other gets exactly zero gradient)."""
    K, C, D = 3, 5, 8
    case = make_case(6, D, C, device=device, seed=6, subcenters=K, normalize_weight=True, margin_type="arcface",
                     margin=0.3)
    with torch.no_grad():
        w = case.weight.view(C, K, D)
        w[:, 2] = w[:, 0]  # sub-centers 0 and 2 tie for every class
    out, grads = run(case, backend)
    dw = grads["weight"].view(C, K, D)
    assert torch.count_nonzero(dw[:, 2]) == 0  # the tie went to sub-center 0
    ref, rg = run_reference(case, True)
    assert max_err(grads["weight"], rg["weight"]) <= 1e-4 * float(rg["weight"].abs().max())
    assert torch.count_nonzero(rg["weight"].view(C, K, D)[:, 2]) == 0


def test_subcenters_bad_weight_rows(device):
    x, t = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="not a multiple of subcenters=3"):
        L.l2_softmax_loss(x, torch.randn(10, 4), t, subcenters=3)
    with pytest.raises(ValueError, match="bias must have shape \\(3,\\)"):
        L.l2_softmax_loss(x, torch.randn(9, 4), t, bias=torch.randn(9), subcenters=3)


# ---------------------------------------------------------------------------------------------
# edges: the fallback region, c = 1 exactly, one ulp around the switch point
# ---------------------------------------------------------------------------------------------
ABS_TOL = {torch.float32: 2e-6, torch.float64: 1e-12}  # relative to the largest |reference| value


def _assert_close_abs(name, got, ref, dtype):
    scale = max(float(ref[torch.isfinite(ref)].abs().max()) if ref.numel() else 1.0, 1e-30)
    err = max_err(got, ref)
    assert err <= ABS_TOL[dtype] * scale * 10, f"{name}: error {err:.3e} against float64 (scale {scale:.3e})"


def _edge_dtypes(backend):
    return [torch.float32] + ([torch.float64] if supports_fp64(backend) else [])


@pytest.mark.parametrize("case_id", ["arcface", "combined", "arcface-rows", "combined-rows"])
def test_fallback_region(backend, device, case_id):
    """Targets whose cosine is below cos(pi - m2) (features close to -W_hat_y): the monotonic fallback
    c - m2 sin m2 - m3 (a one-line change to c - m2 would be an error of alpha m2 (1 - sin m2))."""
    for dtype in _edge_dtypes(backend):
        case = _case(device, case_id, dtype=dtype, B=6, D=12, C=9, normalize_weight=True, reduction="none")
        with torch.no_grad():
            w_hat = F.normalize(case.weight.double(), dim=1)
            noise = torch.randn(case.x.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
            case.x.copy_((-w_hat[case.target] + 0.01 * noise.to(w_hat.device)).to(dtype))
            c_t = (F.normalize(case.x.double(), dim=1) * w_hat[case.target]).sum(1)
        assert float(c_t.max()) < -0.95  # every target deep in the fallback region (cos(pi - 0.6) = -0.83)
        out, grads = run(case, backend, _grad_out(case))
        ref, rgrads = run_reference(case, True, _grad_out(case))
        _assert_close_abs("loss", out, ref, dtype)
        for k in grads:
            _assert_close_abs(f"grad {k}", grads[k], rgrads[k], dtype)


@pytest.mark.parametrize("margin_grad", ["exact", "detached"])
@pytest.mark.parametrize("case_id", ["arcface", "combined-rows"])
def test_no_fallback(backend, device, case_id, margin_grad):
    """margin_fallback=False (InsightFace's CombinedMarginLoss, l2sm_kernels.compat): cos(arccos c~ + m2)
    - m3 past pi too, on targets deep in the fallback region and on ordinary ones; the values there
    differ from the fallback's by several units, so a backend that ignored the option fails."""
    for dtype in _edge_dtypes(backend):
        case = _case(device, case_id, dtype=dtype, B=6, D=12, C=9, normalize_weight=True, reduction="none",
                     margin_grad=margin_grad, margin_fallback=False)
        with torch.no_grad():
            w_hat = F.normalize(case.weight.double(), dim=1)
            noise = torch.randn(case.x.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
            deep = (-w_hat[case.target] + 0.03 * noise.to(w_hat.device)).to(dtype)
            case.x[:4].copy_(deep[:4])  # rows 4, 5 keep their random (ordinary) features
            c_t = (F.normalize(case.x.double(), dim=1) * w_hat[case.target]).sum(1)
        assert float(c_t[:4].max()) < -0.9 and float(c_t[4:].min()) > -0.8  # deep; above the switch point
        out, grads = run(case, backend, _grad_out(case))
        ref, rgrads = run_reference(case, True, _grad_out(case))
        with_fallback = run_reference(dataclasses.replace(case, kwargs={**case.kwargs, "margin_fallback": True}),
                                      True, _grad_out(case))[0]
        assert float((with_fallback - ref)[:4].abs().max()) > 1.0  # (rows whose m2 > 0)
        _assert_close_abs("loss", out, ref, dtype)
        for k in grads:
            _assert_close_abs(f"grad {k}", grads[k], rgrads[k], dtype)


@pytest.mark.parametrize("D", [1, 16])
def test_target_cosine_exactly_one(backend, device, D):
    """x = W_hat_y (c = 1, or 1 - 1 ulp): the clamp keeps the angular margin's value and derivative
    finite (cos m + c~ sin m / sqrt(1 - c~^2) at c~ = 1 - 1e-7); without it the slope divides by 0.
    arcface, and a combined margin with per-row m2 (positive, 0: no clamp, negative) and m3."""
    rows = (1.0, torch.tensor([0.5, 0.3, 0.0, -0.2, 0.6], dtype=torch.float64, device=device),
            torch.tensor([0.0, 0.1, 0.2, 0.3, 0.0], dtype=torch.float64, device=device))
    for dtype, (mt, m) in [(dt, mm) for dt in _edge_dtypes(backend) for mm in (("arcface", 0.5), ("combined", rows))]:
        case = make_case(5, D, 6, dtype=dtype, device=device, seed=9, normalize_weight=True,
                         margin_type=mt, margin=m, alpha=4.0, reduction="none")
        with torch.no_grad():
            case.x.copy_(3.0 * case.weight[case.target])
        out, grads = run(case, backend, _grad_out(case))
        ref, rgrads = run_reference(case, True, _grad_out(case))
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values())
        # in float32 the clamp's 1 - 1e-7 is 1 - 2^-23: sqrt(1 - c~^2) moves by ~4e-5, the loss by
        # alpha sin(m) 4e-5 at most; a missing clamp gives inf / NaN, a wrong one an O(alpha) error
        tol = 4.0 * 1e-4 if dtype == torch.float32 else 1e-9
        assert max_err(out, ref) <= tol, (out, ref)
        for k in grads:
            # the slope near c = 1 is ~1e3: the features' gradient carries the rounding of c, amplified.
            # (D = 1: W's gradient is 0 exactly, the reference's is rounding noise of ~1e-11)
            scale = max(float(rgrads[k].abs().max()), 1e-6)
            assert max_err(grads[k], rgrads[k]) <= 5e-3 * scale, k


@pytest.mark.parametrize("margin", [0.5, 0.3])
def test_one_ulp_around_the_switch_point(backend, device, margin):
    """c one ulp (of the compute dtype) above and below th = cos(pi - m2), as rounded from float64:
    above, the angular formula; below, the fallback; each row must land on the reference's side (the
    two differ by alpha (1 - cos m2 - m2 sin m2), about 2 at alpha = 16). x = e_0 and normalize_weight=False
    make c = W_y0 exactly on every backend."""
    for dtype in _edge_dtypes(backend):
        th = torch.tensor(-math.cos(margin), dtype=torch.float64).to(dtype)
        steps = 1 if dtype == torch.float32 else 2 ** 20  # float64: the reference's arccos needs room
        up, down = th.clone(), th.clone()
        for _ in range(min(steps, 4)):
            up, down = torch.nextafter(up, torch.tensor(2.0, dtype=dtype)), torch.nextafter(down, torch.tensor(-2.0, dtype=dtype))
        if steps > 4:
            eps = torch.finfo(dtype).eps * steps
            up, down = th + eps, th - eps
        B, D, C = 4, 3, 5
        x = torch.zeros(B, D, dtype=dtype)
        x[:, 0] = 1.0
        w = torch.zeros(C, D, dtype=dtype)
        w[:, 1] = 0.5
        t = torch.tensor([0, 1, 2, 3])
        w[0, 0], w[1, 0], w[2, 0], w[3, 0] = up, down, up, down
        for mt, m in (("arcface", margin), ("combined", (1.0, margin, 0.1))):
            case = make_case(B, D, C, dtype=dtype, device=device, margin_type=mt, margin=m, reduction="none")
            case.x = x.to(device).requires_grad_()
            case.weight = w.to(device).requires_grad_()
            case.target = t.to(device)
            out, grads = run(case, backend)
            ref, rgrads = run_reference(case, True)
            _assert_close_abs(f"{mt} loss", out, ref, dtype)
            for k in grads:
                _assert_close_abs(f"{mt} grad {k}", grads[k], rgrads[k], dtype)
