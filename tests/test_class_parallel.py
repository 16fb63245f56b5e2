"""Class-parallel loss (l2sm_kernels.distributed) in 2 and 3 gloo processes on CPU, against the
single-process op on the concatenated batch and the full matrix, and the float64 reference.

The processes (torch.multiprocessing spawn, gloo on a free port of 127.0.0.1) start once per world
size and serve every test of this file; each test runs many cases inside them. Every rank builds the
same full problem from a seed, takes its slices, runs the distributed loss, and checks its own
gradient slices with the accuracy relation (docs/conventions.md): err(distributed) <= 2 err(single-process op) +
atol, both errors against the float64 reference (in float64 that is the reference's atol, 1e-10 of
the largest value: no loosened tolerance). fp16 / bf16 features' gradient adds exactly the rounding
the op boundary applies to each rank's contribution (l2sm_kernels/testing/rank_rounding.py).
"""
import itertools
import math
import os
import queue
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import l2sm_kernels as L
import l2sm_kernels.distributed as LD
import l2sm_kernels.distributed.class_parallel as LDC
from l2sm_kernels.testing.rank_rounding import assert_accurate_rank_sum
from l2sm_kernels.testing import assert_accurate

from conftest import is_slow, supports_fp64

MARGINS = [("none", 0.0), ("cosface", 0.35), ("arcface", 0.5)]
AXES = dict(margin=MARGINS, normalize_weight=[False, True], bias=[False, True], label_smoothing=[0.0, 0.1],
            ignore_rows=[0, 2], reduction=["mean", "sum", "none"], alpha_grad=[False, True])
ALL_COMBOS = [dict(zip(AXES, v)) for v in itertools.product(*AXES.values())]
# strided subsets in which every pair of option values still appears together (test_subsets_cover_pairs)
SUBSETS = dict(world2=ALL_COMBOS[0::5], partial_fc=ALL_COMBOS[1::11], float32=ALL_COMBOS[3::13],
               half=ALL_COMBOS[2::13])
# a covering handful for the interpreted triton backend (every value of every axis appears)
FEW_COMBOS = [
    dict(margin=MARGINS[0], normalize_weight=False, bias=False, label_smoothing=0.0, ignore_rows=0,
         reduction="mean", alpha_grad=False),
    dict(margin=MARGINS[1], normalize_weight=True, bias=True, label_smoothing=0.1, ignore_rows=2,
         reduction="none", alpha_grad=True),
    dict(margin=MARGINS[2], normalize_weight=True, bias=False, label_smoothing=0.1, ignore_rows=0,
         reduction="sum", alpha_grad=True),
]
LAYOUTS = {2: dict(shards=[9, 14], batch=[5, 5], uneven_batch=[3, 6]),
           3: dict(shards=[5, 11, 7], batch=[4, 4, 4], uneven_batch=[2, 5, 3])}
D = 8


# ---------------------------------------------------------------------------------------------
# process harness
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank, world, port, tasks, results):
    """A worker process: join the gloo group, then run fn(rank, world, *args) for each task."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            fn(rank, world, *args)
            results.put((rank, None))
        except BaseException:  # noqa: BLE001 - everything goes back to the test
            results.put((rank, traceback.format_exc()))
    dist.barrier()
    dist.destroy_process_group()


class _Group:
    """`world` gloo processes on 127.0.0.1 that stay up across tests (starting processes that import
    torch is most of the cost on a 2-core machine). A failing or hanging task ends the group; the
    next test starts a fresh one."""

    def __init__(self, world):
        ctx = mp.get_context("spawn")
        self.world = world
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        port = _free_port()
        self.procs = [ctx.Process(target=_serve, args=(r, world, port, self.tasks[r], self.results), daemon=True)
                      for r in range(world)]
        for p in self.procs:
            p.start()

    def alive(self):
        return all(p.is_alive() for p in self.procs)

    def run(self, fn, *args, timeout=240):
        for q in self.tasks:
            q.put((fn, args))
        deadline = time.monotonic() + timeout
        done = set()
        while len(done) < self.world:
            try:
                rank, err = self.results.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue.Empty:
                self.close(force=True)
                raise AssertionError(f"{fn.__name__}: no answer from ranks {sorted(set(range(self.world)) - done)} "
                                     f"within {timeout} s") from None
            if err is not None:
                self.close(force=True)
                raise AssertionError(f"{fn.__name__} failed on rank {rank} of {self.world}:\n{err}")
            done.add(rank)

    def close(self, force=False):
        if not force:
            for q in self.tasks:
                q.put(None)
            for p in self.procs:
                p.join(timeout=30)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join()


_GROUPS = {}


@pytest.fixture(scope="module", autouse=True)
def _close_groups():
    yield
    for g in _GROUPS.values():
        g.close()
    _GROUPS.clear()


def _spawn(fn, world, *args):
    """Run fn(rank, world, *args) on every rank of a `world`-process gloo group; a failure on any
    rank fails the test with that rank's traceback."""
    g = _GROUPS.get(world)
    if g is None or not g.alive():
        g = _GROUPS[world] = _Group(world)
    g.run(fn, *args)


# ---------------------------------------------------------------------------------------------
# one case: the full problem on every rank, this rank's slices, the comparison
# ---------------------------------------------------------------------------------------------
def _problem(combo, shards, batch, dtype, seed, targets_from=None, wdtype=None):
    """Full inputs (leaves) for the single-process op; targets_from: restrict targets to these classes."""
    g = torch.Generator().manual_seed(seed)
    wdtype = wdtype or dtype
    C, Bg = sum(shards), sum(batch)
    x = torch.randn(Bg, D, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(C, D, generator=g, dtype=torch.float64) * 0.3).to(wdtype)
    b = (torch.randn(C, generator=g, dtype=torch.float64) * 0.5).to(wdtype) if combo["bias"] else None
    pool = torch.arange(C) if targets_from is None else torch.as_tensor(targets_from)
    t = pool[torch.randint(0, len(pool), (Bg,), generator=g)]
    if combo["ignore_rows"]:
        rows = torch.randperm(Bg, generator=g)[: combo["ignore_rows"]]
        t[rows] = -100
    adt = torch.float64 if dtype == torch.float64 else torch.float32
    alpha = torch.tensor(12.0, dtype=adt) if combo["alpha_grad"] else 12.0
    go = torch.randn(Bg, generator=g, dtype=torch.float64) if combo["reduction"] == "none" \
        else torch.tensor(3.0, dtype=torch.float64)
    return x, w, b, t, alpha, go


def _kwargs(combo):
    mt, m = combo["margin"]
    return dict(normalize_weight=combo["normalize_weight"], margin_type=mt, margin=m,
                label_smoothing=combo["label_smoothing"], reduction=combo["reduction"])


def _grads(out, go, leaves):
    names = [k for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    gs = torch.autograd.grad(out, [leaves[k] for k in names], go.to(out), allow_unused=True)
    return dict(zip(names, gs))


def _leaf(t, grad=True, upcast=False):
    if not isinstance(t, torch.Tensor):
        return t
    return (t.detach().double() if upcast else t.detach().clone()).requires_grad_(grad)


def _single(fn, x, w, b, t, alpha, go, upcast=False, **kw):
    """fn on fresh leaves (float64 copies with upcast: the reference's gradients are not rounded)."""
    leaves = {k: _leaf(v, upcast=upcast) for k, v in dict(x=x, weight=w, bias=b, alpha=alpha).items()}
    out = fn(leaves["x"], leaves["weight"], t, leaves["alpha"], leaves["bias"], **kw)
    return out.detach(), _grads(out, go, leaves)


def _check(rank, combo, shards, batch, dtype, backend, seed, *, batch_sizes=None, targets_from=None,
           sample_rate=1.0, tag="", wdtype=None):
    """Distributed vs single-process vs float64 reference for one case; returns this rank's loss."""
    x, w, b, t, alpha, go = _problem(combo, shards, batch, dtype, seed, targets_from, wdtype)
    kw = _kwargs(combo)
    r0, r1 = sum(batch[:rank]), sum(batch[: rank + 1])
    c0, c1 = sum(shards[:rank]), sum(shards[: rank + 1])
    leaves = dict(x=_leaf(x[r0:r1]), weight=_leaf(w[c0:c1]), bias=_leaf(b[c0:c1] if b is not None else None),
                  alpha=_leaf(alpha))
    gen = torch.Generator().manual_seed(1000 + rank)
    out = LD.class_parallel_l2_softmax_loss(leaves["x"], leaves["weight"], t[r0:r1], c0, leaves["alpha"],
                                            leaves["bias"], backend=backend, batch_sizes=batch_sizes,
                                            sample_rate=sample_rate, generator=gen, **kw)
    got = _grads(out, go, leaves)
    out = out.detach()

    sub_w, sub_b, sub_t, sampled = w, b, t, None
    if sample_rate < 1.0:
        # the classes every rank sampled (the same draw: same generator seed), as one sub-problem
        mine = LD.partial_fc_sample(t, c0, c1 - c0, sample_rate, generator=torch.Generator().manual_seed(1000 + rank))
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, (mine + c0).tolist())
        sampled = torch.tensor(sorted(sum(every, [])), dtype=torch.long)
        assert set(t[t != -100].tolist()) <= set(sampled.tolist()), "a positive class was not sampled"
        sub_w = w[sampled]
        sub_b = b[sampled] if b is not None else None
        sub_t = torch.where(t == -100, t, torch.searchsorted(sampled, t))
    single, sg = _single(lambda *a, **k: L.l2_softmax_loss(*a, backend=backend, **k), x, sub_w, sub_b, sub_t, alpha,
                         go, **kw)
    ref, rg = _single(lambda *a, **k: L.l2_softmax_loss_ref(*a, upcast=True, **k), x, sub_w, sub_b, sub_t, alpha, go,
                      upcast=True, **kw)
    name = f"{tag} rank {rank} {combo} {dtype} {wdtype or dtype}"
    assert out.dtype == single.dtype, name
    assert out.shape == single.shape, name
    assert_accurate(f"loss [{name}]", out, ref, single, dtype)

    def full_rows(g_sub, n):  # a gradient of the sampled rows, scattered back to all n classes
        if sampled is None:
            return g_sub
        full = g_sub.new_zeros((n,) + tuple(g_sub.shape[1:]))
        full[sampled] = g_sub
        return full

    for k, g in got.items():
        assert g is not None, f"no gradient for {k} [{name}]"
        assert g.dtype == leaves[k].dtype and g.shape == leaves[k].shape, f"grad {k} [{name}]"
        if k == "x":
            want, plain = rg[k][r0:r1], sg[k][r0:r1]
        elif k in ("weight", "bias"):
            want, plain = full_rows(rg[k], w.shape[0])[c0:c1], full_rows(sg[k], w.shape[0])[c0:c1]
        else:
            want, plain = rg[k], sg[k]
        if k == "x" and dtype in (torch.float16, torch.bfloat16):
            assert_accurate_rank_sum(f"grad x [{name}]", g, want, plain, x, sub_w, sub_t, alpha, sub_b, go, shards,
                                     (r0, r1), kw)
        else:
            assert_accurate(f"grad {k} [{name}]", g, want, plain, dtype if k == "alpha" else leaves[k].dtype)
        if sampled is not None and k in ("weight", "bias"):
            unsampled = torch.ones(c1 - c0, dtype=torch.bool)
            unsampled[sampled[(sampled >= c0) & (sampled < c1)] - c0] = False
            assert bool((g[unsampled] == 0).all()), f"grad {k}: unsampled rows must get exactly 0 [{name}]"
    return out


# ---------------------------------------------------------------------------------------------
# workers (module level: spawn pickles them by name)
# ---------------------------------------------------------------------------------------------
def _work_options(rank, world, backend, dtype, combos, wdtype=None):
    lay = LAYOUTS[world]
    for i, combo in enumerate(combos):
        # alternate equal and uneven batch sizes; every 4th case: one shard owns none of the targets
        uneven = i % 2 == 1
        batch = lay["uneven_batch"] if uneven else lay["batch"]
        shards = lay["shards"]
        targets_from = list(range(shards[0])) + list(range(sum(shards[:2]), sum(shards))) if i % 4 == 3 else None
        _check(rank, combo, shards, batch, dtype, backend, seed=i, batch_sizes=batch if uneven else None,
               targets_from=targets_from, tag=f"case {i}", wdtype=wdtype)


def _work_special(rank, world, backend, dtype):
    combo = dict(margin=MARGINS[2], normalize_weight=True, bias=True, label_smoothing=0.1, ignore_rows=1,
                 reduction="mean", alpha_grad=True)
    # a rank whose shard holds no class at all (uneven split with an empty shard)
    shards = [0, 13] + ([6] if world == 3 else [])
    _check(rank, combo, shards, [4] * world, dtype, backend, seed=1, tag="empty shard")
    # the feature gradient through gloo's reduce_scatter instead of all_reduce, uneven batches
    LDC.GLOO_FEATURE_GRAD = "reduce_scatter"
    try:
        lay = LAYOUTS[world]
        _check(rank, combo, lay["shards"], lay["uneven_batch"], dtype, backend, seed=2,
               batch_sizes=lay["uneven_batch"], tag="reduce_scatter")
        _check(rank, dict(combo, reduction="none"), lay["shards"], lay["batch"], dtype, backend, seed=3,
               tag="reduce_scatter")
    finally:
        LDC.GLOO_FEATURE_GRAD = "all_reduce"
    # every row ignored: mean is NaN as torch's, sum is 0 with zero gradients
    lay = LAYOUTS[world]
    x = torch.randn(lay["batch"][rank], D, dtype=dtype, requires_grad=True)
    w = torch.randn(lay["shards"][rank], D, dtype=dtype, requires_grad=True)
    t = torch.full((lay["batch"][rank],), -100)
    start = sum(lay["shards"][:rank])
    assert math.isnan(float(LD.class_parallel_l2_softmax_loss(x, w, t, start, backend=backend)))
    out = LD.class_parallel_l2_softmax_loss(x, w, t, start, backend=backend, reduction="sum")
    out.backward()
    assert float(out) == 0.0 and bool((x.grad == 0).all()) and bool((w.grad == 0).all())
    # no_grad, and features that do not require grad (frozen backbone) with a weight that does
    combo = dict(combo, alpha_grad=False)
    xf, wf, bf, tf, _, _ = _problem(combo, lay["shards"], lay["batch"], dtype, 5)
    r0, r1 = sum(lay["batch"][:rank]), sum(lay["batch"][: rank + 1])
    c0, c1 = sum(lay["shards"][:rank]), sum(lay["shards"][: rank + 1])
    kw = _kwargs(combo)
    with torch.no_grad():
        a = LD.class_parallel_l2_softmax_loss(xf[r0:r1], wf[c0:c1], tf[r0:r1], c0, 12.0, bf[c0:c1],
                                              backend=backend, **kw)
    ref = L.l2_softmax_loss_ref(xf, wf, tf, 12.0, bf, **kw)
    assert_accurate("no_grad loss", a, ref, L.l2_softmax_loss(xf, wf, tf, 12.0, bf, backend=backend, **kw), dtype)
    wl = wf[c0:c1].clone().requires_grad_(True)
    out = LD.class_parallel_l2_softmax_loss(xf[r0:r1], wl, tf[r0:r1], c0, 12.0, bf[c0:c1], backend=backend, **kw)
    out.backward()
    wfull = wf.clone().requires_grad_(True)
    L.l2_softmax_loss_ref(xf, wfull, tf, 12.0, bf, **kw).backward()
    wplain = wf.clone().requires_grad_(True)
    L.l2_softmax_loss(xf, wplain, tf, 12.0, bf, backend=backend, **kw).backward()
    assert_accurate("frozen features: grad weight", wl.grad, wfull.grad[c0:c1], wplain.grad[c0:c1], dtype)


def _work_partial_fc(rank, world, backend, dtype, combos):
    lay = LAYOUTS[world]
    for i, combo in enumerate(combos):
        rate = (0.3, 0.5, 0.8)[i % 3]
        uneven = i % 2 == 1
        batch = lay["uneven_batch"] if uneven else lay["batch"]
        _check(rank, combo, lay["shards"], batch, dtype, backend, seed=100 + i,
               batch_sizes=batch if uneven else None, sample_rate=rate, tag=f"partial fc {rate}")
    # more positives than int(rate * n): every positive is kept, and nothing else
    t = torch.arange(sum(lay["batch"])) % sum(lay["shards"])
    c0, n = sum(lay["shards"][:rank]), lay["shards"][rank]
    idx = LD.partial_fc_sample(t, c0, n, 0.01, generator=torch.Generator().manual_seed(0))
    mine = sorted({int(v) - c0 for v in t if c0 <= v < c0 + n})
    assert idx.tolist() == mine
    idx = LD.partial_fc_sample(t, c0, n, 0.5, generator=torch.Generator().manual_seed(0))
    assert idx.numel() == max(int(0.5 * n), len(mine)) and set(mine) <= set(idx.tolist())
    assert idx.tolist() == sorted(set(idx.tolist()))


def _work_module(rank, world, backend, tmpdir):
    torch.manual_seed(0)  # equal default RNG on every rank: the shards must still differ
    kw = dict(alpha=10.0, learn_alpha=True, bias=True, normalize_weight=True, margin_type="cosface", margin=0.2,
              label_smoothing=0.1)
    C = 23
    head = LD.ClassParallelL2SoftmaxLoss(D, C, backend=backend, dtype=torch.float64, seed=7, **kw)
    assert head.num_local == LD.shard_sizes(C, world)[rank] and head.class_start == sum(LD.shard_sizes(C, world)[:rank])
    with torch.no_grad():
        head.bias.copy_(torch.randn(head.num_local, dtype=torch.float64))
    full = head.full_state_dict()
    assert full["weight"].shape == (C, D) and full["bias"].shape == (C,)
    # the full matrix does not depend on the number of ranks, and shards of equally seeded ranks differ
    from l2sm_kernels.distributed import ClassParallelL2SoftmaxLoss as CP
    rows = []
    for block in range(0, C, CP.INIT_BLOCK):
        g = torch.Generator().manual_seed((7 * 1_000_003 + block // CP.INIT_BLOCK) % (2 ** 63))
        bound = 1 / math.sqrt(D)
        rows.append(torch.rand(CP.INIT_BLOCK, D, generator=g, dtype=torch.float64) * (2 * bound) - bound)
    assert torch.equal(full["weight"], torch.cat(rows)[:C])
    # a single-process L2SoftmaxLoss loads it and gives the same loss and gradients
    single = L.L2SoftmaxLoss(D, C, backend=backend, dtype=torch.float64, **kw)
    single.load_state_dict(full)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4 * world, D, generator=g, dtype=torch.float64)
    t = torch.randint(0, C, (4 * world,), generator=g)
    xs = x.clone().requires_grad_(True)
    ls = single(xs, t)
    ls.backward()
    xd = x[4 * rank: 4 * rank + 4].clone().requires_grad_(True)
    ld = head(xd, t[4 * rank: 4 * rank + 4])
    ld.backward()
    c0, c1 = head.class_start, head.class_start + head.num_local
    assert abs(float(ld) - float(ls)) <= 1e-12 * abs(float(ls))
    for got, want in ((xd.grad, xs.grad[4 * rank: 4 * rank + 4]), (head.weight.grad, single.weight.grad[c0:c1]),
                      (head.bias.grad, single.bias.grad[c0:c1]),
                      # single-process: alpha = alpha_min + exp(alpha_raw): dL/d alpha = dL/d alpha_raw / (alpha - alpha_min)
                      (head.alpha.grad, single.alpha_raw.grad / (single.alpha.detach() - single.alpha_min))):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)
    # save on rank 0 only, load into a module with another split
    part = head.full_state_dict(dst=0)
    assert (part is None) == (rank != 0)
    path = os.path.join(tmpdir, "full.pt")
    if rank == 0:
        assert torch.equal(part["weight"], full["weight"])
        torch.save(part, path)
    dist.barrier()
    sizes = [C - 2 * (world - 1)] + [2] * (world - 1)
    other = LD.ClassParallelL2SoftmaxLoss(D, C, shard_sizes=sizes, backend=backend, dtype=torch.float64, seed=1, **kw)
    other.load_full_state_dict(torch.load(path, mmap=True))
    c0 = sum(sizes[:rank])
    assert torch.equal(other.weight, full["weight"][c0: c0 + sizes[rank]])
    assert torch.equal(other.bias, full["bias"][c0: c0 + sizes[rank]])
    assert float(other.alpha) == float(head.alpha)
    assert "shard=" in repr(other)
    # Partial FC through the module: last_sampled holds this rank's global class indices
    pfc = LD.ClassParallelL2SoftmaxLoss(D, C, sample_rate=0.5, backend=backend, dtype=torch.float64, seed=7, **kw)
    loss = pfc(x[4 * rank: 4 * rank + 4], t[4 * rank: 4 * rank + 4], generator=torch.Generator().manual_seed(rank))
    loss.backward()
    s = pfc.last_sampled
    assert bool(((s >= pfc.class_start) & (s < pfc.class_start + pfc.num_local)).all())
    mine = {int(v) for v in t if pfc.class_start <= v < pfc.class_start + pfc.num_local}
    assert mine <= set(s.tolist())
    nz = (pfc.weight.grad != 0).any(dim=1).nonzero().flatten() + pfc.class_start
    assert set(nz.tolist()) <= set(s.tolist())


def _work_errors(rank, world):
    lay = LAYOUTS[world]
    B, shards = lay["batch"][rank], lay["shards"]
    c0 = sum(shards[:rank])
    x = torch.randn(B, D)
    w = torch.randn(shards[rank], D)
    t = torch.zeros(B, dtype=torch.long)
    # every rank raises the same error (no rank is left waiting in a collective)
    bad_t = t.clone()
    if rank == world - 1:
        bad_t[1] = sum(shards)
    C = sum(shards)
    with pytest.raises(ValueError, match=rf"target\[1\] on rank {world - 1} = {C} is outside \[0, {C}\)"):
        LD.class_parallel_l2_softmax_loss(x, w, bad_t, c0, backend="eager")
    with pytest.raises(ValueError, match=r"shards \[class_start, class_start \+ n\) must tile"):
        LD.class_parallel_l2_softmax_loss(x, w, t, c0 + (rank == 1), backend="eager")
    xb = torch.randn(B + (rank == 0), D)
    with pytest.raises(ValueError, match=r"batch sizes are .* expected equal batch sizes"):
        LD.class_parallel_l2_softmax_loss(xb, w, torch.zeros(xb.shape[0], dtype=torch.long), c0, backend="eager")
    # local argument errors, raised before any collective
    for kw, exc, match in [
        (dict(weight_shard=torch.randn(3, D + 1)), ValueError, r"weight_shard must have shape \(shard_classes, 8\)"),
        (dict(class_start=-1), ValueError, r"class_start must be an int >= 0"),
        (dict(sample_rate=0.0), ValueError, r"sample_rate must be in \(0, 1\]"),
        (dict(batch_sizes=[1] * world), ValueError, r"batch_sizes must list"),
        (dict(bias_shard=torch.randn(shards[rank] + 1)), ValueError, r"bias_shard must have shape"),
        (dict(reduction="avg"), ValueError, r"reduction must be one of"),
        (dict(margin_type="sphereface"), ValueError, r"margin_type must be one of"),
    ]:
        args = dict(features=x, weight_shard=w, target=t, class_start=c0, backend="eager")
        args.update(kw)
        with pytest.raises(exc, match=match):
            LD.class_parallel_l2_softmax_loss(**args)
    with pytest.raises(ValueError, match=r"shard_sizes must give"):
        LD.ClassParallelL2SoftmaxLoss(D, 10, shard_sizes=[5] * (world + 1))


# ---------------------------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------------------------
def _dtype_and_combos(backend):
    if is_slow(backend):
        return torch.float32, FEW_COMBOS
    return (torch.float64 if supports_fp64(backend) else torch.float32), ALL_COMBOS


@pytest.mark.parametrize("world", [2, 3])
def test_every_option_matches_single_process(backend, world):
    """Every combination of the options (288), uneven shards, equal and uneven batches, a rank whose
    shard holds none of the targets; loss and all gradient slices against the single-process op."""
    dtype, combos = _dtype_and_combos(backend)
    _spawn(_work_options, world, backend, dtype, combos if world == 3 or is_slow(backend) else SUBSETS["world2"])


@pytest.mark.parametrize("world", [2, 3])
def test_float32_matches_single_process(backend, world):
    """float32 inputs: the distributed loss is as accurate as the single-process op (same relation)."""
    if is_slow(backend):
        pytest.skip("the interpreted backend runs float32 in test_every_option_matches_single_process")
    _spawn(_work_options, world, backend, torch.float32, SUBSETS["float32"])


@pytest.mark.parametrize("world", [2, 3])
def test_half_features_match_single_process(backend, world):
    """bf16 / fp16 features with fp32 class weights (mixed precision): as accurate as the
    single-process op; the feature gradient's sum over the ranks is rounded to bf16 once."""
    if is_slow(backend):
        pytest.skip("covered in float32 for the interpreted backend")
    dtype = torch.bfloat16 if world == 2 else torch.float16
    try:
        L.backends.resolve(backend, "cpu", (dtype, torch.float32))
    except ValueError as e:
        pytest.skip(str(e))
    _spawn(_work_options, world, backend, dtype, SUBSETS["half"], torch.float32)


@pytest.mark.parametrize("world", [2, 3])
def test_special_cases(backend, world):
    """An empty shard, gloo reduce_scatter, every row ignored, no_grad, frozen features."""
    dtype = torch.float64 if supports_fp64(backend) else torch.float32
    _spawn(_work_special, world, backend, dtype)


@pytest.mark.parametrize("world", [2, 3])
def test_partial_fc(backend, world):
    """Partial FC: the loss and gradients equal the single-process op on the sampled classes; the
    unsampled rows get exactly zero gradient; every positive class is sampled."""
    dtype, combos = _dtype_and_combos(backend)
    _spawn(_work_partial_fc, world, backend, dtype, SUBSETS["partial_fc"] if not is_slow(backend) else combos[:2])


def test_module_save_load(backend, tmp_path):
    if not supports_fp64(backend):
        pytest.skip("compares float64 modules")
    _spawn(_work_module, 3, backend, str(tmp_path))


def _pairs(combos):
    return {p for c in combos for p in itertools.combinations(sorted((k, str(v)) for k, v in c.items()), 2)}


def test_subsets_cover_pairs():
    for name, sub in SUBSETS.items():
        assert _pairs(sub) == _pairs(ALL_COMBOS), f"subset {name} misses a pair of option values"


def test_errors():
    _spawn(_work_errors, 2)


def test_needs_init():
    with pytest.raises(RuntimeError, match="torch.distributed initialized"):
        LD.class_parallel_l2_softmax_loss(torch.randn(2, 3), torch.randn(4, 3), torch.zeros(2, dtype=torch.long), 0)
