"""torch.compile with values users schedule (reliability case 28): a margin warm-up or a label-smoothing
schedule changes a float every step. Under torch.compile(dynamic=True, fullgraph=True) the loss must
trace (no math.isfinite / float() on symbolic floats), and a schedule must not recompile every step:
a 0-d tensor costs no recompilation at all; a Python float at most one more (dynamo specializes the
first value, then traces it symbolically; label smoothing 0 -> non-zero is one more)."""
import pytest
import torch
import torch._dynamo.testing

import l2sm_kernels as L
from l2sm_kernels.testing import max_err

from conftest import is_slow


def _inputs(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 12, generator=g).to(device).requires_grad_(True)
    w = torch.randn(17, 12, generator=g).to(device).requires_grad_(True)
    y = torch.randint(0, 17, (8,), generator=g).to(device)
    return x, w, y


@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "default"])
@pytest.mark.parametrize("kind", ["float", "tensor"])
@pytest.mark.parametrize("what", ["margin", "label_smoothing", "combined"])
def test_schedule_compiles_a_bounded_number_of_times(backend, device, dynamic, kind, what):
    if is_slow(backend):
        pytest.skip("torch.compile of an interpreted triton op fails in fake tracing; runs on the GPU")
    x, w, y = _inputs(device)

    def loss_fn(x, w, y, v):
        if what == "margin":
            kw = dict(margin_type="cosface", margin=v)
        elif what == "label_smoothing":
            kw = dict(label_smoothing=v)
        else:
            kw = dict(margin_type="combined", margin=(1.0, v, 0.1))
        return L.l2_softmax_loss(x, w, y, 16.0, normalize_weight=True, backend=backend, **kw)

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(loss_fn, backend=counter, fullgraph=True, dynamic=dynamic)
    for step in range(6):
        v = 0.05 + 0.05 * step
        if kind == "tensor":
            v = torch.tensor(v, dtype=torch.float64)
        out = compiled(x, w, y, v)
        ref = loss_fn(x, w, y, v)
        assert max_err(out, ref) <= 1e-5 * float(ref.abs())
        gx, = torch.autograd.grad(out, [x])
        rx, = torch.autograd.grad(ref, [x])
        assert max_err(gx, rx) <= 1e-5 * float(rx.abs().max())
    assert counter.frame_count <= (1 if kind == "tensor" else 2), counter.frame_count


def test_module_schedule_under_compile(backend, device):
    """A module whose margin follows a warm-up schedule through set_margin(tensor)."""
    if is_slow(backend):
        pytest.skip("torch.compile of an interpreted triton op fails in fake tracing; runs on the GPU")
    x, _, y = _inputs(device)
    head = L.L2SoftmaxLoss(12, 17, normalize_weight=True, margin_type="arcface", margin=0.0, backend=backend).to(device)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    step = torch.compile(lambda x, y: head(x, y), backend=counter, fullgraph=True)
    for i in range(5):
        head.set_margin(torch.tensor(0.1 * (i + 1), dtype=torch.float64, device=device))
        out = step(x, y)
        assert max_err(out, head(x, y)) <= 1e-5 * float(out.abs())
    assert counter.frame_count <= 2  # options are read from the module: one guard set per new options object
