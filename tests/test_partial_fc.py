"""Partial FC in one process as users run it (issue 18 part 2; docs/reliability.md, cases 42-44): under
torch.compile (static and dynamic shapes, fullgraph, a sample rate changing between calls), an empty sample
on every backend, and the modules' random generator resumed from a checkpoint."""
import pytest
import torch
import torch._dynamo.testing

import l2sm_kernels as L
from l2sm_kernels.testing import max_err

from conftest import is_slow


def _inputs(device, B=8, C=40, D=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g).to(device).requires_grad_(True)
    w = torch.randn(C, D, generator=g).to(device).requires_grad_(True)
    y = torch.randint(0, C, (B,), generator=g).to(device)
    return x, w, y


def test_sample_size_rule():
    """The size is known from the shapes when int(q n) >= batch (the positives always fit), else None."""
    from l2sm_kernels.sampling import partial_fc_sample, partial_fc_size

    assert partial_fc_size(40, 0.5, 8) == 20 and partial_fc_size(40, 0.2, 8) == 8
    assert partial_fc_size(40, 0.1, 8) is None and partial_fc_size(10, 0.05, 0) == 0
    assert partial_fc_size(10, 0.05, 1, min_size=1) == 1 and partial_fc_size(10, 0.05, 2, min_size=1) is None
    y = torch.tensor([3, 3, 7, 1, 9, 0, 2, 5])  # 7 positives > int(0.5 * 10) = 5: all of them, no more
    s = partial_fc_sample(y, 0, 10, 0.5, generator=torch.Generator().manual_seed(0))
    assert s.tolist() == [0, 1, 2, 3, 5, 7, 9]
    empty = partial_fc_sample(torch.full((3,), -100), 0, 10, 0.05)
    assert empty.shape == (0,)
    one = partial_fc_sample(torch.full((3,), -100), 0, 10, 0.05, min_size=1)
    assert one.shape == (1,)


@pytest.mark.parametrize("dynamic", [None, True, False], ids=["default", "dynamic", "static"])
def test_compiles_without_graph_break_where_the_size_is_fixed(backend, device, dynamic):
    """int(q C) >= B: torch.compile(fullgraph=True) traces the sampling (no host read, no graph break),
    static or dynamic, with the sample rate changing between calls; the captured graph (run eagerly by
    CompileCounter, so the draws are torch's) gives the uncompiled loss and gradients."""
    if is_slow(backend):
        pytest.skip("torch.compile of an interpreted triton op fails in fake tracing; runs on the GPU")
    x, w, y = _inputs(device)

    def f(x, w, y, q):
        return L.l2_softmax_loss(x, w, y, normalize_weight=True, margin_type="cosface", margin=0.2, sample_rate=q,
                                 backend=backend)

    torch._dynamo.reset()
    assert torch._dynamo.explain(f)(x, w, y, 0.5).graph_break_count == 0
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(f, backend=counter, fullgraph=True, dynamic=dynamic)
    for q in (0.5, 0.25, 0.75, 0.5):
        torch.manual_seed(7)
        out = compiled(x, w, y, q)
        gx, gw = torch.autograd.grad(out, [x, w])
        torch.manual_seed(7)
        ref = f(x, w, y, q)
        rx, rw = torch.autograd.grad(ref, [x, w])
        assert max_err(out, ref) <= 1e-5 * float(ref.detach().abs())
        assert max_err(gx, rx) <= 1e-5 * float(rx.abs().max()) and max_err(gw, rw) <= 1e-5 * float(rw.abs().max())
        assert torch.count_nonzero(gw.abs().sum(1)) <= int(q * 40)  # only sampled rows get gradient
    assert counter.frame_count <= 3, counter.frame_count


def test_compiled_module_and_the_host_read_path(backend, device):
    """The module's Partial FC compiles with fullgraph (last_sampled set); where the positives may outnumber
    int(q C) (here int(0.1 x 40) = 4 < B = 8) the size is read on the host, which compiles with a graph
    break and gives the uncompiled result; a torch.Generator under torch.compile is a clear error."""
    if is_slow(backend):
        pytest.skip("torch.compile of an interpreted triton op fails in fake tracing; runs on the GPU")
    x, _, y = _inputs(device)
    m = L.L2SoftmaxLoss(12, 40, normalize_weight=True, sample_rate=0.5, backend=backend).to(device)
    torch._dynamo.reset()
    step = torch.compile(lambda x, y: m(x, y), backend="eager", fullgraph=True, dynamic=True)
    torch.manual_seed(3)
    out = step(x, y)
    got = m.last_sampled
    torch.manual_seed(3)
    ref = m(x, y)
    assert torch.equal(got, m.last_sampled) and got.shape == (20,)
    assert max_err(out, ref) <= 1e-5 * float(ref.detach().abs())

    def f(x, y, q):
        return L.l2_softmax_loss(x, m.weight, y, sample_rate=q, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="eager")
    for q in (0.1, 0.05):
        torch.manual_seed(4)
        out = compiled(x, y, q)
        torch.manual_seed(4)
        assert max_err(out, f(x, y, q)) <= 1e-5 * float(out.detach().abs())

    def g(x, y, gen):
        return L.l2_softmax_loss(x, m.weight, y, sample_rate=0.5, generator=gen, backend=backend)

    torch._dynamo.reset()
    with pytest.raises(Exception, match="cannot trace a torch.Generator"):
        torch.compile(g, backend="eager", fullgraph=True)(x, y, torch.Generator(device=device))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_sample_is_the_all_ignored_result(backend, device, reduction):
    """Every target ignored and int(q C) = 0: the documented all-ignored result on every backend (mean NaN,
    sum 0, none zeros; zero gradients for x, W, b and alpha), as with sample_rate = 1; never a crash."""
    x, w, _ = _inputs(device, B=3, C=5)
    b = torch.zeros(5, device=device, requires_grad=True)
    a = torch.tensor(10.0, device=device, requires_grad=True)
    y = torch.full((3,), -100, device=device)
    outs = []
    for q in (0.1, 1.0):
        out = L.l2_softmax_loss(x, w, y, a, b, sample_rate=q, reduction=reduction, backend=backend)
        grads = torch.autograd.grad(out.sum() if reduction == "none" else out, [x, w, b, a], allow_unused=True)
        outs.append(out.detach())
        for t, gr in zip((x, w, b, a), grads):
            assert gr is None or (gr.shape == t.shape and torch.count_nonzero(gr) == 0)
    want = {"mean": torch.tensor(float("nan")), "sum": torch.tensor(0.0), "none": torch.zeros(3)}[reduction]
    for out in outs:
        assert torch.equal(out.cpu().isnan(), want.isnan()) and torch.equal(out.cpu().nan_to_num(), want.nan_to_num())
    m = L.L2SoftmaxLoss(12, 5, sample_rate=0.1, backend=backend).to(device)
    assert torch.isnan(m(x, y)) and m.last_sampled.numel() == 1  # one random class, all rows ignored
    assert m(x[:0], y[:0]).isnan()  # an empty batch: NaN as torch


def test_generator_state_resumes_exactly():
    """A module's own generator (Partial FC's sample, ElasticFace's margins) is saved in the state_dict and
    restored on load: the draws after a resume are the draws the saved run would have made."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 8), torch.randint(0, 30, (6,))
    for make in (lambda: L.L2SoftmaxLoss(8, 30, sample_rate=0.3), lambda: L.ElasticFaceLoss(8, 30)):
        m = make()
        assert "generator_state" not in m.state_dict()  # torch's default generator: not the module's to save
        m.generator = torch.Generator().manual_seed(3)
        m(x, y)
        sd = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in m.state_dict().items()}
        assert sd["generator_state"].dtype == torch.uint8
        ahead = [m(x, y) for _ in range(3)]
        fresh = make()  # no generator: gets one from the checkpoint
        fresh.load_state_dict(sd)
        assert fresh.generator is not None
        again = [fresh(x, y) for _ in range(3)]
        assert all(torch.equal(p, q) for p, q in zip(ahead, again))
        other = make()
        other.generator = torch.Generator().manual_seed(99)  # an existing generator is set, not replaced
        g = other.generator
        other.load_state_dict(sd)
        assert other.generator is g and torch.equal(other(x, y), ahead[0])
