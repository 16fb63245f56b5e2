"""Class-parallel loss (l2sm_kernels.distributed) in 2 and 3 gloo processes on CPU, against the
single-process op on the concatenated batch and the full matrix, and the float64 reference.

The processes (torch.multiprocessing spawn, gloo on a free port of 127.0.0.1) start once per world
size and serve every test of this file; each test runs many cases inside them. Every rank builds the
same full problem from a seed, takes its slices, runs the distributed loss, and checks its own
gradient slices with the accuracy relation (docs/conventions.md): err(distributed) <= 2 err(single-process op) +
atol, both errors against the float64 reference (in float64 that is the reference's atol, 1e-10 of
the largest value: no loosened tolerance), and again with plain torch's error in the working dtype
(l2_softmax_loss_ref(upcast=False), the baseline of docs/conventions.md) in place of the
single-process op's, so that an error the single-process op shares cannot pass. fp16 / bf16
features' gradient adds exactly the rounding the op boundary applies to each rank's contribution
(l2sm_kernels/testing/rank_rounding.py). The workers exit in the order docs/class_parallel.md prescribes and the
module's teardown fails unless every worker exits with status 0.
"""
import contextlib
import gc
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
import l2sm_kernels.distributed.collectives as LDX
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
# arcface's fallback region (target cosine below cos(pi - m)), every other axis covered
FALLBACK_COMBOS = [
    dict(margin=("arcface", 0.5), normalize_weight=True, bias=False, label_smoothing=0.0, ignore_rows=0,
         reduction="mean", alpha_grad=False),
    dict(margin=("arcface", 0.5), normalize_weight=False, bias=True, label_smoothing=0.1, ignore_rows=2,
         reduction="none", alpha_grad=True),
    dict(margin=("arcface", 1.2), normalize_weight=True, bias=True, label_smoothing=0.1, ignore_rows=1,
         reduction="sum", alpha_grad=True),
    dict(margin=("arcface", 1.2), normalize_weight=False, bias=False, label_smoothing=0.0, ignore_rows=0,
         reduction="mean", alpha_grad=False),
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
    """A worker process: join the gloo group, then run fn(rank, world, *args) for each task.

    The exit order is the one docs/class_parallel.md ("A clean exit") prescribes (docs/reliability.md,
    case 30): the tasks' objects are unreachable, every rank passes a barrier, gc.collect() frees
    DDP's reference cycles (whose C++ Reducer holds the group), and destroy_process_group() drops the
    group through its Python object before the interpreter exits."""
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
        del task, fn, args
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


class _Group:
    """`world` gloo processes on 127.0.0.1 that stay up across tests (starting processes that import
    torch is most of the cost on a 2-core machine). A failing or hanging task ends the group; the
    next test starts a fresh one."""

    def __init__(self, world):
        ctx = mp.get_context("spawn")
        self.world, self.forced = world, False
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
        """Stop the workers; returns their exit codes (0: a clean exit; -9: killed after hanging 30 s)."""
        self.forced = self.forced or force
        if not force:
            for q in self.tasks:
                q.put(None)
            for p in self.procs:
                p.join(timeout=30)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join()
        return [p.exitcode for p in self.procs]


_GROUPS = {}


@pytest.fixture(scope="module", autouse=True)
def _close_groups():
    yield
    codes = {world: g.close() for world, g in _GROUPS.items() if not g.forced}  # not those a failure ended
    _GROUPS.clear()
    assert all(c == 0 for v in codes.values() for c in v), f"workers did not exit cleanly: exit codes {codes}"


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
def _problem(combo, shards, batch, dtype, seed, targets_from=None, wdtype=None, fallback=False):
    """Full inputs (leaves) for the single-process op; targets_from: restrict targets to these classes.
    fallback: the rows of even index that are not ignored get x_i close to -W_hat_y (row 0 exactly),
    so that their target cosine lies below cos(pi - m), arcface's fallback region; the weight rows
    then have norms in [1, 1.5] so that x_hat . W_y is below it without normalize_weight too."""
    g = torch.Generator().manual_seed(seed)
    wdtype = wdtype or dtype
    C, Bg = sum(shards), sum(batch)
    x = torch.randn(Bg, D, generator=g, dtype=torch.float64)
    w = torch.randn(C, D, generator=g, dtype=torch.float64) * 0.3
    b = (torch.randn(C, generator=g, dtype=torch.float64) * 0.5).to(wdtype) if combo["bias"] else None
    pool = torch.arange(C) if targets_from is None else torch.as_tensor(targets_from)
    t = pool[torch.randint(0, len(pool), (Bg,), generator=g)]
    if combo["ignore_rows"]:
        rows = torch.randperm(Bg, generator=g)[: combo["ignore_rows"]]
        t[rows] = -100
    if fallback:
        w = w / w.norm(dim=1, keepdim=True) * (1 + 0.5 * torch.rand(C, 1, generator=g, dtype=torch.float64))
        w_hat = w / w.norm(dim=1, keepdim=True)
        noise = 0.05 * torch.randn(Bg, D, generator=g, dtype=torch.float64)
        noise[0] = 0  # exactly opposite: cosine -1
        far = -(w_hat[t.clamp_min(0)] + noise) * x.norm(dim=1, keepdim=True)
        x = torch.where(((torch.arange(Bg) % 2 == 0) & (t != -100))[:, None], far, x)
    x, w = x.to(dtype), w.to(wdtype)
    adt = torch.float64 if dtype == torch.float64 else torch.float32
    alpha = torch.tensor(12.0, dtype=adt) if combo["alpha_grad"] else 12.0
    go = torch.randn(Bg, generator=g, dtype=torch.float64) if combo["reduction"] == "none" \
        else torch.tensor(3.0, dtype=torch.float64)
    return x, w, b, t, alpha, go


def _kwargs(combo):
    mt, m = combo["margin"]
    kw = dict(normalize_weight=combo["normalize_weight"], margin_type=mt, margin=m,
              label_smoothing=combo["label_smoothing"], reduction=combo["reduction"])
    if "negatives" in combo:
        kw["negatives"], kw["negatives_t"] = combo["negatives"]
    return kw


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
           sample_rate=1.0, tag="", wdtype=None, fallback=False, extra=None):
    """Distributed vs single-process vs float64 reference for one case; returns this rank's loss.
    extra: more arguments of the distributed call only (overlap_grad_reduce, grad_reduce_dtype)."""
    extra = extra or {}
    x, w, b, t, alpha, go = _problem(combo, shards, batch, dtype, seed, targets_from, wdtype, fallback)
    kw = _kwargs(combo)
    if fallback:  # the case does reach arcface's fallback region (target cosine < cos(pi - m))
        xd, wd = x.double(), w.double()
        wd = wd / wd.norm(dim=1, keepdim=True) if kw["normalize_weight"] else wd
        c = (xd / xd.norm(dim=1, keepdim=True) * wd[t.clamp_min(0)]).sum(dim=1)
        rows = (torch.arange(len(t)) % 2 == 0) & (t != -100)
        assert bool(rows.any()) and bool((c[rows] < math.cos(math.pi - kw["margin"])).all()), c
    r0, r1 = sum(batch[:rank]), sum(batch[: rank + 1])
    c0, c1 = sum(shards[:rank]), sum(shards[: rank + 1])
    leaves = dict(x=_leaf(x[r0:r1]), weight=_leaf(w[c0:c1]), bias=_leaf(b[c0:c1] if b is not None else None),
                  alpha=_leaf(alpha))
    gen = torch.Generator().manual_seed(1000 + rank)
    out = LD.class_parallel_l2_softmax_loss(leaves["x"], leaves["weight"], t[r0:r1], c0, leaves["alpha"],
                                            leaves["bias"], backend=backend, batch_sizes=batch_sizes,
                                            sample_rate=sample_rate, generator=gen, **kw, **extra)
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
    # plain torch in the working dtype: the baseline of the accuracy relation itself (docs/conventions.md),
    # so that the distributed loss is held to the float64 reference even where the single-process op errs
    # (with float64 inputs plain torch is the reference computation itself: its error is 0)
    if x.dtype == w.dtype == torch.float64:
        plain, pg = ref, rg
    else:
        plain, pg = _single(lambda *a, **k: L.l2_softmax_loss_ref(*a, upcast=False, **k), x, sub_w, sub_b, sub_t,
                            alpha, go, **kw)
    name = f"{tag} rank {rank} {combo} {dtype} {wdtype or dtype}"
    assert out.dtype == single.dtype, name
    assert out.shape == single.shape, name
    assert_accurate(f"loss [{name}]", out, ref, single, dtype)
    assert_accurate(f"loss vs plain torch [{name}]", out, ref, plain, dtype)

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
            want, bases = rg[k][r0:r1], (sg[k][r0:r1], pg[k][r0:r1])
        elif k in ("weight", "bias"):
            want, bases = full_rows(rg[k], w.shape[0])[c0:c1], (full_rows(sg[k], w.shape[0])[c0:c1],
                                                                 full_rows(pg[k], w.shape[0])[c0:c1])
        else:
            want, bases = rg[k], (sg[k], pg[k])
        for base, what in zip(bases, ("", " vs plain torch")):
            if k == "x" and dtype in (torch.float16, torch.bfloat16):
                # summed over the ranks in the features' dtype: each partial sum rounded too (< world roundings
                # of the sum of the contributions' magnitudes, on top of rounding each contribution once)
                roundings = dist.get_world_size() + 1 if extra.get("grad_reduce_dtype") == "features" else 1
                assert_accurate_rank_sum(f"grad x{what} [{name}]", g, want, base, x, sub_w, sub_t, alpha, sub_b, go,
                                         shards, (r0, r1), kw, roundings=roundings)
            else:
                assert_accurate(f"grad {k}{what} [{name}]", g, want, base, dtype if k == "alpha" else leaves[k].dtype)
        if sampled is not None and k in ("weight", "bias"):
            unsampled = torch.ones(c1 - c0, dtype=torch.bool)
            unsampled[sampled[(sampled >= c0) & (sampled < c1)] - c0] = False
            assert bool((g[unsampled] == 0).all()), f"grad {k}: unsampled rows must get exactly 0 [{name}]"
    return out


# ---------------------------------------------------------------------------------------------
# workers (module level: spawn pickles them by name)
# ---------------------------------------------------------------------------------------------
def _work_options(rank, world, backend, dtype, combos, wdtype=None, extra=None):
    lay = LAYOUTS[world]
    for i, combo in enumerate(combos):
        # alternate equal and uneven batch sizes; every 4th case: one shard owns none of the targets
        uneven = i % 2 == 1
        batch = lay["uneven_batch"] if uneven else lay["batch"]
        shards = lay["shards"]
        targets_from = list(range(shards[0])) + list(range(sum(shards[:2]), sum(shards))) if i % 4 == 3 else None
        _check(rank, combo, shards, batch, dtype, backend, seed=i, batch_sizes=batch if uneven else None,
               targets_from=targets_from, tag=f"case {i}", wdtype=wdtype, extra=extra)


def _work_special(rank, world, backend, dtype):
    combo = dict(margin=MARGINS[2], normalize_weight=True, bias=True, label_smoothing=0.1, ignore_rows=1,
                 reduction="mean", alpha_grad=True)
    # a rank whose shard holds no class at all (uneven split with an empty shard)
    shards = [0, 13] + ([6] if world == 3 else [])
    _check(rank, combo, shards, [4] * world, dtype, backend, seed=1, tag="empty shard")
    # the feature gradient through gloo's reduce_scatter instead of all_reduce, uneven batches
    LDX.GLOO_FEATURE_GRAD = "reduce_scatter"
    try:
        lay = LAYOUTS[world]
        _check(rank, combo, lay["shards"], lay["uneven_batch"], dtype, backend, seed=2,
               batch_sizes=lay["uneven_batch"], tag="reduce_scatter")
        _check(rank, dict(combo, reduction="none"), lay["shards"], lay["batch"], dtype, backend, seed=3,
               tag="reduce_scatter")
    finally:
        LDX.GLOO_FEATURE_GRAD = "all_reduce"
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
                      (head.alpha_raw.grad, single.alpha_raw.grad)):  # both alpha_min + exp(alpha_raw)
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
    assert float(other.alpha.detach()) == pytest.approx(float(head.alpha.detach()), rel=1e-6)
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


def _work_curricularface(rank, world, backend, dtype):
    """ClassParallelCurricularFaceLoss: t the same on every rank and equal to the single-process head's
    (the global batch's mean target cosine), loss and feature gradients too, over two training steps."""
    C = 23
    head = LD.ClassParallelCurricularFaceLoss(D, C, backend=backend, dtype=dtype, seed=7)
    single = L.CurricularFaceLoss(D, C, backend=backend, dtype=dtype)
    with torch.no_grad():
        single.weight.copy_(head.full_state_dict()["weight"])
    g = torch.Generator().manual_seed(4)
    for step in range(2):
        x = torch.randn(4 * world, D, generator=g, dtype=dtype) * 3
        t = torch.randint(0, C, (4 * world,), generator=g)
        t[1] = -100
        xs = x.clone().requires_grad_(True)
        ls = single(xs, t)
        ls.backward()
        xd = x[4 * rank: 4 * rank + 4].clone().requires_grad_(True)
        ld = head(xd, t[4 * rank: 4 * rank + 4])
        ld.backward()
        every = [None] * world
        dist.all_gather_object(every, float(head.t))
        assert len(set(every)) == 1, every  # bit-identical on every rank
        assert float(head.t) == pytest.approx(float(single.t), rel=1e-6, abs=1e-9), (step, float(head.t))
        assert float(head.t) != 0.0
        tol = 1e-8 if dtype == torch.float64 else 1e-4  # t is a float32 buffer: its sums may round apart
        assert abs(float(ld.detach()) - float(ls.detach())) <= tol * abs(float(ls.detach()))
        torch.testing.assert_close(xd.grad, xs.grad[4 * rank: 4 * rank + 4], rtol=tol, atol=tol)
    head.eval()
    before = float(head.t)
    head(x[4 * rank: 4 * rank + 4], t[4 * rank: 4 * rank + 4])
    assert float(head.t) == before


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


def _work_arcface_fallback(rank, world, backend, dtype, combos):
    """Rows whose target cosine is below cos(pi - m) (x close to -W_hat_y): arcface's fallback
    c - m sin(m) instead of cos(arccos(c) + m), against the float64 reference."""
    lay = LAYOUTS[world]
    for i, combo in enumerate(combos):
        batch = lay["uneven_batch"] if i % 2 else lay["batch"]
        _check(rank, combo, lay["shards"], batch, dtype, backend, seed=300 + i, batch_sizes=batch if i % 2 else None,
               tag="arcface fallback", fallback=True)


NEGATIVE_COMBOS = [dict(c, negatives=n) for c, n in zip(
    FEW_COMBOS * 2, [("mv", 1.2), ("curricular", 0.4), ("filter", 0.1), ("filter", 0.1), ("mv", 1.3),
                     ("curricular", 0.2)])]


def _work_negatives(rank, world, backend, dtype, combos):
    """The non-target transforms: each shard needs the row's margined target cosine from the shard
    that owns it ("mv", "curricular"); uneven batches, a shard owning none of the targets, Partial FC."""
    lay = LAYOUTS[world]
    for i, combo in enumerate(combos):
        uneven = i % 2 == 1
        batch = lay["uneven_batch"] if uneven else lay["batch"]
        shards = lay["shards"]
        targets_from = list(range(shards[0])) + list(range(sum(shards[:2]), sum(shards))) if i % 3 == 2 else None
        _check(rank, combo, shards, batch, dtype, backend, seed=40 + i, batch_sizes=batch if uneven else None,
               targets_from=targets_from, sample_rate=0.5 if i == 4 else 1.0, tag=f"negatives case {i}")


def _work_margin_family(rank, world, backend, dtype, extra=None):
    """Sub-centers (K = 1, 2, 3) with per-row margins (each rank passes its own rows' (B,) m2, m3),
    label smoothing on and off, a "detached" case: every rank's loss and gradient slices against the
    single-process op on the concatenated batch and the full matrix, and against the float64 reference."""
    lay = LAYOUTS[world]
    shards, batch = lay["shards"], lay["uneven_batch"]
    C, Bg = sum(shards), sum(batch)
    r0, r1 = sum(batch[:rank]), sum(batch[: rank + 1])
    c0, c1 = sum(shards[:rank]), sum(shards[: rank + 1])
    cases = [(1, 0.1, "exact"), (2, 0.0, "exact"), (3, 0.1, "exact"), (3, 0.1, "detached")]
    for i, (K, ls, mg) in enumerate(cases):
        g = torch.Generator().manual_seed(500 + i)
        x = torch.randn(Bg, D, generator=g, dtype=torch.float64)
        w = torch.randn(C * K, D, generator=g, dtype=torch.float64) * 0.3
        b = torch.randn(C, generator=g, dtype=torch.float64) * 0.2
        t = torch.randint(0, C, (Bg,), generator=g)
        t[1] = -100
        m2 = 0.2 + 0.4 * torch.rand(Bg, generator=g, dtype=torch.float64)
        m2[::4] = 0.0
        m3 = 0.3 * torch.rand(Bg, generator=g, dtype=torch.float64)
        go = torch.randn(Bg, generator=g, dtype=torch.float64)
        x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
        alpha = torch.tensor(10.0, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        common = dict(normalize_weight=True, margin_type="combined", label_smoothing=ls, subcenters=K,
                      margin_grad=mg, reduction="none")
        leaves = dict(x=_leaf(x[r0:r1]), weight=_leaf(w[c0 * K:c1 * K]), bias=_leaf(b[c0:c1]), alpha=_leaf(alpha))
        out = LD.class_parallel_l2_softmax_loss(leaves["x"], leaves["weight"], t[r0:r1], c0, leaves["alpha"],
                                                leaves["bias"], backend=backend, batch_sizes=batch,
                                                margin=(1.0, m2[r0:r1], m3[r0:r1]), **common, **(extra or {}))
        got = _grads(out, go, leaves)
        kw = dict(common, margin=(1.0, m2, m3))
        single, sg = _single(lambda *a, **k: L.l2_softmax_loss(*a, backend=backend, **k), x, w, b, t, alpha, go, **kw)
        ref, rg = _single(lambda *a, **k: L.l2_softmax_loss_ref(*a, upcast=True, **k), x, w, b, t, alpha, go,
                          upcast=True, **kw)
        name = f"rank {rank} K={K} ls={ls} {mg} {dtype}"
        assert_accurate(f"loss [{name}]", out.detach(), ref, single, dtype)
        for k, gk in got.items():
            if k == "x":
                want, base = rg[k][r0:r1], sg[k][r0:r1]
            elif k == "weight":
                want, base = rg[k][c0 * K:c1 * K], sg[k][c0 * K:c1 * K]
            elif k == "bias":
                want, base = rg[k][c0:c1], sg[k][c0:c1]
            else:
                want, base = rg[k], sg[k]
            assert gk is not None and gk.shape == leaves[k].shape, f"grad {k} [{name}]"
            assert_accurate(f"grad {k} [{name}]", gk, want, base, dtype if k == "alpha" else leaves[k].dtype)


def _work_meta_init(rank, world):
    """Meta-device construction, to_empty, reset_parameters: every parameter and buffer set, alpha
    included; the full matrix a function of one seed (rank 0's draw) whatever each rank's RNG."""
    C = 23
    g0 = torch.Generator().manual_seed(100)
    seed0 = int(torch.randint(0, 2 ** 62, (1,), generator=g0))  # rank 0's first draw after manual_seed(100)
    for learn_alpha, seed in ((False, None), (True, None), (True, 5)):
        with torch.device("meta"):
            m = LD.ClassParallelL2SoftmaxLoss(D, C, alpha=7.5, learn_alpha=learn_alpha, bias=True, seed=seed,
                                              dtype=torch.float64, backend="eager")
        assert m.weight.is_meta and m.bias.is_meta and m.alpha.is_meta
        m.to_empty(device="cpu")
        with torch.no_grad():  # what to_empty may leave behind
            for t in list(m.parameters()) + list(m.buffers()):
                t.fill_(math.nan)
        torch.manual_seed(100 + rank)  # every rank's RNG differs
        m.reset_parameters()
        assert m.learn_alpha == learn_alpha
        assert m.alpha.dtype == torch.float32 and float(m.alpha.detach()) == pytest.approx(7.5, rel=1e-6), m.alpha
        assert bool((m.bias == 0).all())
        full = m.full_state_dict()
        want = LD.ClassParallelL2SoftmaxLoss(D, C, alpha=7.5, bias=True, seed=seed0 if seed is None else seed,
                                             dtype=torch.float64, backend="eager").full_state_dict()
        assert torch.equal(full["weight"], want["weight"]), "the full matrix is not the one of rank 0's seed"
        alphas = [None] * world
        dist.all_gather_object(alphas, float(m.alpha.detach()))
        assert alphas == [alphas[0]] * world and alphas[0] == pytest.approx(7.5, rel=1e-6)
    # a seeded module: reset_parameters() reproduces the constructor's matrix and alpha
    m = LD.ClassParallelL2SoftmaxLoss(D, C, alpha=6.0, learn_alpha=True, seed=9, dtype=torch.float64)
    w0 = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
        m.alpha_raw.fill_(0.5)
    m.reset_parameters()
    assert torch.equal(m.weight, w0) and float(m.alpha.detach()) == pytest.approx(6.0, rel=1e-6)
    # an unseeded module: one seed for every rank, drawn anew by each reset
    torch.manual_seed(200 + rank)
    m = LD.ClassParallelL2SoftmaxLoss(D, C, dtype=torch.float64)
    seed1 = int(torch.randint(0, 2 ** 62, (1,), generator=torch.Generator().manual_seed(200)))
    want = LD.ClassParallelL2SoftmaxLoss(D, C, seed=seed1, dtype=torch.float64).full_state_dict()["weight"]
    assert torch.equal(m.full_state_dict()["weight"], want)


def _sum_hook(state, bucket):
    """A DDP communication hook that sums the ranks' gradients instead of averaging them."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])


class _Net(torch.nn.Module):
    def __init__(self, head):
        super().__init__()
        self.backbone = torch.nn.Linear(D, D, dtype=torch.float64)
        self.head = head

    def forward(self, x, y):
        return self.head(self.backbone(x), y)


def _work_ddp(rank, world, backend):
    """DistributedDataParallel around the head: refused before DDP broadcasts anything (the shards
    survive); allowed when DDP ignores the shard; the documented way (DDP around the backbone only)
    gives the single-process gradients (the backbone's with a summing communication hook)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    C, B = 6 * world, 4  # even shards: DDP's shape check passes, so only the refusal stops the broadcast
    kw = dict(alpha=10.0, learn_alpha=True, bias=True, normalize_weight=True, margin_type="arcface", margin=0.3,
              backend=backend, dtype=torch.float64)
    head = LD.ClassParallelL2SoftmaxLoss(D, C, seed=3, **kw)
    with torch.no_grad():
        head.bias.normal_(generator=torch.Generator().manual_seed(rank))
    w0, b0 = head.weight.detach().clone(), head.bias.detach().clone()
    with pytest.raises(RuntimeError, match=r"must not be wrapped in DistributedDataParallel.*Wrap the backbone"):
        DDP(head)
    torch.manual_seed(0)  # the same backbone on every rank
    net = _Net(head)
    with pytest.raises(RuntimeError, match=r"'head' must not be wrapped.*\['head.weight', 'head.bias'\]"):
        DDP(net)
    assert torch.equal(head.weight, w0) and torch.equal(head.bias, b0)

    # the global batch, and the single-process model on it (float64)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(B * world, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B * world,), generator=g)
    mine = slice(B * rank, B * (rank + 1))
    c0, c1 = head.class_start, head.class_start + head.num_local
    ref_net = _Net(L.L2SoftmaxLoss(D, C, **kw))
    ref_net.backbone.load_state_dict(net.backbone.state_dict())
    ref_net.head.load_state_dict(head.full_state_dict())
    ref_net(x, y).backward()

    def check(backbone_grad_scale):
        assert torch.equal(head.weight, w0) and torch.equal(head.bias, b0), "a shard was overwritten"
        torch.testing.assert_close(head.weight.grad, ref_net.head.weight.grad[c0:c1], rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(head.bias.grad, ref_net.head.bias.grad[c0:c1], rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(head.alpha_raw.grad, ref_net.head.alpha_raw.grad, rtol=1e-11, atol=1e-12)
        for p, q in zip(net.backbone.parameters(), ref_net.backbone.parameters()):
            torch.testing.assert_close(p.grad, q.grad * backbone_grad_scale, rtol=1e-11, atol=1e-12)
        net.zero_grad(set_to_none=True)

    # the head inside the wrapped model, its shard ignored by DDP: allowed; DDP averages the backbone's
    # gradients, and every rank's loss is the global one, so the backbone gets 1/world of its gradient
    DDP._set_params_and_buffers_to_ignore_for_model(net, ["head.weight", "head.bias"])
    ddp = DDP(net)
    ddp(x[mine], y[mine]).backward()
    check(1.0 / world)
    del ddp
    # the documented way: DDP around the backbone only, the head outside; a summing hook gives the
    # backbone the gradient of the global loss
    ddp = DDP(net.backbone)
    head(ddp(x[mine]), y[mine]).backward()
    check(1.0 / world)
    ddp.register_comm_hook(None, _sum_hook)
    head(ddp(x[mine]), y[mine]).backward()
    check(1.0)
    del ddp
    gc.collect()


def _work_disagree(rank, world):
    """Ranks that disagree (D, dtypes, options, alpha, requires_grad, batch_sizes, a local argument
    error on one rank): every rank raises the same ValueError, and the group stays usable."""
    lay = LAYOUTS[world]
    B, shards = lay["batch"][rank], lay["shards"]
    c0, n = sum(shards[:rank]), shards[rank]
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(B, D, generator=g)
    w = torch.randn(n, D, generator=g)
    t = torch.randint(0, sum(shards), (B,), generator=g)
    last = rank == world - 1

    def call(**kw):
        args = dict(features=x, weight_shard=w, target=t, class_start=c0, backend="eager")
        args.update(kw)
        return LD.class_parallel_l2_softmax_loss(**args)

    good = float(call())
    per_rank = {  # one rank differs from the others in one value
        r"the feature dimension D: \[8, .*9\]": dict(features=torch.randn(B, D + last),
                                                      weight_shard=torch.randn(n, D + last)),
        r"the features' dtype: \['torch.float32', .*'torch.float64'\]": dict(
            features=x.double() if last else x, weight_shard=w.double() if last else w),
        r"weight_shard's dtype": dict(weight_shard=w.double() if last else w),
        r"bias_shard \(its dtype, or None\): \['None', .*'torch.float32'\]": dict(
            bias_shard=torch.zeros(n) if last else None),
        r"label_smoothing: \[0.0, .*0.1\]": dict(label_smoothing=0.1 if last else 0.0),
        r"margin_type: \['none', .*'cosface'\]": dict(margin_type="cosface" if last else "none"),
        r"margin: \[0.2, .*0.3\]": dict(margin_type="arcface", margin=0.3 if last else 0.2),
        r"normalize_weight: \[0, .*1\]": dict(normalize_weight=last),
        r"ignore_index": dict(ignore_index=-1 if last else -100),
        r"eps": dict(eps=1e-6 if last else 1e-12),
        r"reduction: \['mean', .*'sum'\]": dict(reduction="sum" if last else "mean"),
        r"sample_rate: \[1.0, .*0.5\]": dict(sample_rate=0.5 if last else 1.0),
        r"alpha: \[16.0, .*12.0\]": dict(alpha=12.0 if last else 16.0),
        r"alpha: \[16.0, .*16.5\]": dict(alpha=torch.tensor(16.5 if last else 16.0)),
        r"alpha's dtype": dict(alpha=torch.tensor(16.0, dtype=torch.float64 if last else torch.float32)),
        r"alpha.requires_grad: \[0, .*1\]": dict(alpha=torch.tensor(16.0, requires_grad=last)),
        r"features.requires_grad: \[0, .*1\]": dict(features=x.clone().requires_grad_(last)),
        r"weight_shard.requires_grad": dict(weight_shard=w.clone().requires_grad_(last)),
        # the lists differ, each consistent with its own rank's batch size (rank 0 would pass its
        # local check and block in a collective)
        r"batch_sizes: the ranks passed different lists": dict(batch_sizes=lay["batch"][:-1] + [B + last]),
        r"batch_sizes: the ranks passed different lists \(lengths \[-1, ": dict(
            batch_sizes=lay["batch"] if rank else None),
        r"batch_sizes: the ranks passed different lists \(lengths \[": dict(
            batch_sizes=lay["batch"] + ([0] if last else [])),
    }
    for match, kw in per_rank.items():
        with pytest.raises(ValueError, match=match):
            call(**kw)
        assert float(call()) == good, "the group is out of step after a refused call"
    with torch.no_grad() if last else contextlib.nullcontext(), \
            pytest.raises(ValueError, match=r"grad mode \(torch.is_grad_enabled\(\)\): \[1, .*0\]"):
        call(features=x.clone().requires_grad_(True))
    # the same bad list on every rank: every rank raises the same message
    with pytest.raises(ValueError, match=rf"batch_sizes must list the {world} ranks' batch sizes: they are"):
        call(batch_sizes=[B + 1] * world)
    # a local argument error on one rank: that rank raises it, the others say which rank and why
    bad = dict(margin_type="sphereface") if last else {}
    match = (r"margin_type must be one of" if last else
             rf"rank {world - 1} of the group rejected its arguments.*ValueError: margin_type must be one of")
    with pytest.raises(ValueError, match=match):
        call(**bad)
    with pytest.raises(TypeError, match=r"target must be an int64 \(or int32\) tensor" if last else r"rejected its arguments"):
        call(target=t.float() if last else t)
    with pytest.raises(ValueError, match=r"batch_sizes\[i\] must be an int" if last else r"rejected its arguments"):
        call(batch_sizes=[-1] * world if last else None)
    # the module: the same check
    with pytest.raises(ValueError, match=r"the ranks disagree on label_smoothing"):
        LD.ClassParallelL2SoftmaxLoss(D, sum(shards), shard_sizes=shards, label_smoothing=0.1 * last, seed=0)(x, t)
    assert float(call()) == good


def _work_device_check(rank, world):
    """The CUDA-style agreement check (AGREEMENT = "device": the table on the first call, then one
    fixed-size all-gather compared on the device, no host read) under gloo: each mismatch of issue 23
    raises on every rank (the device assert's RuntimeError, or the rank's own argument error) before
    any collective whose size depends on it, and the group stays usable."""
    lay = LAYOUTS[world]
    B, shards = lay["batch"][rank], lay["shards"]
    c0, n = sum(shards[:rank]), shards[rank]
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(B, D, generator=g, requires_grad=True)
    w = torch.randn(n, D, generator=g, requires_grad=True)
    t = torch.randint(0, sum(shards), (B,), generator=g)
    last = rank == world - 1
    key = torch.nn.Module()  # the check_key a module passes: its own schedule

    def call(**kw):
        args = dict(features=x, weight_shard=w, target=t, class_start=c0, alpha=16.0, bias_shard=None, group=None,
                    normalize_weight=False, margin=0.0, margin_type="none", reduction="mean", ignore_index=-100,
                    label_smoothing=0.0, eps=1e-12, backend="eager", batch_sizes=None, sample_rate=1.0,
                    generator=None)
        args.update(kw)
        return LDC._class_parallel(args.pop("features"), args.pop("weight_shard"), args.pop("target"),
                                   args.pop("class_start"), args.pop("alpha"), args.pop("bias_shard"),
                                   check_key=key, **args)[0]

    LDC.AGREEMENT = "device"
    try:
        assert LDC._check_mode(torch.device("cpu"), key) == "table"
        good = float(call())  # the table, once
        assert LDC._check_mode(torch.device("cpu"), key) == "device", "the device check does not run"
        disagree = r"ranks of the class-parallel group disagree"
        m_rows = torch.full((B,), 0.2)
        cases = {
            "another batch size (batch_sizes=None)": (dict(features=torch.randn(B + last, D),
                                                           target=torch.zeros(B + last, dtype=torch.long)), None),
            # each list holds this rank's own size at its place: only the lists differ
            "different batch_sizes lists": (dict(batch_sizes=[b + (last and r != rank) for r, b in
                                                              enumerate(lay["batch"])]), None),
            "batch_sizes on one rank only": (dict(batch_sizes=lay["batch"] if last else None), None),
            "another per-row margin form": (dict(margin_type="cosface", margin=m_rows if last else 0.2), None),
            "another 0-d margin value": (dict(margin_type="cosface", margin=torch.tensor(0.2 + 0.1 * last)), None),
            "another option": (dict(label_smoothing=0.1 if last else 0.0), None),
            "another alpha": (dict(alpha=torch.tensor(16.0 + last)), None),
            "another requires_grad pattern": (dict(features=x.detach().requires_grad_(not last)), None),
            "another grad_reduce_dtype": (dict(grad_reduce_dtype="features" if last else "compute"), None),
            "an argument error on one rank": (dict(margin_type="sphereface" if last else "none"),
                                              r"margin_type must be one of"),
            "a batch_sizes list that misses this rank's size": (
                dict(batch_sizes=[b + last for b in lay["batch"]]), r"batch_sizes must list the"),
        }
        for what, (kw, own) in cases.items():
            match = own if (own and last) else disagree
            with pytest.raises((RuntimeError, ValueError), match=match):
                call(**kw)
            assert float(call()) == good, f"the group is out of step after: {what}"
        with torch.no_grad() if last else contextlib.nullcontext(), pytest.raises(RuntimeError, match=disagree):
            call()
        assert float(call()) == good
        # and the device path computes the same loss and gradients as the table
        loss = call(reduction="sum")
        loss.backward()
        gx, gw = x.grad.clone(), w.grad.clone()
        x.grad = w.grad = None
        LDC.AGREEMENT = "table"
        call(reduction="sum").backward()
        assert torch.equal(gx, x.grad) and torch.equal(gw, w.grad)
    finally:
        LDC.AGREEMENT = "auto"


def _work_overlap(rank, world, backend, dtype, combos, wdtype=None, grad_reduce_dtype="compute"):
    """overlap_grad_reduce (dX first, its reduce-scatter started under dW) and grad_reduce_dtype:
    every gradient against the float64 reference; an empty shard; Partial FC; gloo's reduce_scatter."""
    extra = dict(overlap_grad_reduce=True, grad_reduce_dtype=grad_reduce_dtype)
    _work_options(rank, world, backend, dtype, combos, wdtype, extra=extra)
    if dtype == torch.float64:  # sub-centers with smoothing: X's second consumer (a second shard op)
        _work_margin_family(rank, world, backend, dtype, extra)
    combo = dict(margin=MARGINS[2], normalize_weight=True, bias=True, label_smoothing=0.1, ignore_rows=1,
                 reduction="mean", alpha_grad=True)
    shards = [0, 13] + ([6] if world == 3 else [])  # a rank without a shard node: the same collectives
    _check(rank, combo, shards, [4] * world, dtype, backend, seed=1, tag="overlap, empty shard", wdtype=wdtype,
           extra=extra)
    _check(rank, dict(combo, label_smoothing=0.0), shards, [4] * world, dtype, backend, seed=2,
           tag="overlap, empty shard, no smoothing", wdtype=wdtype, extra=extra)
    lay = LAYOUTS[world]
    _check(rank, combo, lay["shards"], lay["uneven_batch"], dtype, backend, seed=4, batch_sizes=lay["uneven_batch"],
           sample_rate=0.5, tag="overlap, partial fc", wdtype=wdtype, extra=extra)
    LDX.GLOO_FEATURE_GRAD = "reduce_scatter"
    try:
        _check(rank, dict(combo, reduction="none"), lay["shards"], lay["uneven_batch"], dtype, backend, seed=3,
               batch_sizes=lay["uneven_batch"], tag="overlap, reduce_scatter", wdtype=wdtype, extra=extra)
    finally:
        LDX.GLOO_FEATURE_GRAD = "all_reduce"


def _work_auto_batch_sizes(rank, world, backend):
    """batch_sizes="auto": uneven batches without a list, the same loss as with the list."""
    lay = LAYOUTS[world]
    combo = dict(margin=MARGINS[1], normalize_weight=True, bias=False, label_smoothing=0.1, ignore_rows=1,
                 reduction="none", alpha_grad=False)
    got = _check(rank, combo, lay["shards"], lay["uneven_batch"], torch.float64, backend, seed=7, tag="auto sizes",
                 batch_sizes="auto")
    want = _check(rank, combo, lay["shards"], lay["uneven_batch"], torch.float64, backend, seed=7, tag="list",
                  batch_sizes=lay["uneven_batch"])
    assert torch.equal(got, want)


def _work_reduce_dtype(rank, world):
    """grad_reduce_dtype decides the dtype the feature gradients travel in (not only their accuracy);
    the fp32 copy of gathered bf16 features exists only with label smoothing (its torch-op terms)."""
    lay = LAYOUTS[world]
    B, shards = lay["batch"][rank], lay["shards"]
    seen = []
    real = LDX._scatter_rows_sum

    def spy(g, *args, **kw):
        seen.append(g.dtype)
        return real(g, *args, **kw)

    LDX._scatter_rows_sum = spy
    try:
        for overlap in (False, True):
            for how, want in (("compute", torch.float32), ("features", torch.bfloat16)):
                seen.clear()
                x = torch.randn(B, D, dtype=torch.bfloat16, requires_grad=True)
                w = torch.randn(shards[rank], D, requires_grad=True)
                t = torch.randint(0, sum(shards), (B,))
                LD.class_parallel_l2_softmax_loss(x, w, t, sum(shards[:rank]), backend="eager", grad_reduce_dtype=how,
                                                  overlap_grad_reduce=overlap).backward()
                assert seen and set(seen) == {want}, (how, overlap, seen)
    finally:
        LDX._scatter_rows_sum = real
    made = []
    real_gather = LDC._GatherFeatures

    class Spy(real_gather):
        @staticmethod
        def forward(ctx, *args):
            out = real_gather.forward(ctx, *args)
            made.append(out[1].numel())
            return out

    LDC._GatherFeatures = Spy
    try:
        for ls in (0.0, 0.1):
            x = torch.randn(B, D, dtype=torch.bfloat16, requires_grad=True)
            w = torch.randn(shards[rank], D, requires_grad=True)
            t = torch.randint(0, sum(shards), (B,))
            LD.class_parallel_l2_softmax_loss(x, w, t, sum(shards[:rank]), backend="eager",
                                              label_smoothing=ls).backward()
    finally:
        LDC._GatherFeatures = real_gather
    assert made == [0, sum(lay["batch"]) * D], made


def _work_checkpoints(rank, world, tmpdir):
    """Per-rank shard checkpoints (issue 18): the record (rank, world size, class range, options); a
    shard of another rank, another split or another model is refused before anything is written; the
    schedule may differ; load_shards reshards on purpose; full_state_dict in chunks, to the CPU."""
    C = 23
    kw = dict(bias=True, normalize_weight=True, margin_type="arcface", margin=0.5, dtype=torch.float64)
    head = LD.ClassParallelL2SoftmaxLoss(D, C, seed=3, sample_rate=0.5, **kw)
    with torch.no_grad():
        head.bias.copy_(torch.arange(head.num_local, dtype=torch.float64) + head.class_start)
    sd = head.state_dict()
    rec = sd["_extra_state"]
    assert (rec["rank"], rec["world_size"], rec["class_start"], rec["num_local"]) == (
        rank, world, head.class_start, head.num_local) and rec["options"]["margin_type"] == "arcface"
    torch.save(sd, os.path.join(tmpdir, f"head.rank{rank}.pt"))
    dist.barrier()
    full = head.full_state_dict()
    # the same layout, another schedule (sample_rate 1.0 for fine-tuning, another margin): loads
    same = LD.ClassParallelL2SoftmaxLoss(D, C, seed=4, **dict(kw, margin=0.3))
    same.load_state_dict(torch.load(os.path.join(tmpdir, f"head.rank{rank}.pt")))
    assert torch.equal(same.weight, head.weight) and torch.equal(same.bias, head.bias)
    assert same.sample_rate == 1.0 and same.options.margin == 0.3
    # another rank's file: refused, nothing written
    other = torch.load(os.path.join(tmpdir, f"head.rank{(rank + 1) % world}.pt"))
    before = same.weight.detach().clone()
    if other["weight"].shape == same.weight.shape:
        with pytest.raises(RuntimeError, match=r"the checkpoint holds classes \[.*load_shards"):
            same.load_state_dict(other)
        assert torch.equal(same.weight, before)
    # another model (a CosFace head loading an ArcFace shard): refused, nothing written
    cos = LD.ClassParallelL2SoftmaxLoss(D, C, seed=4, **dict(kw, margin_type="cosface", margin=0.35))
    before = cos.weight.detach().clone()
    with pytest.raises(RuntimeError, match="shard of another model.*margin_type: checkpoint 'arcface'"):
        cos.load_state_dict(sd)
    assert torch.equal(cos.weight, before)
    # a deliberate reshard: another split, from every rank's file
    sizes = [C - 2 * (world - 1)] + [2] * (world - 1)
    resh = LD.ClassParallelL2SoftmaxLoss(D, C, shard_sizes=sizes, seed=5, **kw)
    files = [torch.load(os.path.join(tmpdir, f"head.rank{r}.pt"), mmap=True) for r in range(world)]
    with pytest.raises(RuntimeError, match="another split|holds classes"):
        if resh.num_local == head.num_local:
            raise RuntimeError("another split")  # same size by chance: nothing to refuse on shape grounds
        resh.load_state_dict(sd)
    resh.load_shards(files[::-1])
    c0 = sum(sizes[:rank])
    assert torch.equal(resh.weight, full["weight"][c0: c0 + sizes[rank]])
    assert torch.equal(resh.bias, full["bias"][c0: c0 + sizes[rank]])
    if resh.num_local:
        with pytest.raises(ValueError, match="do not cover"):
            orig = LD.shard_sizes(C, world)
            missing = next(r for r in range(world) if sum(orig[:r]) <= c0 < sum(orig[:r + 1]))
            resh.load_shards([f for r, f in enumerate(files) if r != missing])
    with pytest.raises(RuntimeError, match=r"load_shards: states\[0\] is a shard of another model"):
        cos.load_shards(files)
    # full_state_dict in chunks (a few rows per collective), to the CPU, everywhere or on one rank
    for dst in (None, world - 1):
        got = head.full_state_dict(dst=dst, chunk_bytes=3 * D * 8 * world)
        if dst is None or dst == rank:
            assert got["weight"].device.type == "cpu"
            assert torch.equal(got["weight"], full["weight"]) and torch.equal(got["bias"], full["bias"])
            assert torch.equal(got["bias"], torch.arange(C, dtype=torch.float64))
        else:
            assert got is None
    single = L.L2SoftmaxLoss(D, C, **kw)
    single.load_state_dict(full)
    assert torch.equal(single.weight, full["weight"])


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


@pytest.mark.parametrize("world", [2, 3])
def test_arcface_fallback_region(backend, world):
    """Rows whose target cosine is below cos(pi - m) (x close to -W_hat_y, one exactly opposite):
    loss and gradients against the float64 reference and the single-process op."""
    dtype = torch.float64 if supports_fp64(backend) else torch.float32
    _spawn(_work_arcface_fallback, world, backend, dtype, FALLBACK_COMBOS[:2] if is_slow(backend) else FALLBACK_COMBOS)


@pytest.mark.parametrize("world", [2, 3])
def test_negatives_match_single_process(backend, world):
    """negatives = mv / curricular / filter over the covering options, against the single-process op
    and the float64 reference (loss and every gradient slice)."""
    dtype, _ = _dtype_and_combos(backend)
    _spawn(_work_negatives, world, backend, dtype, NEGATIVE_COMBOS[:3] if is_slow(backend) else NEGATIVE_COMBOS)


@pytest.mark.parametrize("world", [2, 3])
def test_negatives_with_overlapped_grad_reduce(backend, world):
    """negatives with overlap_grad_reduce=True (two merged features): the overlapped shard op's two backward
    calls take the negatives' table and the per-row thresholds as the plain one does; against the
    single-process op and the float64 reference."""
    dtype, _ = _dtype_and_combos(backend)
    combos = NEGATIVE_COMBOS[:2] if is_slow(backend) else NEGATIVE_COMBOS[:4]
    _spawn(_work_options, world, backend, dtype, combos, None, dict(overlap_grad_reduce=True))


def test_curricularface_class_parallel(backend):
    dtype, _ = _dtype_and_combos(backend)
    _spawn(_work_curricularface, 2, backend, dtype)


@pytest.mark.parametrize("world", [2, 3])
def test_subcenters_and_per_row_margins(backend, world):
    """The margin family across ranks: sub-centers, per-row margins (gathered with the rows), label
    smoothing with sub-centers (its sum over a shard's classes comes from a second shard op), the
    detached gradient."""
    dtype = torch.float64 if supports_fp64(backend) else torch.float32
    _spawn(_work_margin_family, world, backend, dtype)


def test_meta_device_init():
    """with torch.device("meta"), then to_empty + reset_parameters: weight, bias and alpha set; the
    full matrix is the one of rank 0's seed whatever each rank's RNG (docs/reliability.md, case 26)."""
    _spawn(_work_meta_init, 3)


def test_ddp_around_the_head():
    """DistributedDataParallel around the head is refused before it broadcasts (the shards survive);
    with the shard ignored, or DDP around the backbone only, every gradient is the single-process one."""
    _spawn(_work_ddp, 2, "eager")


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_that_disagree(world):
    """D, dtypes, options, alpha, requires_grad, grad mode, batch_sizes or a local argument error that
    differ between the ranks: every rank raises a clear ValueError / TypeError instead of an abort or a
    hang, and the group stays usable (docs/reliability.md, case 29)."""
    _spawn(_work_disagree, world)


def _noop(rank, world):
    t = torch.full((3,), float(rank))
    dist.all_reduce(t)
    assert float(t[0]) == sum(range(world))


def _train_and_drop_ddp(rank, world):
    """A few training steps with DDP around a backbone and the class-parallel head; returns without
    cleaning up, as user code does (DDP's reference cycles wait for the garbage collector)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(0)
    backbone = DDP(torch.nn.Linear(D, D))
    head = LD.ClassParallelL2SoftmaxLoss(D, 10, seed=0, backend="eager")
    opt = torch.optim.SGD(list(backbone.parameters()) + list(head.parameters()), lr=0.1)
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):
        loss = head(backbone(torch.randn(4, D, generator=g)), torch.randint(0, 10, (4,), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.skipif(not os.environ.get("L2SM_TEARDOWN_STRESS"), reason="set L2SM_TEARDOWN_STRESS=N to run")
def test_launcher_teardown_stress():
    """Start, use and stop a 2-process group N times: every worker must exit with status 0 within
    30 s (docs/reliability.md, case 30). Opt-in: about 12 s a round on the busy 2-core machine."""
    rounds = int(os.environ["L2SM_TEARDOWN_STRESS"])
    codes = []
    for _ in range(rounds):
        g = _Group(2)
        g.run(_noop)
        g.run(_train_and_drop_ddp)  # DDP objects left to the garbage collector, as user code leaves them
        codes.append(g.close())
    clean = sum(all(c == 0 for c in v) for v in codes)
    print(f"teardown stress: {clean} / {rounds} rounds exited cleanly; exit codes {codes}")
    assert clean == rounds, codes


def _pairs(combos):
    return {p for c in combos for p in itertools.combinations(sorted((k, str(v)) for k, v in c.items()), 2)}


def test_subsets_cover_pairs():
    for name, sub in SUBSETS.items():
        assert _pairs(sub) == _pairs(ALL_COMBOS), f"subset {name} misses a pair of option values"


def test_errors():
    _spawn(_work_errors, 2)


def test_device_schedule_table_runs_once_per_key():
    """The agreement check's schedule (no GPU needed: only the device type matters): CPU tensors every
    call; CUDA the first call per module / group until it passes, or every call with CHECK_EVERY_CALL;
    keys are held weakly."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    key, other = torch.nn.Module(), torch.nn.Module()
    assert LDC._check_due(cuda, key) and LDC._check_due(cpu, key)
    LDC._mark_checked(cuda, key)
    assert not LDC._check_due(cuda, key) and LDC._check_due(cuda, other) and LDC._check_due(cpu, key)
    LDC.CHECK_EVERY_CALL = True
    try:
        assert LDC._check_due(cuda, key)
    finally:
        LDC.CHECK_EVERY_CALL = False
    # AGREEMENT: "table" every call; "device": CPU tensors follow CUDA's schedule
    assert LDC._check_mode(cuda, key) == "device" and LDC._check_mode(cpu, key) == "table"
    assert LDC._check_mode(cuda, key, auto_sizes=True) == "table"  # batch_sizes="auto"
    for mode, want_cuda, want_cpu in (("table", "table", "table"), ("device", "device", "device")):
        LDC.AGREEMENT = mode
        try:
            LDC._mark_checked(cpu, key)
            assert LDC._check_mode(cuda, key) == want_cuda and LDC._check_mode(cpu, key) == want_cpu
        finally:
            LDC.AGREEMENT = "auto"
    n = len(LDC._CHECKED)
    del key
    gc.collect()
    assert len(LDC._CHECKED) == n - 1


@pytest.mark.parametrize("world", [2, 3])
def test_agreement_check_on_the_device_schedule(world):
    """issue 23: the per-call check CUDA runs after the first call (no host read), run under gloo: a
    rank with another batch size, different batch_sizes lists, another per-row margin form, another
    grad mode, another option, an argument error on one rank: every rank raises, the group survives."""
    _spawn(_work_device_check, world)


@pytest.mark.parametrize("world", [2, 3])
def test_overlapped_grad_reduce(backend, world):
    """overlap_grad_reduce=True: loss and every gradient slice against the float64 reference and the
    single-process op, across the option axes, an empty shard, Partial FC, uneven batches."""
    dtype, combos = _dtype_and_combos(backend)
    _spawn(_work_overlap, world, backend, dtype, combos[:1] if is_slow(backend) else SUBSETS["partial_fc"])


@pytest.mark.parametrize("world", [2, 3])
def test_grad_reduce_in_feature_dtype(backend, world):
    """grad_reduce_dtype="features" (the feature gradients summed over the ranks in bf16 / fp16), with and
    without overlap: the feature gradient within the accuracy relation plus the partial sums' rounding."""
    if is_slow(backend):
        pytest.skip("covered by the eager and cpu backends")
    dtype = torch.bfloat16 if world == 2 else torch.float16
    try:
        L.backends.resolve(backend, "cpu", (dtype, torch.float32))
    except ValueError as e:
        pytest.skip(str(e))
    _spawn(_work_options, world, backend, dtype, SUBSETS["half"], torch.float32, dict(grad_reduce_dtype="features"))
    _spawn(_work_overlap, world, backend, dtype, SUBSETS["half"][:4], torch.float32, "features")


@pytest.mark.parametrize("world", [2, 3])
def test_auto_batch_sizes(backend, world):
    if not supports_fp64(backend):
        pytest.skip("float64 comparison")
    _spawn(_work_auto_batch_sizes, world, backend)


def test_reduce_dtype_is_the_wire_dtype():
    _spawn(_work_reduce_dtype, 2)


@pytest.mark.parametrize("world", [2, 3])
def test_shard_checkpoints(world, tmp_path):
    _spawn(_work_checkpoints, world, str(tmp_path))


def test_nccl_device_must_be_current():
    """issue 23: under NCCL the shard's device must be the rank's current CUDA device (pure function: no GPU)."""
    from l2sm_kernels.distributed.rank_device import device_problem
    cuda = torch.device
    assert device_problem(cuda("cpu"), "gloo", 0, None, 0) is None
    assert device_problem(cuda("cuda", 1), "gloo", 0, 1, 2) is None  # gloo: any device
    assert device_problem(cuda("cuda", 2), "nccl", 2, 2, 8) is None
    assert device_problem(cuda("cuda"), "nccl", 3, 3, 8) is None
    assert device_problem(cuda("cuda"), "nccl", 0, None, 8) is None  # no LOCAL_RANK: nothing to compare
    msg = device_problem(cuda("cuda", 1), "nccl", 0, 1, 8)
    assert "cuda:1 is not the current CUDA device (cuda:0)" in msg and "torch.cuda.set_device(local_rank)" in msg
    msg = device_problem(cuda("cuda"), "nccl", 0, 3, 8)  # the README's old example on local rank 3
    assert "LOCAL_RANK=3" in msg and "device_id=" in msg
    assert device_problem(cuda("cuda"), "nccl", 1, 9, 8) is None  # local rank 9 of 8 GPUs per node: cuda:1


def test_needs_init():
    with pytest.raises(RuntimeError, match="torch.distributed initialized"):
        LD.class_parallel_l2_softmax_loss(torch.randn(2, 3), torch.randn(4, 3), torch.zeros(2, dtype=torch.long), 0)
