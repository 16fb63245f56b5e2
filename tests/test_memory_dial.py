"""The memory dial max_logits_bytes (docs/memory_dial.md): accepted and checked by every entry point
(the functional op, the module, the heads, the class-parallel loss), passed through the op boundary to
every backend."""
import math

import numpy as np
import pytest
import torch

import l2sm_kernels as L
from l2sm_kernels import heads
from l2sm_kernels.options import MAX_LOGITS_BYTES, L2SMOptions
from l2sm_kernels.testing import make_case

# (value, exception): the error names the argument
BAD_BUDGETS = [(-1, ValueError), (-(2**40), ValueError), (1.0, TypeError), (1.5, TypeError),
               (math.nan, TypeError), (math.inf, TypeError), (True, TypeError), (False, TypeError),
               ("1024", TypeError), (torch.tensor(8), TypeError), (np.float64(8.0), TypeError)]


@pytest.mark.parametrize("value,exc", BAD_BUDGETS, ids=[repr(v) for v, _ in BAD_BUDGETS])
def test_bad_budget_refused_everywhere(value, exc):
    c = make_case(4, 8, 5, grad=False)
    before = [t.clone() for t in (c.x, c.weight, c.target)]
    with pytest.raises(exc, match="max_logits_bytes"):
        L.l2_softmax_loss(c.x, c.weight, c.target, backend="eager", max_logits_bytes=value)
    with pytest.raises(exc, match="max_logits_bytes"):
        L.L2SoftmaxLoss(8, 5, max_logits_bytes=value)
    with pytest.raises(exc, match="max_logits_bytes"):
        heads.ArcFaceLoss(8, 5, max_logits_bytes=value)
    with pytest.raises(exc, match="max_logits_bytes"):
        L.L2SoftmaxLoss(8, 5).set_max_logits_bytes(value)
    with pytest.raises(exc, match="max_logits_bytes"):
        L2SMOptions(max_logits_bytes=value)
    for a, b in zip(before, (c.x, c.weight, c.target)):
        assert torch.equal(a, b)


def test_good_budgets_normalized():
    assert L2SMOptions().max_logits_bytes is None
    assert L2SMOptions(max_logits_bytes=0).max_logits_bytes == 0
    v = L2SMOptions(max_logits_bytes=np.int64(4096)).max_logits_bytes
    assert v == 4096 and type(v) is int
    assert L2SMOptions(max_logits_bytes=2**80).max_logits_bytes == MAX_LOGITS_BYTES  # "all", fits the schema's int


def test_budget_reaches_the_op(monkeypatch):
    """The functional API, the module and a head hand the budget to the backend's op as its last option
    (after eps and negatives: contract.py's schema)."""
    from l2sm_kernels import loss as loss_mod
    from l2sm_kernels.backends.contract import N_INPUTS, N_OPTS

    seen = []
    real = loss_mod.ops_for

    def spy_ops_for(name):
        fwd, bwd = real(name)

        def fwd_spy(*args):
            seen.append(args[N_INPUTS + N_OPTS - 1])  # the op's input tensors, then the options: the budget last
            return fwd(*args)

        return fwd_spy, bwd

    monkeypatch.setattr(loss_mod, "ops_for", spy_ops_for)
    c = make_case(4, 8, 5, grad=False)
    L.l2_softmax_loss(c.x, c.weight, c.target, backend="eager", max_logits_bytes=123)
    L.l2_softmax_loss(c.x, c.weight, c.target, backend="eager")
    m = L.L2SoftmaxLoss(8, 5, backend="eager", max_logits_bytes=7)
    m(c.x, c.target)
    m.set_max_logits_bytes(0)
    m(c.x, c.target)
    heads.CosFaceLoss(8, 5, backend="eager", max_logits_bytes=11)(c.x, c.target)
    assert seen == [123, None, 7, 0, 11]


def test_budget_not_in_checkpoints():
    """A memory setting, not a property of the loss: a checkpoint loads whatever budget either side has."""
    a = L.L2SoftmaxLoss(8, 5, max_logits_bytes=0)
    b = L.L2SoftmaxLoss(8, 5)
    assert "max_logits_bytes" not in a.get_extra_state()["options"]
    b.load_state_dict(a.state_dict())
    assert "max_logits_bytes=0" in repr(a) and "max_logits_bytes" not in repr(b)


def test_class_parallel_takes_the_budget(tmp_path):
    """The class-parallel loss and module check the budget and hand it to the shard's op (one process,
    a gloo group of one)."""
    import torch.distributed as dist

    from l2sm_kernels.distributed import ClassParallelL2SoftmaxLoss, class_parallel_l2_softmax_loss

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        c = make_case(4, 8, 5, grad=False)
        with pytest.raises(ValueError, match="max_logits_bytes"):
            class_parallel_l2_softmax_loss(c.x, c.weight, c.target, 0, max_logits_bytes=-1)
        with pytest.raises(TypeError, match="max_logits_bytes"):
            ClassParallelL2SoftmaxLoss(8, 5, max_logits_bytes=0.5, seed=0)
        m = ClassParallelL2SoftmaxLoss(8, 5, max_logits_bytes=64, seed=0, backend="cpu")
        assert m.options.max_logits_bytes == 64
        want = L.l2_softmax_loss(c.x, m.weight, c.target, m.alpha, backend="cpu")
        for budget in (0, 64, None, 1 << 20):
            m.options = L2SMOptions(max_logits_bytes=budget)
            got = m(c.x, c.target)
            torch.testing.assert_close(got, want)
            got2 = class_parallel_l2_softmax_loss(c.x, m.weight, c.target, 0, m.alpha, backend="cpu",
                                                  max_logits_bytes=budget)
            torch.testing.assert_close(got2, want)
    finally:
        dist.destroy_process_group()
