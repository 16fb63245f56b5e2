"""The face-recognition heads (l2sm_kernels.heads) on every backend: each head's margin schedule checked
against its paper's formula written out here, independently of heads.py, and its loss and gradients
against the float64 reference with those margins; then a torch.compile(fullgraph=True) training step
per head."""
import math

import pytest
import torch
import torch.nn.functional as F

import l2sm_kernels as L
from l2sm_kernels.testing import assert_accurate, max_err

from conftest import is_slow

B, D, C = 10, 16, 13


def _inputs(device, seed=0, scale=25.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, D, generator=g) * (scale / math.sqrt(D)) * (0.5 + torch.rand(B, 1, generator=g)))
    y = torch.randint(0, C, (B,), generator=g)
    return x.to(device), y.to(device)


def _check_against_reference(head, x, y, margin, extra=None, **ref_kw):
    """head(x, y) and its gradients (x, W) against the float64 reference with the given margin
    (a combined (1, m2, m3), or a function of the reference's features returning one: a margin that
    depends on them differentiably), plus `extra(x)` (a differentiable per-batch term) when given."""
    xs = x.clone().requires_grad_(True)
    out = head(xs, y)
    gx, gw = torch.autograd.grad(out, [xs, head.weight])

    def ref(upcast):
        dt = torch.float64 if upcast else x.dtype
        xr = x.detach().to(dt).requires_grad_(True)
        wr = head.weight.detach().to(dt).requires_grad_(True)
        m = margin(xr) if callable(margin) else margin
        m = tuple((v if callable(margin) else v.detach()).to(dt) if isinstance(v, torch.Tensor) else v for v in m)
        loss = L.l2_softmax_loss_ref(xr, wr, y, head.s, normalize_weight=True, margin_type="combined", margin=m,
                                     subcenters=head.options.subcenters, upcast=upcast, **ref_kw)
        if extra is not None:
            loss = loss + extra(xr)
        return (loss,) + torch.autograd.grad(loss, [xr, wr])

    r, p = ref(True), ref(False)
    for name, a, b, c in zip(("loss", "grad x", "grad weight"), (out, gx, gw), r, p):
        assert_accurate(name, a, b, c, torch.float32)


@pytest.mark.parametrize("cls,margin", [(L.ArcFaceLoss, (1.0, 0.5, 0.0)), (L.CosFaceLoss, (1.0, 0.0, 0.35)),
                                        (L.CombinedMarginLoss, (1.0, 0.5, 0.0))])
def test_fixed_margin_heads(backend, device, cls, margin):
    torch.manual_seed(0)
    head = cls(D, C, backend=backend).to(device)
    assert head.s == 64.0 and head.options.normalize_weight
    x, y = _inputs(device)
    _check_against_reference(head, x, y, margin)


def test_subcenter_arcface(backend, device):
    torch.manual_seed(1)
    head = L.ArcFaceLoss(D, C, subcenters=3, backend=backend).to(device)
    assert head.weight.shape == (3 * C, D) and head.num_classes == C
    x, y = _inputs(device, seed=1)
    _check_against_reference(head, x, y, (1.0, 0.5, 0.0))


def test_adaface_schedule(backend, device):
    """AdaFace (Kim et al. 2022), written out: norms clipped to [0.001, 100]; EMA of the batch mean and
    std (t_alpha 0.01, from 20 and 100); g = clip(h (norm - mean) / (std + eps), -1, 1); margins
    m2 = -m g, m3 = m + m g (h = 0.333, m = 0.4, eps = 1e-3)."""
    torch.manual_seed(2)
    head = L.AdaFaceLoss(D, C, backend=backend).to(device)
    x, y = _inputs(device, seed=2)
    norms = x.double().norm(dim=1).clamp(0.001, 100)
    mean = 0.01 * norms.mean() + 0.99 * 20.0
    std = 0.01 * norms.std() + 0.99 * 100.0
    g = ((norms - mean) / (std + 1e-3) * 0.333).clamp(-1, 1)
    expected = (1.0, -0.4 * g, 0.4 + 0.4 * g)
    _check_against_reference(head, x, y, expected)  # updates the moving averages once, as written above
    assert float(head.batch_mean) == pytest.approx(float(mean), rel=1e-6)
    assert float(head.batch_std) == pytest.approx(float(std), rel=1e-6)
    head.eval()  # no update in eval mode
    before = float(head.batch_mean)
    head(x, y)
    assert float(head.batch_mean) == before


def test_magface_schedule_and_regularizer(backend, device):
    """MagFace (Meng et al. 2021), written out: a = clip(|x|, 10, 110); m(a) = (0.8 - 0.45) / (110 - 10)
    (a - 10) + 0.45; loss = CE(s cos(theta + m(a))) + 35 mean(1 / a + a / 110^2); both the margin's and
    the regularizer's gradients reach |x| (the reference differentiates m(a) by autograd)."""
    torch.manual_seed(3)
    head = L.MagFaceLoss(D, C, backend=backend).to(device)
    x, y = _inputs(device, seed=3, scale=60.0)
    a = x.double().norm(dim=1).clamp(10, 110)
    assert float(a.min()) > 10 or float(a.max()) < 110  # the schedule is exercised away from both clips

    def margin(xr):
        return 1.0, (0.8 - 0.45) / (110 - 10) * (xr.norm(dim=1).clamp(10, 110) - 10) + 0.45, 0.0

    def reg(xr):
        ar = xr.norm(dim=1).clamp(10, 110)
        return 35.0 * (1.0 / ar + ar / 110 ** 2).mean()

    _check_against_reference(head, x, y, margin, extra=reg)


@pytest.mark.parametrize("variant", ["arc", "cos"])
def test_elasticface_draws(backend, device, variant):
    """ElasticFace (Boutros et al. 2022): margins ~ N(m, 0.05^2) per sample, m = 0.5 (arc) / 0.35 (cos),
    drawn from the head's generator."""
    torch.manual_seed(4)
    head = L.ElasticFaceLoss(D, C, variant=variant, backend=backend).to(device)
    m = 0.5 if variant == "arc" else 0.35
    head.generator = torch.Generator(device=device).manual_seed(11)
    draws = torch.normal(m, 0.05, (B,), generator=torch.Generator(device=device).manual_seed(11), device=device)
    x, y = _inputs(device, seed=4)
    margin = (1.0, draws, 0.0) if variant == "arc" else (1.0, 0.0, draws)
    _check_against_reference(head, x, y, margin)
    many = torch.cat([head.draw_margins(1000, device) for _ in range(20)]).double()
    assert abs(float(many.mean()) - m) < 0.003 and abs(float(many.std()) - 0.05) < 0.003


def _paper_target_cosines(x, w, y):
    return (F.normalize(x.double(), dim=1) * F.normalize(w.detach().double(), dim=1)[y]).sum(1)


def test_curricularface_schedule(backend, device):
    """CurricularFace (Huang et al. 2020), written out: target s cos(theta_y + m) (s = 64, m = 0.5);
    t <- 0.01 mean(cos theta_y) + 0.99 t from t = 0, updated before the step uses it; hard negatives
    cos theta_j > cos(theta_y + m) become cos theta_j (t + cos theta_j)."""
    torch.manual_seed(6)
    head = L.CurricularFaceLoss(D, C, backend=backend).to(device)
    assert head.s == 64.0 and head.m == 0.5 and float(head.t) == 0.0 and "t" in head.state_dict()
    x, y = _inputs(device, seed=6)
    t1 = 0.01 * float(_paper_target_cosines(x, head.weight, y).mean()) + 0.99 * 0.0
    _check_against_reference(head, x, y, (1.0, 0.5, 0.0), negatives="curricular", negatives_t=t1)
    assert float(head.t) == pytest.approx(t1, rel=1e-5)
    x2, y2 = _inputs(device, seed=7)
    y2[:3] = -100  # ignored rows stay out of the mean
    t2 = 0.01 * float(_paper_target_cosines(x2[3:], head.weight, y2[3:]).mean()) + 0.99 * t1
    _check_against_reference(head, x2, y2, (1.0, 0.5, 0.0), negatives="curricular", negatives_t=t2)
    assert float(head.t) == pytest.approx(t2, rel=1e-5)
    head.eval()  # eval mode uses t and leaves it
    head(x, y)
    assert float(head.t) == pytest.approx(t2, rel=1e-5)
    again = L.CurricularFaceLoss(D, C, backend=backend).to(device)
    again.load_state_dict(head.state_dict())
    assert float(again.t) == float(head.t)


@pytest.mark.parametrize("variant,margin", [("am", (1.0, 0.0, 0.35)), ("arc", (1.0, 0.5, 0.0))])
def test_mv_softmax(backend, device, variant, margin):
    """MV-Softmax (Wang et al. 2020), fixed variant: s = 32, t = 1.2; a negative with cos theta_j >
    f(m, theta_y) (AM: cos theta_y - 0.35, Arc: cos(theta_y + 0.5)) gets t cos theta_j + t - 1."""
    torch.manual_seed(8)
    head = L.MVSoftmaxLoss(D, C, margin_type=variant, backend=backend).to(device)
    assert head.s == 32.0 and head.t == 1.2
    x, y = _inputs(device, seed=8)
    _check_against_reference(head, x, y, margin, negatives="mv", negatives_t=1.2)
    with pytest.raises(ValueError, match="margin_type must be 'am' or 'arc'"):
        L.MVSoftmaxLoss(D, C, margin_type="cos")
    with pytest.raises(ValueError, match="negatives_t must be >= 1"):
        L.MVSoftmaxLoss(D, C, t=0.5)


@pytest.mark.parametrize("name", ["arcface", "cosface", "adaface", "magface", "elasticface", "curricularface",
                                  "mv-softmax"])
def test_compile_fullgraph_training_step(backend, device, name):
    if is_slow(backend):
        pytest.skip("torch.compile of an interpreted triton op fails in fake tracing; runs on the GPU")
    torch.manual_seed(5)
    head = L.heads.HEADS[name](D, C, backend=backend).to(device)
    net = torch.nn.Linear(8, D).to(device)
    inp = torch.randn(B, 8, device=device) * 5
    y = torch.randint(0, C, (B,), device=device)
    params = list(net.parameters()) + list(head.parameters())

    def step(inp, y):
        return head(net(inp), y)

    torch._dynamo.reset()  # the same code object compiles for every head: start each test afresh
    compiled = torch.compile(step, fullgraph=True)
    if name == "elasticface":  # random margins: the compiled RNG stream differs from eager's
        head.generator = None
        out = compiled(inp, y)
        assert torch.isfinite(out) and all(torch.isfinite(g).all() for g in torch.autograd.grad(out, params))
        return
    start = {k: v.clone() for k, v in head.named_buffers()}
    l1 = compiled(inp, y)
    g1 = torch.autograd.grad(l1, params)
    after = {k: v.clone() for k, v in head.named_buffers()}
    with torch.no_grad():
        for k, v in head.named_buffers():
            v.copy_(start[k])  # AdaFace's moving averages: the eager call starts where the compiled one did
    l2 = step(inp, y)
    g2 = torch.autograd.grad(l2, params)
    for k, v in head.named_buffers():
        assert torch.allclose(v, after[k], rtol=1e-6), k
    assert max_err(l1, l2) <= 1e-5 * float(l2.abs())
    for a, b in zip(g1, g2):
        assert max_err(a, b) <= 1e-4 * max(float(b.abs().max()), 1e-6)


def test_heads_train_on_digits_cpu():
    """Every head learns (eager or cpu, whatever "auto" picks): training accuracy on digits well above
    chance after a few epochs."""
    from sklearn.datasets import load_digits

    xs, ys = load_digits(return_X_y=True)
    xs, ys = torch.tensor(xs / 16.0, dtype=torch.float32), torch.tensor(ys)
    for name in ("arcface", "cosface", "adaface", "magface", "elasticface"):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
        head = L.heads.HEADS[name](32, 10, s=16.0) if name != "magface" else L.MagFaceLoss(32, 10, s=16.0)
        opt = torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=0.05, momentum=0.9)
        for _ in range(8):
            for i in range(0, len(xs), 64):
                loss = head(net(xs[i:i + 64]), ys[i:i + 64])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            acc = float((head.cosine(net(xs)).argmax(1) == ys).float().mean())
        assert acc > 0.8, (name, acc)
        assert torch.isfinite(F.normalize(head.weight, dim=1)).all()


def test_set_margin_takes_each_heads_own_margin(backend, device):
    """set_margin speaks the head's language: ArcFace's and CosFace's m (a number or a 0-d tensor: the
    loss equals a head built with that m), CombinedMarginLoss's (m1, m2, m3); errors name the head's own
    argument, never the margin_type 'combined' the user did not choose; the per-sample heads refuse."""
    x, y = _inputs(device, seed=6)
    for cls, m, form in ((L.ArcFaceLoss, 0.3, (1.0, 0.3, 0.0)), (L.CosFaceLoss, 0.2, (1.0, 0.0, 0.2))):
        torch.manual_seed(6)
        head = cls(D, C, backend=backend).to(device)
        torch.manual_seed(6)
        want = cls(D, C, m=m, backend=backend).to(device)
        head.set_margin(m)
        assert head.options.margin == form
        assert max_err(head(x, y), want(x, y)) <= 1e-6 * float(want(x, y).detach().abs())
        head.set_margin(torch.tensor(m, dtype=torch.float64, device=device))
        assert max_err(head(x, y), want(x, y)) <= 1e-6 * float(want(x, y).detach().abs())
        for bad, exc, msg in ((-0.1, ValueError, f"{cls.__name__}.set_margin: m must be"),
                              ((1.0, 0.3, 0.0), TypeError, "CombinedMarginLoss"),
                              (torch.zeros(B), ValueError, "must be 0-d")):
            with pytest.raises(exc, match=msg) as info:
                head.set_margin(bad)
            assert "margin_type" not in str(info.value)
    with pytest.raises(ValueError, match="ArcFaceLoss.set_margin: m must be in \\[0, pi\\)"):
        L.ArcFaceLoss(D, C).set_margin(4.0)
    comb = L.CombinedMarginLoss(D, C)
    comb.set_margin((1.0, 0.2, 0.1))
    assert comb.options.margin == (1.0, 0.2, 0.1)
    with pytest.raises(TypeError, match=r"CombinedMarginLoss.set_margin takes the combined margin \(m1, m2, m3\)"):
        comb.set_margin(0.3)
    for cls in (L.AdaFaceLoss, L.MagFaceLoss):
        with pytest.raises(TypeError, match=f"{cls.__name__} computes its margins per sample"):
            cls(D, C).set_margin(0.3)
    elastic = L.ElasticFaceLoss(D, C)
    elastic.set_margin(0.4)
    elastic.generator = torch.Generator().manual_seed(0)
    assert abs(float(elastic.draw_margins(20000, "cpu").mean()) - 0.4) < 0.002
    with pytest.raises(ValueError, match="ElasticFaceLoss.set_margin: m must be"):
        elastic.set_margin(-1.0)
    # its own generator cannot be traced by torch.compile: a clear error, not dynamo's proxy failure
    torch._dynamo.reset()
    with pytest.raises(Exception, match="cannot trace a torch.Generator"):
        torch.compile(lambda x, y: elastic(x, y), backend="eager", fullgraph=True)(x.cpu(), y.cpu())


@pytest.mark.parametrize("K", [1, 2])
def test_magface_float64_gradcheck(backend, device, K):
    """MagFace's magnitude, margin and margin slope are computed in float64 for float64 inputs, so the
    head passes torch.autograd.gradcheck (in float32 they were rounded: gradcheck failed)."""
    if backend == "triton":
        pytest.skip("float64: eager and cpu")
    torch.manual_seed(7)
    head = L.MagFaceLoss(6, 5, subcenters=K, reduction="sum", backend=backend).to(device).double()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    x = (x / x.norm(dim=1, keepdim=True) * torch.tensor([[15.0], [30.0], [60.0], [90.0]], dtype=torch.float64))
    x = x.to(device).requires_grad_(True)  # magnitudes inside [l_a, u_a]: the margin and regularizer move
    y = torch.tensor([0, 1, 4, 2], device=device)
    w = head.weight.detach().clone().requires_grad_(True)

    def f(x, w):
        return torch.func.functional_call(head, {"weight": w}, (x, y))

    assert f(x, w).dtype == torch.float64
    assert torch.autograd.gradcheck(f, (x, w))
