"""Check (and time) the class-parallel loss on GPUs: NCCL collectives, the triton backend per shard.

    # every GPU of the machine, NCCL (world size 1 with one GPU: NCCL refuses two ranks on one GPU)
    torchrun --standalone --nproc_per_node $(nvidia-smi -L | wc -l) benchmarks/gpu_distributed_check.py
    # several ranks sharing one GPU: gloo carries CUDA tensors (through host memory)
    torchrun --standalone --nproc_per_node 3 benchmarks/gpu_distributed_check.py --dist-backend gloo --no-timing
    # n GPUs: --nproc_per_node n (NCCL). A CPU dry run of this script (gloo, eager/cpu backend):
    torchrun --standalone --nproc_per_node 2 benchmarks/gpu_distributed_check.py --device cpu --small

Part 1 (correctness): every rank builds the same full problem from a seed, takes its rows of the
batch and its shard of the classes (uneven split), and compares the loss and every gradient slice
with the float64 reference by the accuracy relation, with two baselines: the single-process
l2_softmax_loss on the concatenated batch (same backend) and plain torch in the working dtype; for
margins, normalize_weight, bias, smoothing, ignored rows, reductions, a learnable alpha and Partial
FC sampling, in float32 and bf16; then every collective path (PATHS): the plain reduce-scatter,
overlap_grad_reduce, grad_reduce_dtype="features", both, uneven batches with a batch_sizes list and
with batch_sizes="auto"; each after the first call runs the device agreement check (no host sync).
Then the checkpoint collectives: full_state_dict in chunks (every rank and dst=0) and load_shards.
Part 2 (timing, rank 0 prints): forward + backward of the class-parallel loss without and with
overlap_grad_reduce and with a bf16 feature-gradient reduction, vs the single-process op on the
global batch, side by side in one run, median of CUDA-event timings, and the peak memory; and the
device agreement check alone (its cost per call).
Exit status 1 if a check fails.
"""
import argparse
import gc
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

import l2sm_kernels as L
import l2sm_kernels.distributed as LD
from l2sm_kernels.testing.rank_rounding import assert_accurate_rank_sum
from l2sm_kernels.testing import assert_accurate

MARGINS = [("none", 0.0), ("cosface", 0.35), ("arcface", 0.5)]
CASES = [  # (margin, normalize_weight, bias, label_smoothing, ignore_rows, reduction, alpha_grad, sample_rate)
    (MARGINS[0], False, False, 0.0, 0, "mean", False, 1.0),
    (MARGINS[1], True, True, 0.1, 3, "none", True, 1.0),
    (MARGINS[2], True, False, 0.1, 0, "sum", True, 1.0),
    (MARGINS[2], False, True, 0.0, 2, "mean", False, 1.0),
    (MARGINS[1], True, False, 0.0, 1, "mean", True, 0.4),
    (MARGINS[2], True, True, 0.1, 0, "none", False, 0.5),
]


# the collective paths: (name, extra arguments of the call, uneven batch sizes: None / "list" / "auto")
PATHS = [
    ("reduce_scatter", {}, None),
    ("overlap", dict(overlap_grad_reduce=True), None),
    ("bf16 reduction", dict(grad_reduce_dtype="features"), None),
    ("overlap + bf16 reduction", dict(overlap_grad_reduce=True, grad_reduce_dtype="features"), "list"),
    ("uneven, batch_sizes list", {}, "list"),
    ("uneven, batch_sizes auto", {}, "auto"),
]


def _split(C, world):
    """An uneven split: rank r gets about (r + 1) shares."""
    w = [r + 1 for r in range(world)]
    sizes = [C * v // sum(w) for v in w]
    sizes[-1] += C - sum(sizes)
    return sizes


def check_case(case, dtype, wdtype, B, C, D, device, backend, rank, world, seed, extra=None, uneven=None):
    (mt, m), nw, use_bias, s, ignore_rows, reduction, alpha_grad, rate = case
    extra = dict(extra or {})
    g = torch.Generator().manual_seed(seed)
    rows = [B + (r if uneven else 0) for r in range(world)]
    if uneven:
        extra["batch_sizes"] = rows if uneven == "list" else "auto"
    Bg = sum(rows)
    x = torch.randn(Bg, D, generator=g, dtype=torch.float64)
    w = torch.randn(C, D, generator=g, dtype=torch.float64) * 0.05
    b = torch.randn(C, generator=g, dtype=torch.float64) * 0.5 if use_bias else None
    t = torch.randint(0, C, (Bg,), generator=g)
    t[torch.randperm(Bg, generator=g)[:ignore_rows]] = -100
    go = torch.randn(Bg, generator=g, dtype=torch.float64) if reduction == "none" else torch.tensor(3.0,
                                                                                                    dtype=torch.float64)
    x, w, t, go = x.to(device, dtype), w.to(device, wdtype), t.to(device), go.to(device)
    b = b.to(device, wdtype) if b is not None else None
    alpha = torch.tensor(16.0, device=device, requires_grad=True) if alpha_grad else 16.0
    kw = dict(normalize_weight=nw, margin_type=mt, margin=m, label_smoothing=s, reduction=reduction)
    sizes = _split(C, world)
    r0, r1, c0, c1 = sum(rows[:rank]), sum(rows[:rank + 1]), sum(sizes[:rank]), sum(sizes[: rank + 1])

    def leaf(v):
        return v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v

    def grads(out, leaves):
        names = [k for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad]
        return dict(zip(names, torch.autograd.grad(out, [leaves[k] for k in names], go.to(out))))

    mine = dict(x=leaf(x[r0:r1]), weight=leaf(w[c0:c1]), bias=leaf(b[c0:c1] if b is not None else None),
                alpha=leaf(alpha))
    out = LD.class_parallel_l2_softmax_loss(mine["x"], mine["weight"], t[r0:r1], c0, mine["alpha"], mine["bias"],
                                            backend=backend, sample_rate=rate,
                                            generator=torch.Generator(device=device).manual_seed(rank), **kw, **extra)
    got = grads(out, mine)
    sub = torch.arange(C, device=device)
    if rate < 1:  # the same draw again, to build the single-process problem on the sampled classes
        idx = LD.partial_fc_sample(t, c0, c1 - c0, rate, generator=torch.Generator(device=device).manual_seed(rank))
        every = [None] * world
        dist.all_gather_object(every, (idx + c0).cpu().tolist())
        sub = torch.tensor(sorted(sum(every, [])), device=device)
    st = torch.where(t == -100, t, torch.searchsorted(sub, t))
    results = {}
    for name, fn in (("single", lambda *a, **k: L.l2_softmax_loss(*a, backend=backend, **k)),
                     ("ref", lambda *a, **k: L.l2_softmax_loss_ref(*a, upcast=True, **k)),
                     ("plain", lambda *a, **k: L.l2_softmax_loss_ref(*a, upcast=False, **k))):
        up = (lambda v: v.double() if isinstance(v, torch.Tensor) else v) if name == "ref" else (lambda v: v)
        lv = dict(x=leaf(up(x)), weight=leaf(up(w[sub])), bias=leaf(up(b[sub]) if b is not None else None),
                  alpha=leaf(up(alpha)))
        o = fn(lv["x"], lv["weight"], st, lv["alpha"], lv["bias"], **kw)
        results[name] = (o.detach(), grads(o, lv))
    (single, sg), (ref, rg), (plain_out, pg) = results["single"], results["ref"], results["plain"]
    # against the float64 reference twice: with the single-process op's error as the baseline, and
    # with plain torch's (the accuracy relation of docs/conventions.md itself)
    assert_accurate("loss", out.detach(), ref, single, dtype)
    assert_accurate("loss vs plain torch", out.detach(), ref, plain_out, dtype)
    for k, gk in got.items():
        if k == "x":
            want, bases = rg[k][r0:r1], (sg[k][r0:r1], pg[k][r0:r1])
        elif k in ("weight", "bias"):
            def full(v):
                f = v.new_zeros((C,) + tuple(v.shape[1:]))
                f[sub] = v
                return f[c0:c1]
            want, bases = full(rg[k]), (full(sg[k]), full(pg[k]))
        else:
            want, bases = rg[k], (sg[k], pg[k])
        for plain, what in zip(bases, ("", " vs plain torch")):
            if k == "x" and dtype in (torch.float16, torch.bfloat16):  # + the rounding of each rank's dX part
                sampled_shards = [int(((sub >= sum(sizes[:r])) & (sub < sum(sizes[:r + 1]))).sum())
                                  for r in range(world)]
                roundings = world + 1 if extra.get("grad_reduce_dtype") == "features" else 1
                assert_accurate_rank_sum(f"grad x{what}", gk, want, plain, x, w[sub], st, alpha,
                                         b[sub] if b is not None else None, go, sampled_shards, (r0, r1), kw,
                                         roundings=roundings)
            else:
                assert_accurate(f"grad {k}{what}", gk, want, plain, mine[k].dtype if k != "alpha" else dtype)


def timing(B, C, D, device, backend, rank, world, iters=20):
    """Median ms of forward + backward: class-parallel (this rank's shard, B rows per rank) without and
    with overlap_grad_reduce and a bf16 reduction, vs the single-process op on the global batch and
    the full matrix (rank 0, alone); and the device agreement check alone."""
    sizes = _split(C, world)
    c0 = sum(sizes[:rank])
    g = torch.Generator(device=device).manual_seed(rank)
    x = torch.randn(B, D, device=device, dtype=torch.bfloat16, generator=g).requires_grad_(True)
    w = (torch.randn(sizes[rank], D, device=device, generator=g) * 0.05).to(torch.bfloat16).requires_grad_(True)
    t = torch.randint(0, C, (B,), device=device, generator=g)

    def run_dist(**extra):
        def fn():
            loss = LD.class_parallel_l2_softmax_loss(x, w, t, c0, 16.0, backend=backend, **extra)
            loss.backward()
        return fn

    def measure(fn):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        times = []
        for _ in range(iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        times.sort()
        return times[len(times) // 2], (torch.cuda.max_memory_allocated() - base) / 2 ** 30

    rows = []
    for provider, extra in (("class_parallel", {}), ("class_parallel_overlap", dict(overlap_grad_reduce=True)),
                            ("class_parallel_bf16_reduce", dict(grad_reduce_dtype="features")),
                            ("class_parallel_overlap_bf16_reduce", dict(overlap_grad_reduce=True,
                                                                        grad_reduce_dtype="features"))):
        rows.append(dict(provider=provider, world=world, B_per_rank=B, C=C, D=D, dtype="bfloat16",
                         **dict(zip(("median_ms", "peak_extra_GiB"), measure(run_dist(**extra))))))
    # the device agreement check alone (what every CUDA call after the first pays)
    from l2sm_kernels.distributed import agreement as LA
    from l2sm_kernels.distributed.class_parallel import _prepare
    a = _prepare(x, w, t, c0, 16.0, None, normalize_weight=False, margin=0.0, margin_type="none", reduction="mean",
                 ignore_index=-100, label_smoothing=0.0, eps=1e-12, subcenters=1, margin_grad="exact", backend=backend,
                 batch_sizes=None, sample_rate=1.0)
    rows.append(dict(provider="agreement_device_check", world=world, B_per_rank=B, C=C, D=D, dtype="bfloat16",
                     **dict(zip(("median_ms", "peak_extra_GiB"),
                                measure(lambda: LA._check_ranks_on_device(a, None, world, None, device))))))
    dist.barrier()
    if rank == 0:
        xs = torch.randn(B * world, D, device=device, dtype=torch.bfloat16).requires_grad_(True)
        ws = (torch.randn(C, D, device=device) * 0.05).to(torch.bfloat16).requires_grad_(True)
        ts = torch.randint(0, C, (B * world,), device=device)

        def run_single():
            L.l2_softmax_loss(xs, ws, ts, 16.0, backend=backend).backward()

        rows.append(dict(provider="single_process", world=1, B_per_rank=B * world, C=C, D=D, dtype="bfloat16",
                         **dict(zip(("median_ms", "peak_extra_GiB"), measure(run_single)))))
    dist.barrier()
    return rows


def check_checkpoints(C, D, device, rank, world):
    """full_state_dict gathered in chunks to the CPU (every rank, then dst=0) equals the shards in
    order; load_shards into another split takes the right rows."""
    head = LD.ClassParallelL2SoftmaxLoss(D, C, seed=11, bias=True, device=device, shard_sizes=_split(C, world))
    full = head.full_state_dict()
    small = head.full_state_dict(chunk_bytes=7 * D * 4 * world)
    to0 = head.full_state_dict(dst=0, chunk_bytes=5 * D * 4 * world)
    c0 = head.class_start
    assert full["weight"].device.type == "cpu"
    assert torch.equal(full["weight"][c0:c0 + head.num_local], head.weight.detach().cpu())
    assert torch.equal(small["weight"], full["weight"]) and torch.equal(small["bias"], full["bias"])
    assert (to0 is None) == (rank != 0) and (to0 is None or torch.equal(to0["weight"], full["weight"]))
    shards = [None] * world
    dist.all_gather_object(shards, {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in
                                    head.state_dict().items()})
    other = LD.ClassParallelL2SoftmaxLoss(D, C, seed=12, bias=True, device=device)  # the default split
    other.load_shards(shards)
    o0 = other.class_start
    assert torch.equal(other.weight.detach().cpu(), full["weight"][o0:o0 + other.num_local])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dist-backend", default=None, help="nccl (default on cuda) or gloo")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--small", action="store_true", help="small shapes (CPU dry run)")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--json", default=None, help="write the timing rows here (rank 0)")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda:  # the rank's GPU is the current device before anything touches NCCL (docs/class_parallel.md)
        n = torch.cuda.device_count()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % n)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(args.dist_backend or ("nccl" if cuda else "gloo"))
    rank, world = dist.get_rank(), dist.get_world_size()
    if not cuda:  # the CPU dry run follows CUDA's agreement schedule (the device check after the first call)
        import l2sm_kernels.distributed.class_parallel as LDC
        LDC.AGREEMENT = "device"
    name = L.backends.resolve(args.backend, device.type, (torch.float32, torch.bfloat16))
    if rank == 0:
        print(f"torch {torch.__version__}, {dist.get_backend()} x {world}, device "
              f"{torch.cuda.get_device_name(device) if cuda else 'cpu'}, per-shard backend {name}", flush=True)
    B, C, D = (6, 97, 16) if args.small else (64, 4099, 128)
    failures = 0
    for dtype, wdtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32)):
        for i, case in enumerate(CASES):
            try:
                check_case(case, dtype, wdtype, B, C, D, device, args.backend, rank, world, seed=i)
                status = "ok"
            except AssertionError as e:
                failures += 1
                status = f"FAIL {e}"
                traceback.print_exc()
            if rank == 0:
                print(f"check {str(dtype):15s} {case}: {status}", flush=True)
    # every collective path, float32 and bf16 features (fp32 weights), two option sets each
    for name, extra, uneven in PATHS:
        for dtype in (torch.float32, torch.bfloat16):
            for i in (1, 2):
                try:
                    check_case(CASES[i], dtype, torch.float32, B, C, D, device, args.backend, rank, world, seed=50 + i,
                               extra=extra, uneven=uneven)
                    status = "ok"
                except AssertionError as e:
                    failures += 1
                    status = f"FAIL {e}"
                    traceback.print_exc()
                if rank == 0:
                    print(f"check path {name:28s} {str(dtype):15s} case {i}: {status}", flush=True)
    try:
        check_checkpoints(C, D, device, rank, world)
        status = "ok"
    except AssertionError as e:
        failures += 1
        status = f"FAIL {e}"
        traceback.print_exc()
    if rank == 0:
        print(f"check checkpoints (full_state_dict in chunks, dst=0, load_shards): {status}", flush=True)
    bad = torch.tensor([failures], device=device)
    dist.all_reduce(bad)
    if cuda and not args.no_timing:
        shapes = [(1024, 131072, 512)] if not args.small else [(64, 8192, 128)]
        for Bt, Ct, Dt in shapes:
            rows = timing(Bt, Ct, Dt, device, args.backend, rank, world)
            if rank == 0:
                for r in rows:
                    print(json.dumps(dict(r, torch=torch.__version__, device=torch.cuda.get_device_name(device),
                                          backend=name)), flush=True)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(rows, f, indent=1)
    ok = int(bad.item()) == 0
    if rank == 0:
        print("all checks passed" if ok else f"{int(bad.item())} check(s) failed", flush=True)
    # the clean exit order (docs/class_parallel.md, "A clean exit"): barrier, collect, destroy before the interpreter exits
    dist.barrier()  # nobody tears the group down while a peer still talks to it
    gc.collect()
    dist.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
