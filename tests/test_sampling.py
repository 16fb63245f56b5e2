"""Partial FC sampling (l2sm_kernels.sampling.partial_fc_sample) with ignore_index and at the shard
edges: which classes enter the sample; the single-process loss with sub-centers on the sampled
classes; and Partial FC together with sub-centers in the class-parallel loss (2 gloo processes,
tests/test_class_parallel.py's harness) against the single-process op and the float64 reference
(docs/conventions.md, "Accuracy relation")."""
import pytest
import torch
import torch.distributed as dist

import l2sm_kernels as L
import l2sm_kernels.distributed as LD
from l2sm_kernels.sampling import partial_fc_sample
from l2sm_kernels.testing import assert_accurate

from conftest import is_slow, supports_fp64
from test_class_parallel import _close_groups, _spawn  # noqa: F401 (the fixture closes the shared processes)


def _positives(target, class_start, n, ignore_index):
    return sorted({int(t) - class_start for t in target.tolist()
                   if t != ignore_index and class_start <= t < class_start + n})


# ---------------------------------------------------------------------------------------------
# which classes enter the sample
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ignore_index", [-100, 12, 17, 30])
def test_positives_exactly_with_a_tiny_rate(ignore_index):
    """A shard [10, 20): its positives are the targets in [10, 20) other than ignore_index (a class of
    the shard, of another shard, or none); 9 and 20 (one outside each edge) are not this shard's, 10
    and 19 are. With int(q n) = 0 the sample is exactly the positives."""
    target = torch.tensor([9, 10, 12, 12, 19, 20, 17, 30, -100, 14, 9, 20])
    want = _positives(target, 10, 10, ignore_index)
    assert 0 in want and 9 in want and (2 in want) == (ignore_index != 12) and (7 in want) == (ignore_index != 17)
    idx = partial_fc_sample(target, 10, 10, 0.01, ignore_index=ignore_index,
                            generator=torch.Generator().manual_seed(0))
    assert idx.dtype == torch.int64 and idx.tolist() == want


@pytest.mark.parametrize("rate", [0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_sample_size_and_content(rate, ignore_index):
    """max(int(q n), positives) distinct sorted local indices containing every positive (and the
    ignored class only as a random pick); the same generator seed gives the same sample, other seeds
    other samples (the random part is drawn, not fixed)."""
    n = 23
    target = torch.tensor([3, 3, 5, 0, 22, 3, -100, 11, 40, 5])  # 40: another shard's (class_start 0)
    pos = _positives(target, 0, n, ignore_index)
    samples = []
    for seed in range(6):
        idx = partial_fc_sample(target, 0, n, rate, ignore_index=ignore_index,
                                generator=torch.Generator().manual_seed(seed))
        got = idx.tolist()
        assert len(got) == max(int(rate * n), len(pos)), (rate, got)
        assert got == sorted(set(got)) and all(0 <= v < n for v in got)
        assert set(pos) <= set(got)
        again = partial_fc_sample(target, 0, n, rate, ignore_index=ignore_index,
                                  generator=torch.Generator().manual_seed(seed))
        assert torch.equal(again, idx)
        samples.append(tuple(got))
    if rate < 0.9:
        assert len(set(samples)) > 1
        # the ignored class 3 is not forced in: some sample leaves it out
        assert ignore_index != 3 or any(3 not in s for s in samples)


def test_more_positives_than_the_rate():
    target = torch.arange(30) % 20 + 5
    idx = partial_fc_sample(target, 5, 20, 0.2, generator=torch.Generator().manual_seed(1))
    assert idx.tolist() == list(range(20))
    idx = partial_fc_sample(target[:7], 5, 20, 0.5, generator=torch.Generator().manual_seed(1))
    assert len(idx) == 10 and set(range(7)) <= set(idx.tolist())


# ---------------------------------------------------------------------------------------------
# the single-process loss on the sample, with sub-centers and a valid class as ignore_index
# ---------------------------------------------------------------------------------------------
def _subproblem(w, t, sampled, K, ignore_index):
    rows = (sampled[:, None] * K + torch.arange(K)).reshape(-1)
    sub_t = torch.where(t == ignore_index, torch.full_like(t, -100), torch.searchsorted(sampled, t.clamp_min(0)))
    return w[rows], sub_t, rows


@pytest.mark.parametrize("K", [1, 3])
def test_single_process_partial_fc_subcenters(backend, device, K):
    """L2SoftmaxLoss(sample_rate=0.6, subcenters=K, ignore_index=2): the loss and gradients equal the
    float64 reference on the sampled classes (all K sub-centers of each), the targets renumbered into
    the sample, rows of class 2 ignored; unsampled weight rows get exactly zero gradient."""
    C, D, B = 17, 8, 9
    dtype = torch.float64 if supports_fp64(backend) else torch.float32
    torch.manual_seed(0)
    head = L.L2SoftmaxLoss(D, C, alpha=12.0, normalize_weight=True, margin_type="arcface", margin=0.4,
                           subcenters=K, ignore_index=2, sample_rate=0.6, reduction="sum", backend=backend,
                           dtype=dtype).to(device)
    head.generator = torch.Generator(device=device).manual_seed(4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, D, generator=g, dtype=dtype).to(device).requires_grad_(True)
    t = torch.tensor([2, 5, 16, 0, 2, 9, 5, 11, 13]).to(device)
    out = head(x, t)
    gx, gw = torch.autograd.grad(out, [x, head.weight])
    sampled = head.last_sampled.cpu()
    assert len(sampled) == int(0.6 * C) and {0, 5, 9, 11, 13, 16} <= set(sampled.tolist())
    sub_w, sub_t, rows = _subproblem(head.weight.detach().cpu(), t.cpu(), sampled, K, 2)

    def ref(upcast):
        xr = x.detach().cpu().double().requires_grad_(True) if upcast else x.detach().cpu().requires_grad_(True)
        wr = sub_w.double().requires_grad_(True) if upcast else sub_w.clone().requires_grad_(True)
        loss = L.l2_softmax_loss_ref(xr, wr, sub_t, 12.0, normalize_weight=True, margin_type="arcface", margin=0.4,
                                     subcenters=K, reduction="sum", upcast=upcast)
        return (loss.detach(),) + torch.autograd.grad(loss, [xr, wr])

    r, p = ref(True), ref(False)
    assert_accurate("loss", out.detach().cpu(), r[0], p[0], dtype)
    assert_accurate("grad x", gx.cpu(), r[1], p[1], dtype)
    assert_accurate("grad weight (sampled rows)", gw.cpu()[rows], r[2], p[2], dtype)
    unsampled = torch.ones(C * K, dtype=torch.bool)
    unsampled[rows] = False
    assert bool((gw.cpu()[unsampled] == 0).all())


# ---------------------------------------------------------------------------------------------
# class-parallel: Partial FC with sub-centers against the single-process op
# ---------------------------------------------------------------------------------------------
SHARDS, BATCH, K_SUB, DIM = [9, 14], [5, 6], 2, 8


def _work_pfc_subcenters(rank, world, backend, dtype, rate, ignore_index):
    C, Bg = sum(SHARDS), sum(BATCH)
    g = torch.Generator().manual_seed(21)
    x = torch.randn(Bg, DIM, generator=g, dtype=torch.float64)
    w = torch.randn(C * K_SUB, DIM, generator=g, dtype=torch.float64) * 0.3
    t = torch.randint(0, C, (Bg,), generator=g)
    t[[1, 7]] = ignore_index if ignore_index != -100 else -100
    t[[3, 8]] = torch.tensor([0, C - 1])  # the first and last class of the matrix are targets
    x, w = x.to(dtype), w.to(dtype)
    go = torch.randn(Bg, generator=g, dtype=torch.float64)
    kw = dict(normalize_weight=True, margin_type="combined", margin=(1.0, 0.3, 0.1), label_smoothing=0.1,
              reduction="none", subcenters=K_SUB)
    r0, r1 = sum(BATCH[:rank]), sum(BATCH[: rank + 1])
    c0, c1 = sum(SHARDS[:rank]), sum(SHARDS[: rank + 1])
    xl = x[r0:r1].clone().requires_grad_(True)
    wl = w[c0 * K_SUB:c1 * K_SUB].clone().requires_grad_(True)
    out = LD.class_parallel_l2_softmax_loss(xl, wl, t[r0:r1], c0, 12.0, backend=backend, batch_sizes=BATCH,
                                            sample_rate=rate, ignore_index=ignore_index,
                                            generator=torch.Generator().manual_seed(50 + rank), **kw)
    gx, gw = torch.autograd.grad(out, [xl, wl], go.to(out))

    mine = partial_fc_sample(t, c0, c1 - c0, rate, ignore_index=ignore_index,
                             generator=torch.Generator().manual_seed(50 + rank))
    every = [None] * world
    dist.all_gather_object(every, (mine + c0).tolist())
    sampled = torch.tensor(sorted(sum(every, [])), dtype=torch.long)
    assert set(t[t != ignore_index].tolist()) <= set(sampled.tolist())
    if rate < 0.3:  # exactly the positives: the ignored class is not among them
        assert ignore_index not in sampled.tolist() and len(mine) == len(set(t[t != ignore_index].tolist()) &
                                                                        set(range(c0, c1)))
    sub_w, sub_t, rows = _subproblem(w, t, sampled, K_SUB, ignore_index)

    def single(fn, dt):
        xs = x.detach().to(dt).requires_grad_(True)
        ws = sub_w.detach().to(dt).requires_grad_(True)
        loss = fn(xs, ws, sub_t, 12.0, **kw)
        return (loss.detach(),) + torch.autograd.grad(loss, [xs, ws], go.to(loss))

    op = single(lambda *a, **k: L.l2_softmax_loss(*a, backend=backend, **k), dtype)
    ref = single(lambda *a, **k: L.l2_softmax_loss_ref(*a, upcast=True, **k), torch.float64)
    plain = single(lambda *a, **k: L.l2_softmax_loss_ref(*a, upcast=False, **k), dtype)
    full_w = [torch.zeros(C * K_SUB, DIM, dtype=v[2].dtype).index_copy_(0, rows, v[2]) for v in (op, ref, plain)]
    name = f"rank {rank} rate {rate} ignore_index {ignore_index}"
    for base in (op, plain):
        assert_accurate(f"loss [{name}]", out.detach(), ref[0], base[0], dtype)
        assert_accurate(f"grad x [{name}]", gx, ref[1][r0:r1], base[1][r0:r1], dtype)
    for base in (full_w[0], full_w[2]):
        assert_accurate(f"grad weight [{name}]", gw, full_w[1][c0 * K_SUB:c1 * K_SUB],
                        base[c0 * K_SUB:c1 * K_SUB], dtype)
    unsampled = torch.ones(C * K_SUB, dtype=torch.bool)
    unsampled[rows] = False
    assert bool((gw[unsampled[c0 * K_SUB:c1 * K_SUB]] == 0).all()), name
    assert bool((gw[~unsampled[c0 * K_SUB:c1 * K_SUB]] != 0).any()), name


@pytest.mark.parametrize("rate,ignore_index", [(0.3, -100), (0.6, 4), (0.1, 4), (0.2, 15)])
def test_class_parallel_partial_fc_subcenters(backend, rate, ignore_index):
    """2 ranks, shards of 9 and 14 classes, K = 2 sub-centers, a combined margin with label smoothing,
    uneven batches; ignore_index a class of rank 0's shard, of rank 1's, or -100. At rates 0.1 and 0.2
    the shard holding the ignored class samples exactly its positives (int(q n) is below their
    count), so the ignored class is in the sample only if it was wrongly forced in."""
    dtype = torch.float64 if supports_fp64(backend) else torch.float32
    if is_slow(backend) and rate != 0.1:
        pytest.skip("interpreted backend: one case")
    _spawn(_work_pfc_subcenters, 2, backend, dtype, rate, ignore_index)
