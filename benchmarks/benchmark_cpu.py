"""Backend "cpu" against the plain torch formula and the eager backend, forward + backward, side by
side in one process (providers interleaved rep by rep, so that a busy machine slows all alike).

    python benchmarks/benchmark_cpu.py                          # B=256, D=512, C=65536, float32
    python benchmarks/benchmark_cpu.py --shape 1024,512,16384 --reps 9 --dtype bfloat16 --providers plain,cpu
    python benchmarks/benchmark_cpu.py --threads 1   # one thread: process CPU time is robust to a busy machine

Prints one tidy row per (provider, metric) (STYLE.md #11): wall time of forward + backward (median,
p20, p80 over reps), the process CPU time of the same calls, and the peak memory allocated beyond the
inputs and the gradients (torch.profiler memory events: the running total of the CPU allocator;
BLAS-internal buffers are not seen, for any provider). Baselines: l2sm_kernels.reference.plain_formula
(F.cross_entropy(alpha * F.normalize(x) @ W.T, y)) and backend "eager".
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch

import l2sm_kernels as L
from l2sm_kernels.reference import plain_formula


def providers(alpha):
    return {
        "plain": lambda x, w, y: plain_formula(x, w, y, alpha),
        "eager": lambda x, w, y: L.l2_softmax_loss(x, w, y, alpha, backend="eager"),
        "cpu": lambda x, w, y: L.l2_softmax_loss(x, w, y, alpha, backend="cpu"),
    }


def peak_extra_bytes(fn) -> int:
    """Peak of the CPU allocator's running total during fn(), minus what was allocated before."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    start = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in mem) - start


def quantile(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="256,512,65536", help="B,D,C")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--providers", default="plain,eager,cpu")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: leave as is)")
    p.add_argument("--json", action="store_true", help="print rows as JSON lines instead of a table")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    B, D, C = (int(v) for v in args.shape.split(","))
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(C, D, generator=g) * 0.05).to(dtype).requires_grad_()
    y = torch.randint(0, C, (B,), generator=g)
    fns = {k: v for k, v in providers(args.alpha).items() if k in args.providers.split(",")}

    def step(fn):
        x.grad = w.grad = None
        fn(x, w, y).backward()

    wall = {k: [] for k in fns}
    cpu_t = {k: [] for k in fns}
    for k, fn in fns.items():  # warm-up
        step(fn)
    for _ in range(args.reps):
        for k, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            step(fn)
            wall[k].append(time.perf_counter() - t0)
            cpu_t[k].append(time.process_time() - c0)
    grads = x.numel() * x.element_size() + w.numel() * w.element_size()
    mem = {}
    for k, fn in fns.items():
        x.grad = w.grad = None
        mem[k] = peak_extra_bytes(lambda: fn(x, w, y).backward()) - grads

    device = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    rows = []
    for k in fns:
        for metric, vals in (("fwd+bwd wall", wall[k]), ("fwd+bwd process cpu", cpu_t[k])):
            rows.append(dict(op="l2_softmax_loss", provider=k, shape=f"B={B},D={D},C={C},{args.dtype}",
                             metric=metric, unit="ms", median=1e3 * statistics.median(vals),
                             p20=1e3 * quantile(vals, 0.2), p80=1e3 * quantile(vals, 0.8), device=device,
                             version=torch.__version__))
        rows.append(dict(op="l2_softmax_loss", provider=k, shape=f"B={B},D={D},C={C},{args.dtype}",
                         metric="peak memory beyond inputs and grads", unit="MiB", median=mem[k] / 2**20,
                         p20=None, p80=None, device=device, version=torch.__version__))
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    base = {r["metric"]: r["median"] for r in rows if r["provider"] == "plain"}
    print(f"# {rows[0]['shape']}  device: {device}  torch {torch.__version__}  reps {args.reps}")
    print(f"{'provider':8s} {'metric':38s} {'median':>10s} {'p20':>10s} {'p80':>10s}  vs plain")
    for r in rows:
        rel = f"{r['median'] / base[r['metric']]:.2f}x" if base.get(r["metric"]) else ""
        p20 = f"{r['p20']:10.1f}" if r["p20"] is not None else f"{'':10s}"
        p80 = f"{r['p80']:10.1f}" if r["p80"] is not None else f"{'':10s}"
        print(f"{r['provider']:8s} {r['metric'] + ' (' + r['unit'] + ')':38s} {r['median']:10.1f} {p20} {p80}  {rel}")


if __name__ == "__main__":
    main()
