"""The public API around the op: argument validation, backend selection, the nn.Module, alpha's bound."""
import math
import sys
import warnings

import pytest
import torch

import l2sm_kernels as L
from l2sm_kernels.backends import registry as backends
from l2sm_kernels.testing import make_case, max_err


def _args(B=4, D=8, C=5, **kw):
    c = make_case(B, D, C, grad=False, **kw)
    return c.x, c.weight, c.target


# ---------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument, nothing written anywhere
# ---------------------------------------------------------------------------------------------
BAD = [
    (dict(features=torch.randn(4)), ValueError, r"features must be 2-D"),
    (dict(features=torch.randn(4, 8, 1)), ValueError, r"features must be 2-D"),
    (dict(weight=torch.randn(5)), ValueError, r"weight must be 2-D"),
    (dict(weight=torch.randn(5, 7)), ValueError, r"weight must have shape \(num_classes, 8\)"),
    (dict(weight=torch.randn(0, 8)), ValueError, r"at least one class"),
    (dict(features=torch.randint(0, 3, (4, 8))), TypeError, r"features must be float16"),
    (dict(weight=torch.randn(5, 8).to(torch.complex64)), TypeError, r"weight must be float16"),
    (dict(target=torch.zeros(4)), TypeError, r"target must be an int64"),
    (dict(target=torch.zeros(3, dtype=torch.long)), ValueError, r"target must have shape \(4,\)"),
    (dict(target=torch.zeros(4, 1, dtype=torch.long)), ValueError, r"target must have shape \(4,\)"),
    (dict(target=[0, 1, 2, 3]), TypeError, r"target must be a torch.Tensor"),
    (dict(bias=torch.randn(4)), ValueError, r"bias must have shape \(5,\)"),
    (dict(bias=torch.randn(5, 1)), ValueError, r"bias must be 1-D"),
    (dict(margin_type="sphereface"), ValueError, r"margin_type must be one of"),
    (dict(margin_type="none", margin=0.2), ValueError, r"margin=0.2 has no effect"),
    (dict(margin_type="arcface", margin=4.0), ValueError, r"arcface margin must be in \[0, pi\)"),
    (dict(margin_type="cosface", margin=-0.1), ValueError, r"margin must be finite and >= 0"),
    (dict(reduction="avg"), ValueError, r"reduction must be one of"),
    (dict(backend="cuda"), ValueError, r"backend must be one of"),
    (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\]"),
    (dict(label_smoothing=-0.1), ValueError, r"label_smoothing must be in \[0, 1\]"),
    (dict(eps=0.0), ValueError, r"eps must be a positive"),
    (dict(ignore_index=1.5), TypeError, r"ignore_index must be an int"),
    (dict(alpha="16"), TypeError, r"alpha must be a Python number"),
    (dict(alpha=torch.tensor(16)), TypeError, r"alpha must be a floating-point tensor"),
    (dict(normalize_weight=1), TypeError, r"normalize_weight must be a bool"),
]


@pytest.mark.parametrize("override,exc,match", BAD, ids=[m for _, _, m in BAD])
def test_bad_input(override, exc, match):
    x, w, t = _args()
    kw = dict(features=x, weight=w, target=t, backend="eager")
    kw.update(override)
    before = [v.clone() for v in kw.values() if isinstance(v, torch.Tensor)]
    with pytest.raises(exc, match=match):
        L.l2_softmax_loss(**kw)
    after = [v for v in kw.values() if isinstance(v, torch.Tensor)]
    for b, a in zip(before, after):
        assert torch.equal(b, a)


def test_feature_dim_zero():
    with pytest.raises(ValueError, match="at least one feature dimension"):
        L.l2_softmax_loss(torch.randn(3, 0), torch.randn(4, 0), torch.zeros(3, dtype=torch.long))


def test_int32_target_accepted():
    x, w, t = _args()
    a = L.l2_softmax_loss(x, w, t, backend="eager")
    b = L.l2_softmax_loss(x, w, t.int(), backend="eager")
    assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_devices_that_dont_mix():
    x, w, t = _args()
    with pytest.raises(ValueError, match="weight is on cuda"):
        L.l2_softmax_loss(x, w.cuda(), t)
    with pytest.raises(ValueError, match="target is on cuda"):
        L.l2_softmax_loss(x, w, t.cuda())


def test_cpu_scalar_alpha_moves_to_device():
    x, w, t = _args()
    a = torch.tensor(8.0, requires_grad=True)
    L.l2_softmax_loss(x, w, t, a, backend="eager").backward()
    assert a.grad is not None


# ---------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------
def test_available_backends_reports_every_backend():
    info = L.available_backends()
    assert set(info) == {"eager", "cpu", "triton"}
    assert info["eager"].available and info["eager"].reason == ""
    for name, i in info.items():
        assert i.available == (i.reason == ""), name
        assert bool(i.devices) == i.available


def test_explicit_unavailable_backend_is_an_error(monkeypatch):
    monkeypatch.setitem(backends._load_errors, "cpu", "not built (test)")
    monkeypatch.delitem(backends.OPS, "cpu", raising=False)
    x, w, t = _args()
    with pytest.raises(ValueError, match=r"backend='cpu' cannot run .* not built \(test\)"):
        L.l2_softmax_loss(x, w, t, backend="cpu")


def test_auto_falls_back_to_eager_once_with_a_warning(monkeypatch):
    monkeypatch.setitem(backends._load_errors, "cpu", "not built (test)")
    monkeypatch.delitem(backends.OPS, "cpu", raising=False)
    monkeypatch.setattr(backends, "_warned", set())
    x, w, t = _args()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out1 = L.l2_softmax_loss(x, w, t)
        out2 = L.l2_softmax_loss(x, w, t)
    msgs = [str(r.message) for r in rec if "eager fallback" in str(r.message)]
    assert len(msgs) == 1 and "not built (test)" in msgs[0]
    assert torch.equal(out1, L.l2_softmax_loss(x, w, t, backend="eager")) and torch.equal(out1, out2)


def test_backend_whose_load_fails_in_any_way_is_unavailable(monkeypatch):
    """A backend whose registration raises anything (here the TypeError another torch's triton_op could
    give) is unavailable with the reason, and `import l2sm_kernels` / "auto" still work: every backend
    loads at import, so an escaping error would break the package for every backend."""
    import types

    mod = types.ModuleType("l2sm_test_broken_backend")

    def load():
        raise TypeError("triton_op() got an unexpected keyword argument (test)")

    mod.load = load
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(backends._MODULES, "cpu", mod.__name__)
    monkeypatch.delitem(backends._load_errors, "cpu", raising=False)
    monkeypatch.delitem(backends.OPS, "cpu", raising=False)
    monkeypatch.setattr(backends, "_warned", set())
    info = backends.available_backends()["cpu"]
    assert not info.available and info.reason == "TypeError: triton_op() got an unexpected keyword argument (test)"
    x, w, t = _args()
    with pytest.warns(RuntimeWarning, match="eager fallback"):
        out = L.l2_softmax_loss(x, w, t)
    assert torch.equal(out, L.l2_softmax_loss(x, w, t, backend="eager"))


def test_triton_rejects_cpu_tensors_without_interpreter(monkeypatch):
    if L.available_backends()["triton"].reason.startswith(("ModuleNotFoundError", "ImportError")):
        pytest.skip("triton not importable")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, t = _args()
    with pytest.raises(ValueError, match="triton backend takes CUDA tensors"):
        L.l2_softmax_loss(x, w, t, backend="triton")


# ---------------------------------------------------------------------------------------------
# the module
# ---------------------------------------------------------------------------------------------
def test_module_matches_functional_and_trains():
    torch.manual_seed(0)
    m = L.L2SoftmaxLoss(8, 11, alpha=10.0, learn_alpha=True, bias=True, margin_type="cosface", margin=0.1,
                        label_smoothing=0.1, backend="eager")
    x = torch.randn(6, 8)
    y = torch.randint(0, 11, (6,))
    out = m(x, y)
    ref = L.l2_softmax_loss_ref(x, m.weight.detach(), y, m.alpha.detach(), m.bias.detach(),
                                margin_type="cosface", margin=0.1, label_smoothing=0.1)
    assert max_err(out, ref) < 1e-5
    out.backward()
    assert m.weight.grad is not None and m.bias.grad is not None and m.alpha_raw.grad is not None
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = m(x, y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


def test_module_init_repr_and_state_dict():
    m = L.L2SoftmaxLoss(16, 7, alpha=12.0, bias=True, normalize_weight=True, margin_type="arcface", margin=0.5)
    bound = 1 / math.sqrt(16)
    assert m.weight.shape == (7, 16) and m.weight.abs().max() <= bound and m.weight.std() > bound / 4
    assert torch.count_nonzero(m.bias) == 0
    assert not isinstance(m.alpha, torch.nn.Parameter) and float(m.alpha) == 12.0
    r = repr(m)
    assert "in_features=16, num_classes=7, alpha=12" in r and "arcface" in r and "normalize_weight=True" in r
    sd = m.state_dict()
    assert set(sd) == {"weight", "bias", "alpha", "_extra_state"}
    m2 = L.L2SoftmaxLoss(16, 7, alpha=1.0, bias=True, normalize_weight=True, margin_type="arcface", margin=0.5)
    m2.load_state_dict(sd)
    assert torch.equal(m2.weight, m.weight) and float(m2.alpha) == 12.0
    learn = L.L2SoftmaxLoss(4, 3, learn_alpha=True)  # alpha_min + exp(alpha_raw): > alpha_min by construction
    assert "alpha_raw" in dict(learn.named_parameters()) and learn.alpha.requires_grad
    assert float(learn.alpha) == pytest.approx(16.0) and set(learn.state_dict()) == {"weight", "alpha", "_extra_state"}


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="alpha must be > 0"):
        L.L2SoftmaxLoss(4, 3, alpha=0.0)
    with pytest.raises(TypeError, match="alpha must be a Python number"):  # as the functional form
        L.L2SoftmaxLoss(4, 3, alpha=True)
    with pytest.raises(ValueError, match="margin_type must be one of"):
        L.L2SoftmaxLoss(4, 3, margin_type="x")
    with pytest.raises(ValueError, match="reduction must be one of"):
        L.L2SoftmaxLoss(4, 3, reduction="x")
    with pytest.raises(ValueError, match="in_features must be an int >= 1"):
        L.L2SoftmaxLoss(0, 3)


def test_module_cosine_scores():
    m = L.L2SoftmaxLoss(4, 3)
    x = torch.randn(5, 4)
    s = m.cosine(x)
    assert s.shape == (5, 3) and s.abs().max() <= 1 + 1e-6


# ---------------------------------------------------------------------------------------------
# alpha's lower bound
# ---------------------------------------------------------------------------------------------
def test_alpha_lower_bound():
    assert abs(L.alpha_lower_bound(1_000_000, 0.9) - 16.0) < 0.02  # the paper's C = 1M example
    assert L.alpha_lower_bound(10, 0.9) == pytest.approx(math.log(0.9 * 8 / 0.1))
    assert L.alpha_lower_bound(100_000) < L.alpha_lower_bound(1_000_000)
    for bad in (2, 0, 2.5):
        with pytest.raises(ValueError, match="num_classes must be an int >= 3"):
            L.alpha_lower_bound(bad)
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"p must be in \(0, 1\)"):
            L.alpha_lower_bound(10, bad)


def test_reference_matches_cross_entropy_definition():
    """The reference itself against the per-row formula of docs/design.md written out independently."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(7, 6, generator=g, dtype=torch.float64)
    b = torch.randn(7, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 6, -100, 2])
    s, m, alpha = 0.2, 0.4, 5.0
    out = L.l2_softmax_loss_ref(x, w, y, alpha, b, normalize_weight=True, margin=m, margin_type="arcface",
                                label_smoothing=s, reduction="none")
    for i in range(5):
        if y[i] == -100:
            assert out[i] == 0
            continue
        xh = x[i] / x[i].norm()
        c = torch.stack([xh @ (w[j] / w[j].norm()) for j in range(7)])
        ct = c[y[i]]
        f = math.cos(math.acos(ct) + m) if ct > math.cos(math.pi - m) else ct - m * math.sin(m)
        z = alpha * c + b
        z[y[i]] = alpha * f + b[y[i]]
        lse = torch.logsumexp(z, 0)
        expect = (1 - s) * (lse - z[y[i]]) + s * (lse - z.mean())
        assert abs(float(out[i] - expect)) < 1e-12


# ---------------------------------------------------------------------------------------------
# the hardening issue: ignore_index at or above C, label_smoothing = 1 (reliability case 25)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ignore_index", [255, 5])
def test_ignore_index_at_or_above_num_classes(ignore_index):
    """255 (the usual value) and C itself are accepted and ignored, as torch's cross_entropy does; the
    module too; compiled too (no device assert fires)."""
    torch.manual_seed(0)
    x, w = torch.randn(4, 8), torch.randn(5, 8)
    t = torch.tensor([ignore_index, 0, 1, 2])
    out = L.l2_softmax_loss(x, w, t, ignore_index=ignore_index, reduction="none", backend="eager")
    ref = torch.nn.functional.cross_entropy(16.0 * torch.nn.functional.normalize(x) @ w.T, t,
                                            ignore_index=ignore_index, reduction="none")
    assert out[0] == 0 and max_err(out, ref) < 1e-5
    m = L.L2SoftmaxLoss(8, 5, ignore_index=ignore_index, backend="eager")
    assert torch.isfinite(m(x, t))
    compiled = torch.compile(lambda x, w, t: L.l2_softmax_loss(x, w, t, ignore_index=ignore_index, backend="eager"),
                             fullgraph=True)
    assert max_err(compiled(x, w, t), ref[1:].mean()) < 1e-5
    t_bad = torch.tensor([ignore_index, 0, 5 if ignore_index != 5 else 6, 2])
    with pytest.raises(ValueError, match=r"target\[2\] = \d+ is outside \[0, 5\)"):
        L.l2_softmax_loss(x, w, t_bad, ignore_index=ignore_index, backend="eager")


def test_label_smoothing_one_matches_torch():
    torch.manual_seed(1)
    x, w, t = torch.randn(6, 8), torch.randn(5, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    out = L.l2_softmax_loss(x, w, t, label_smoothing=1.0, backend="eager")
    ref = torch.nn.functional.cross_entropy(16.0 * torch.nn.functional.normalize(x) @ w.T, t, label_smoothing=1.0)
    assert max_err(out, ref) < 1e-5


def test_module_files_have_distinct_names_and_no_import_cycle():
    """Each file's name says what it holds (no two package files share a base name), and the
    class-parallel function does not import its module's file (the cycle the old layout had)."""
    import ast
    import collections
    import pathlib
    root = pathlib.Path(L.__file__).parent
    # __init__.py and __main__.py are names Python fixes (a package; `python -m package`)
    names = collections.Counter(p.name for p in root.rglob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert [n for n, k in names.items() if k > 1] == []
    tree = ast.parse((root / "distributed" / "class_parallel.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "class_parallel_module" not in imported
