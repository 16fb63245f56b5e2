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
from l2sm_kernels.testing import check_case, make_case, run
from l2sm_kernels.testing.accuracy import _detached, run_reference

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


# ---------------------------------------------------------------------------------------------
# backend cpu: the kept products (csrc/chunking.h, kept_rows)
# ---------------------------------------------------------------------------------------------
CPU_INFO = L.available_backends()["cpu"]
needs_cpu = pytest.mark.skipif(not CPU_INFO.available, reason=f"backend cpu unavailable: {CPU_INFO.reason}")


def _budget(case, rows, esize=4):
    """The budget that keeps `rows` rows of the case's products (plus a few bytes: not a multiple)."""
    return rows * case.weight.shape[0] * esize + 3


@pytest.fixture
def chunk():
    from l2sm_kernels import cpu

    old = cpu.get_chunk_classes()
    yield cpu.set_chunk_classes
    cpu.set_chunk_classes(old)


@needs_cpu
def test_kept_rows_python_mirrors_cpp():
    from l2sm_kernels import cpu

    assert cpu._ext().DEFAULT_MAX_LOGITS_BYTES == cpu.DEFAULT_MAX_LOGITS_BYTES
    for B, C, K, es, budget in [(9, 37, 1, 4, 0), (9, 37, 1, 4, 147), (9, 37, 1, 4, 148), (9, 37, 2, 8, 10**6),
                                (0, 5, 1, 4, None), (256, 65536, 1, 4, None), (256, 1 << 20, 1, 4, None),
                                (5, 0, 1, 4, 100), (3, 4, 1, 4, MAX_LOGITS_BYTES)]:
        for bf16 in (False, True):
            want = cpu._ext().kept_rows(B, C, K, es, budget, bf16)
            assert cpu.kept_rows(B, C, K, es, budget, bf16) == want, (B, C, K, es, budget, bf16)
    assert cpu.kept_rows(9, 37, 1, 4, 148) == 1 and cpu.kept_rows(256, 65536, 1, 4, None) == 256
    assert cpu.kept_rows(256, 1 << 20, 1, 4, None) == 64  # the default keeps 256 MiB: a quarter of these rows
    assert cpu.kept_rows(256, 65536, 1, 4, None, bf16_inputs=True) == 0  # bf16 GEMMs: recomputing is cheaper
    assert cpu.kept_rows(256, 65536, 1, 4, 1 << 30, bf16_inputs=True) == 256  # an explicit budget holds


@needs_cpu
@pytest.mark.parametrize("rows", [0, 4, 9])
def test_aux_carries_the_kept_rows(rows):
    """The forward op returns q and the kept block in aux, as the fake kernel says (opcheck), and keeps
    nothing when no gradient is asked for."""
    c = make_case(9, 20, 37, subcenters=2)
    budget = _budget(c, rows)
    args = (c.x.detach(), c.weight.detach(), c.target, torch.tensor(16.0), None) + L2SMOptions(
        subcenters=2, max_logits_bytes=budget).op_arguments(9, "cpu")
    fwd = torch.ops.l2sm.cpu_forward.default
    _, _, aux = fwd(*args, True, True, False, False)
    assert aux.shape == (9 + rows * 74,)
    _, _, aux = fwd(*args, False, False, False, False)
    assert aux.shape == (9,)
    torch.library.opcheck(fwd, args + (True, True, False, False))


COMBO_SUBSET = None


def _combos():
    """The all-pairs subset of test_l2_softmax.py's option matrix (every pair of option values once)."""
    global COMBO_SUBSET
    if COMBO_SUBSET is None:
        import test_l2_softmax as T

        COMBO_SUBSET = T._pairwise_combos()
    return COMBO_SUBSET


@needs_cpu
@pytest.mark.parametrize("rows", [0, 4, 9], ids=["none", "partial", "all"])
@pytest.mark.parametrize("i", range(12))
def test_option_matrix_with_budget(rows, i, chunk):
    """Every pair of option values (margins incl. per-row, sub-centers, bias, smoothing, ignored rows,
    reductions, alpha as a tensor) against the float64 reference with none, some (4 of 9 rows) and all
    of the products kept; a chunk of 7 classes (not dividing C = 37) so that several chunks are kept."""
    import test_l2_softmax as T

    combos = _combos()
    for combo in combos[i::12]:
        case = T._case_from_combo(combo, "cpu")
        chunk(7)
        check_case(case, "cpu", T._grad_output(case), op_kwargs={"max_logits_bytes": _budget(case, rows)})


@needs_cpu
@pytest.mark.parametrize("rows", [0, 3, 7])
def test_gradcheck_float64_with_budget(rows, chunk):
    """float64 gradcheck (x, W, bias, alpha) with arcface, sub-centers, smoothing and an ignored row,
    none / some / all rows kept."""
    chunk(5)
    g = torch.Generator().manual_seed(5)
    B, D, C, K = 7, 6, 13, 2
    x = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C * K, D, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(C, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, C, (B,), generator=g)
    t[2] = -100
    budget = rows * C * K * 8

    def f(x, w, b, a):
        return L.l2_softmax_loss(x, w, t, a, b, normalize_weight=True, margin_type="arcface", margin=0.3,
                                 subcenters=K, label_smoothing=0.1, reduction="none", backend="cpu",
                                 max_logits_bytes=budget)

    assert torch.autograd.gradcheck(f, (x, w, b, a), eps=1e-6, atol=1e-6)


@needs_cpu
def test_backward_with_other_chunks_and_threads_than_forward(chunk):
    """The kept block's layout (rows of the batch x every row of W) does not depend on the chunk size or
    the thread split, so a backward run with other settings than its forward is still right."""
    case = make_case(10, 16, 53, bias=True, alpha_grad=True, normalize_weight=True, margin_type="cosface",
                     margin=0.2, reduction="none")
    go = torch.randn(10, generator=torch.Generator().manual_seed(2))
    ref_out, ref_grads = run_reference(case, True, go)
    threads = torch.get_num_threads()
    for fwd_chunk, bwd_chunk, bwd_threads in [(7, 0, threads), (0, 5, 1), (16, 3, 2)]:
        c = _detached(case, upcast=False)
        chunk(fwd_chunk)
        out = L.l2_softmax_loss(c.x, c.weight, c.target, c.alpha, c.bias, backend="cpu", max_logits_bytes=_budget(c, 6),
                                **c.kwargs)
        chunk(bwd_chunk)
        torch.set_num_threads(bwd_threads)
        try:
            grads = torch.autograd.grad(out, list(c.leaves().values()), go)
        finally:
            torch.set_num_threads(threads)
        for (k, want), got in zip(ref_grads.items(), grads):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5, msg=k)


@needs_cpu
def test_retain_graph_reuses_the_kept_block():
    """Backward twice (retain_graph) gives the same gradients: the kept block is read, never consumed."""
    case = make_case(8, 12, 29, normalize_weight=True)
    c = _detached(case, upcast=False)
    out = L.l2_softmax_loss(c.x, c.weight, c.target, backend="cpu", max_logits_bytes=_budget(c, 5), **c.kwargs)
    g1 = torch.autograd.grad(out, [c.x, c.weight], retain_graph=True)
    g2 = torch.autograd.grad(out, [c.x, c.weight])
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@needs_cpu
@pytest.mark.parametrize("share", [0, 0.25, 1.0])
def test_peak_memory_within_budget(share):
    """Forward + backward allocate at most max_logits_bytes + 24 MiB beyond the inputs and gradients
    (the chunk workspace, vectors), with B x C = 51 MB of products; and what is kept is really held
    (the peak exceeds the budget's share of it minus a little)."""
    from l2sm_kernels.testing import cpu_peak_bytes

    B, D, C = 64, 32, 200_000
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, D, generator=g).requires_grad_()
    w = torch.randn(C, D, generator=g).requires_grad_()
    t = torch.randint(0, C, (B,), generator=g)
    budget = int(share * B * C * 4)

    def step():
        L.l2_softmax_loss(x, w, t, backend="cpu", normalize_weight=True, max_logits_bytes=budget).backward()

    step()
    x.grad = w.grad = None
    peak = cpu_peak_bytes(step) - (x.numel() + w.numel()) * 4
    assert peak <= budget + (24 << 20), (peak, budget)
    assert peak >= budget * 0.9, (peak, budget)


@needs_cpu
def test_backward_reads_the_kept_block():
    """The backward takes rows [0, R) from the block in aux instead of recomputing them: overwriting the
    block changes those rows' gradient and no other (so an implementation that silently recomputed
    everything, or read the wrong rows, fails here while every accuracy test passes)."""
    c = make_case(6, 10, 23, normalize_weight=True)
    x, w = c.x.detach(), c.weight.detach()
    R = 2
    opts = L2SMOptions(normalize_weight=True, max_logits_bytes=_budget(c, R))
    args = (x, w, c.target, torch.tensor(16.0), None) + opts.op_arguments(6, "cpu")
    needs = (True, False, False, False)
    fwd, bwd = torch.ops.l2sm.cpu_forward.default, torch.ops.l2sm.cpu_backward.default
    loss, lse, aux = fwd(*args, *needs)
    assert aux.numel() == 6 + R * 23

    from l2sm_kernels.backends.contract import N_INPUTS

    def dx(aux):  # the backward takes the forward's input tensors, then lse and aux, then the options
        return bwd(torch.ones(6), torch.zeros(6), *args[:N_INPUTS], lse, aux, *args[N_INPUTS:], *needs)[0]

    good = dx(aux)
    bad = aux.clone()
    bad[6:] = 0.0  # the kept products of rows 0 and 1
    changed = (dx(bad) - good).abs().amax(dim=1) > 0
    assert changed.tolist() == [True, True, False, False, False, False]


@needs_cpu
@pytest.mark.parametrize("rows", [0, 4, 9], ids=["none", "partial", "all"])
def test_bf16_products_with_budget(rows, chunk):
    """bf16 features and weights: the products by bf16 GEMM (rounded where plain torch's bf16 formula
    rounds) meet the accuracy relation on the all-pairs option subset, with none, some or all rows
    kept; the fp32 products (set_bf16_gemm(False)) too, and the two differ (the bf16 path runs)."""
    import test_l2_softmax as T
    from l2sm_kernels import cpu

    chunk(7)
    assert cpu.get_bf16_gemm()
    for combo in _combos()[::3]:
        case = T._case_from_combo(combo, "cpu", dtype=torch.bfloat16)
        check_case(case, "cpu", T._grad_output(case), op_kwargs={"max_logits_bytes": _budget(case, rows)})
    case = make_case(9, 32, 37, dtype=torch.bfloat16, bias=True, normalize_weight=True, margin_type="arcface",
                     margin=0.4, reduction="none")
    go = torch.randn(9, generator=torch.Generator().manual_seed(1))
    kw = {"max_logits_bytes": _budget(case, rows)}
    lp_out, lp_grads = run(case, "cpu", go, kw)
    try:
        cpu.set_bf16_gemm(False)
        check_case(case, "cpu", go, op_kwargs=kw)
        f32_out, f32_grads = run(case, "cpu", go, kw)
    finally:
        cpu.set_bf16_gemm(True)
    assert not torch.equal(lp_out, f32_out) and not torch.equal(lp_grads["weight"], f32_grads["weight"])
    with pytest.raises(TypeError, match="set_bf16_gemm takes a bool"):
        cpu.set_bf16_gemm(1)


@needs_cpu
def test_default_budget():
    """None keeps up to 256 MiB of fp32 products, nothing for bf16 features and weights (bf16 GEMMs
    recompute faster than kept products are written and read back), an explicit budget either way."""
    fwd = torch.ops.l2sm.cpu_forward.default
    for dt, want in ((torch.float32, 6 + 6 * 23), (torch.bfloat16, 6), (torch.float64, 6 + 6 * 23)):
        c = make_case(6, 10, 23, dtype=dt)
        for budget, rows in ((None, None), (_budget(c, 6, 8), 6)):
            args = (c.x.detach(), c.weight.detach(), c.target, torch.tensor(16.0), None) + L2SMOptions(
                max_logits_bytes=budget).op_arguments(6, "cpu")
            aux = fwd(*args, True, True, False, False)[2]
            assert aux.numel() == (want if rows is None else 6 + rows * 23), (dt, budget)
            torch.library.opcheck(fwd, args + (True, True, False, False))
