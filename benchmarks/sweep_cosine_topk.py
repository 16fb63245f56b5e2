"""cosine_topk side by side with what people use for exact cosine k-nearest-neighbour search: time and peak
memory of every provider in one run, as tidy rows (CSV / JSON) and a markdown table.

    python -m benchmarks.sweep_cosine_topk                    # the issue's shape: Q=2048, N=262144, D=512, k=10, fp32
    python -m benchmarks.sweep_cosine_topk -Q 256 -N 65536 --providers torch cpu
    pip install faiss-cpu                                    # optional: the faiss provider (not in requirements.txt)

Providers (each call gets raw queries (Q, D) and a raw gallery (N, D) and returns the k largest cosines per
query with their indices):
- "torch":   F.normalize(q) @ F.normalize(g).T, then .topk(k): the Q x N matrix, the plain way.
- "eager", "cpu", "triton": l2sm_kernels.cosine_topk(backend=...), every backend that serves the device
             (interpreted triton is not benchmarked). eager, the verification fallback, is left out of the
             default providers above Q x N = 2^28 scores (about 100 s a call at the issue's shape on 2 cores).
- "faiss":   faiss.IndexFlatIP (exact inner-product search) over the L2-normalized gallery, built once
             before timing (the index holds its own normalized copy of the gallery: reported as setup
             memory, not counted in the call); the timed call normalizes a copy of the queries and searches.
             Only when `faiss` is importable. faiss-cpu 1.15's wheel bundles OpenBLAS 0.3.15, which does not
             recognize recent Xeons (Sapphire Rapids here: it reports "Prescott") and falls back to SSE3
             kernels, 4-5x slower (seen at Q=2048, N=65536, D=512: 7-11 s against 1.6-2 s); this module sets
             OPENBLAS_CORETYPE=SkylakeX before faiss loads when the CPU has AVX-512 and the variable is unset.
- "sklearn": sklearn.neighbors.NearestNeighbors(metric="cosine", algorithm="brute"), fit before timing;
             the timed call is kneighbors(queries) (distances 1 - cosine). CPU only.

Timing: providers run interleaved, one call each per round (warm-up round first), so that load on the
machine drifts over all of them alike; median and p20 / p80 over the rounds. Memory, one extra call each:
the process's resident-set high-water mark beyond the start (VmHWM; every allocator and thread, an upper
estimate) and, for the torch providers, torch's CPU allocator peak (profiler events); both minus nothing,
i.e. "beyond inputs" (outputs are Q x k, negligible here, and reported as out_bytes). The table gives
memory as a share of the torch provider's Q x N fp32 matrix. CUDA: max_memory_allocated.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

if __package__ in (None, ""):  # `python benchmarks/sweep_cosine_topk.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import l2sm_kernels as L  # noqa: E402
from benchmarks import harness as H  # noqa: E402

def _openblas_coretype() -> None:
    """OPENBLAS_CORETYPE=SkylakeX for faiss's bundled OpenBLAS on AVX-512 CPUs it does not know (see above).
    Must run before faiss (or any OpenBLAS) is loaded; numpy's own OpenBLAS detects SkylakeX anyway."""
    if "OPENBLAS_CORETYPE" in os.environ:
        return
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return
    if " avx512f " in flags + " ":
        os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"


_openblas_coretype()

TORCH_PROVIDERS = ("torch", "eager", "cpu", "triton")
EXTERNAL = ("faiss", "sklearn")
MiB = 2**20


def fused_providers(device_type: str) -> list[str]:
    """l2sm backends that serve the device natively here (harness.fused_backends: interpreted triton excluded)."""
    return [n for n, why in H.fused_backends(device_type).items() if not why]


def faiss_module():
    try:
        import faiss  # noqa: F401
    except ImportError:
        return None
    return faiss


EAGER_MAX_SCORES = 2**28  # the eager fallback sorts / selects every chunk: left out of default runs above this Q x N


def default_providers(device_type: str, qxn: int = 0) -> list[str]:
    out = ["torch"] + (["eager"] if qxn <= EAGER_MAX_SCORES else []) + fused_providers(device_type)
    if device_type == "cpu":
        out += (["faiss"] if faiss_module() is not None else []) + ["sklearn"]
    return out


def unavailable(provider: str, device_type: str) -> str:
    if provider in ("torch", "eager"):
        return ""
    if provider in ("cpu", "triton"):
        return H.fused_backends(device_type).get(provider, "unknown backend")
    if provider == "faiss":
        if device_type != "cpu":
            return "faiss-cpu: CPU only"
        return "" if faiss_module() is not None else "faiss is not importable (pip install faiss-cpu)"
    if provider == "sklearn":
        return "" if device_type == "cpu" else "scikit-learn: CPU only"
    return f"unknown provider {provider!r}"


def make_call(provider: str, q: torch.Tensor, g: torch.Tensor, k: int):
    """(zero-argument call, setup bytes held outside the inputs, e.g. faiss's index)."""
    if provider == "torch":
        return (lambda: (F.normalize(q, dim=1) @ F.normalize(g, dim=1).T).topk(k, dim=1)), 0
    if provider in ("eager", "cpu", "triton"):
        return (lambda: L.cosine_topk(q, g, k, backend=provider)), 0
    qn, gn = q.numpy(), g.numpy()
    if provider == "faiss":
        faiss = faiss_module()
        faiss.omp_set_num_threads(torch.get_num_threads())
        gh = gn.copy()
        faiss.normalize_L2(gh)
        index = faiss.IndexFlatIP(gn.shape[1])
        index.add(gh)
        del gh

        def search():
            qh = qn.copy()
            faiss.normalize_L2(qh)
            return index.search(qh, k)
        return search, index.ntotal * index.d * 4
    if provider == "sklearn":
        from sklearn.neighbors import NearestNeighbors

        nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(gn)
        return (lambda: nn.kneighbors(qn, k)), 0
    raise ValueError(provider)


def check_agreement(results: dict, k: int) -> dict:
    """Top-1 index agreement of every provider with the cpu / eager one (a sanity check of the rows)."""
    base = results.get("cpu") or results.get("eager")
    out = {}
    if base is None:
        return out
    bi = base[1].cpu().numpy()
    for p, r in results.items():
        idx = r[1]
        idx = idx.cpu().numpy() if isinstance(idx, torch.Tensor) else np.asarray(idx)
        out[p] = float((idx[:, 0] == bi[:, 0]).mean())
    return out


def run(args) -> dict:
    device = args.device
    dev_type = torch.device(device).type
    if args.threads:
        torch.set_num_threads(args.threads)
    Q, N, D, k = args.queries, args.gallery, args.dim, args.k
    dtype = H.DTYPES[args.dtype]
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(Q, D, generator=gen, device=device, dtype=dtype)
    g = torch.randn(N, D, generator=gen, device=device, dtype=dtype)
    providers = args.providers or default_providers(dev_type, Q * N)
    env = H.environment(device)
    rows, calls, results = [], {}, {}
    for p in providers:
        why = unavailable(p, dev_type)
        if not why and p in EXTERNAL and dtype != torch.float32:
            why = "float32 only"
        if why:
            rows.append(dict(provider=p, status=f"unavailable: {why}"))
            continue
        call, setup = make_call(p, q, g, k)
        calls[p] = (call, setup)
    # warm-up round (compiles nothing, but pages in every library and buffer), then interleaved rounds
    for p, (call, _) in calls.items():
        results[p] = call()
    times = {p: [] for p in calls}
    t_end = time.perf_counter() + args.min_time
    for r in range(args.max_rounds):
        if r >= args.rounds and time.perf_counter() > t_end:
            break
        for p, (call, _) in calls.items():
            H.synchronize(device)
            t0 = time.perf_counter()
            call()
            H.synchronize(device)
            times[p].append(time.perf_counter() - t0)
    qxn = Q * N * 4
    for p, (call, setup) in calls.items():
        gc.collect()
        if dev_type == "cuda":
            mem = H.Memory(H.cuda_peak_bytes(call, device))
        else:
            mem = H.cpu_memory(call)
        med, p20, p80 = np.percentile(np.asarray(times[p]) * 1e3, [50, 20, 80])
        rows.append(dict(provider=p, status="ok", median_ms=float(med), p20_ms=float(p20), p80_ms=float(p80),
                         reps=len(times[p]), gflops=2 * Q * N * D / (med * 1e-3) / 1e9,
                         alloc_peak_bytes=mem.peak if p in TORCH_PROVIDERS else None,
                         rss_peak_bytes=mem.rss_peak, setup_bytes=setup, out_bytes=Q * k * 12))
    fastest = min((r["median_ms"] for r in rows if r["status"] == "ok"), default=None)
    agree = check_agreement(results, k)
    for r in rows:
        if r["status"] == "ok":
            r["x_fastest"] = r["median_ms"] / fastest
            m = [v for v in (r["alloc_peak_bytes"], r["rss_peak_bytes"]) if v is not None]
            r["mem_share_of_qxn"] = max(m) / qxn if m else None
            r["top1_agreement"] = agree.get(r["provider"])
        r.update(Q=Q, N=N, D=D, k=k, dtype=args.dtype, device=dev_type, **env)
    return dict(rows=rows, shape=dict(Q=Q, N=N, D=D, k=k, dtype=args.dtype), qxn_bytes=qxn, env=env)


def format_table(res: dict) -> str:
    s, env = res["shape"], res["env"]
    out = [f"**cosine top-k, Q={s['Q']}, N={s['N']}, D={s['D']}, k={s['k']}, {s['dtype']}, "
           f"{res['rows'][0]['device']}: {env['device_name']}, torch {env['torch']}, {env['threads']} threads**", "",
           "| provider | median ms (p20-p80) | GFLOP/s | x fastest | alloc peak MiB | RSS peak MiB | "
           "peak / QxN matrix | top-1 agrees |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        if r["status"] != "ok":
            out.append(f"| {r['provider']} | {r['status']} | | | | | | |")
            continue
        ap = "" if r["alloc_peak_bytes"] is None else f"{r['alloc_peak_bytes'] / MiB:.1f}"
        rss = "" if r["rss_peak_bytes"] is None else f"{r['rss_peak_bytes'] / MiB:.1f}"
        share = "" if r["mem_share_of_qxn"] is None else f"{100 * r['mem_share_of_qxn']:.1f} %"
        setup = f" (+{r['setup_bytes'] / MiB:.0f} MiB index)" if r["setup_bytes"] else ""
        agree = "" if r.get("top1_agreement") is None else f"{100 * r['top1_agreement']:.1f} %"
        out.append(f"| {r['provider']} | {r['median_ms']:.0f} ({r['p20_ms']:.0f}-{r['p80_ms']:.0f}) x{r['reps']} | "
                   f"{r['gflops']:.1f} | {r['x_fastest']:.2f} | {ap} | {rss}{setup} | {share} | {agree} |")
    out.append("")
    out.append(f"Q x N fp32 matrix: {res['qxn_bytes'] / MiB:.0f} MiB. Memory beyond the inputs (outputs: Q x k, "
               f"{s['Q'] * s['k'] * 12 / MiB:.2f} MiB).")
    return "\n".join(out)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sweep_cosine_topk", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("-Q", "--queries", type=int, default=2048)
    ap.add_argument("-N", "--gallery", type=int, default=262144)
    ap.add_argument("-D", "--dim", type=int, default=512)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--dtype", default="float32", choices=list(H.DTYPES))
    ap.add_argument("--providers", nargs="+", help="default: every one available here")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds at least (default 3)")
    ap.add_argument("--max-rounds", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.0, help="keep adding rounds until this many seconds")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (and faiss's)")
    ap.add_argument("--out", default="results", help="folder for cosine_topk_<device>.json")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    res = run(args)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"cosine_topk_{torch.device(args.device).type}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(format_table(res))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
