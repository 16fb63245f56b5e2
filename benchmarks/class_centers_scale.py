"""The class-centre tools at face scale on the CPU (docs/non_target_heads.md, "Measured scale").

    OMP_NUM_THREADS=2 python benchmarks/class_centers_scale.py --classes 100000 --dim 128

Times one call each of inter_class_similarity (C classes, K = 1), closest_class_pairs (n = 20) and
subcenter_outliers (N samples against C classes of K = 3 sub-centers, chunks of 4096), and their memory
beyond the inputs (harness.cpu_memory: torch's allocator peak and the process RSS high-water mark),
next to the C x C matrix they avoid. Prints one line per tool."""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.harness import cpu_memory
from l2sm_kernels import class_centers as CC


def _run(name, fn, avoided_bytes):
    out = {}

    def call():
        t0 = time.perf_counter()
        out["result"] = fn()
        out["s"] = time.perf_counter() - t0

    mem = cpu_memory(call)
    print(f"{name}: {out['s']:.1f} s, allocator peak {mem.peak / 2**20:.1f} MiB, RSS high-water "
          f"{(mem.rss_peak or 0) / 2**20:.1f} MiB (the full matrix: {avoided_bytes / 2**30:.1f} GiB)", flush=True)
    return out["result"]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--skip-outliers", action="store_true")
    args = ap.parse_args(argv)
    C, D = args.classes, args.dim
    g = torch.Generator().manual_seed(0)
    w = torch.randn(C, D, generator=g)
    w[7] = w[3] * 1.5  # a duplicated identity
    print(f"C = {C}, D = {D}, fp32, backend {args.backend}, threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}", flush=True)
    sim = _run("inter_class_similarity", lambda: CC.inter_class_similarity(w, backend=args.backend), 4 * C * C)
    print("  summary:", {k: round(v, 4) if isinstance(v, float) else v for k, v in sim.summary().items()})
    pairs = _run("closest_class_pairs(n=20)", lambda: CC.closest_class_pairs(w, n=20, backend=args.backend), 4 * C * C)
    print("  closest:", pairs[:3])
    if not args.skip_outliers:
        K, N = 3, args.samples
        w3 = torch.randn(C * K, D, generator=g)
        x = torch.randn(N, D, generator=g)
        y = torch.randint(0, C, (N,), generator=g)
        chunks = [(x[i:i + 4096], y[i:i + 4096]) for i in range(0, N, 4096)]
        res = _run(f"subcenter_outliers(N={N}, K=3)",
                   lambda: CC.subcenter_outliers(chunks, w3, K, backend=args.backend), 4 * N * C * K)
        print("  outliers:", int(res.outlier.sum()), "of", N)


if __name__ == "__main__":
    main()
