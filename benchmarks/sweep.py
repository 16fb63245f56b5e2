"""Sweep harness: time and peak memory of every provider over the number of classes (and batch, feature
size, dtype, loss options), as tidy rows in CSV / JSON, a markdown table on stdout and a PNG.

    python -m benchmarks.sweep                      # CPU default: B=256, D=512, C=4096..65536, float32
    python -m benchmarks.sweep --device cuda        # CUDA default: B=1024, D=512, C=8192..1048576, bfloat16
    python -m benchmarks.sweep -C 65536 262144 -B 128 1024 --dtype float32 bfloat16 --skip compile
    python -m benchmarks.sweep -C 16384 65536 262144 --threads 2 --keep 0 1/4 all   # the memory dial (issue 19)

Providers (see harness.py): plain, eager, compile, every fused backend available_backends() lists for
the device (cpu, triton, ...), gemm_floor; and each fused backend once more per --keep setting of the
memory dial ("cpu keep=0", "cpu keep=1/4", "cpu keep=all": max_logits_bytes as that share of the
B x C products; the plain name runs the backend's default). A shape whose provider would not fit in memory gets a row
with status "skipped: would need X GiB" instead of running; a provider that fails gets "error: ...".
Outputs go to --out (default results/, ignored by git) as <name>.csv, <name>.json and <name>.png.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

if __package__ in (None, ""):  # `python benchmarks/sweep.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks import harness as H  # noqa: E402
from benchmarks import report as R  # noqa: E402
from l2sm_kernels.options import L2SMOptions  # noqa: E402

DEFAULTS = {
    "cpu": dict(batch=[256], dim=[512], classes=[4096, 8192, 16384, 32768, 65536], dtype=["float32"]),
    "cuda": dict(batch=[1024], dim=[512], classes=[8192, 32768, 131072, 524288, 1048576], dtype=["bfloat16"]),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    ap.add_argument("-C", "--classes", type=int, nargs="+", help="numbers of classes (default per device)")
    ap.add_argument("-B", "--batch", type=int, nargs="+", help="batch sizes (default 256 on CPU, 1024 on CUDA)")
    ap.add_argument("-D", "--dim", type=int, nargs="+", help="feature sizes (default 512)")
    ap.add_argument("--dtype", nargs="+", choices=list(H.DTYPES), help="input dtypes (default float32 on CPU, "
                    "bfloat16 on CUDA)")
    ap.add_argument("--ops", nargs="+", choices=H.OPS, default=list(H.OPS))
    ap.add_argument("--providers", nargs="+", help="providers to run (default: every one available for the device)")
    ap.add_argument("--skip", nargs="+", default=[], help="providers to leave out, e.g. --skip compile")
    ap.add_argument("--keep", nargs="*", default=list(H.KEEP_SPECS),
                    help="memory dial settings timed for each fused backend besides its default: 0, a fraction "
                         "a/b of the B x C products, all, or bytes (default: 0 1/4 all; --keep alone: none)")
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--normalize-weight", action="store_true")
    ap.add_argument("--margin-type", default="none", choices=["none", "cosface", "arcface"])
    ap.add_argument("--margin", type=float, default=0.0)
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    ap.add_argument("--min-reps", type=int, default=3, help="timed calls at least (default 3)")
    ap.add_argument("--max-reps", type=int, default=50, help="timed calls at most (default 50)")
    ap.add_argument("--min-time", type=float, default=1.0, help="keep timing until this many seconds (default 1)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    ap.add_argument("--mem-limit-gib", type=float,
                    help="treat this as the available memory in the fit check (default: what the device has free)")
    ap.add_argument("--out", default="results", help="output folder (default results/)")
    ap.add_argument("--name", help="output file stem (default sweep_<device>)")
    ap.add_argument("--format", nargs="+", choices=["csv", "json"], default=["csv", "json"])
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def run(args) -> tuple[list[dict], dict[str, str]]:
    """Measure every (dtype, B, D, C, op, provider); returns the rows and the output paths."""
    device = args.device
    dev_type = torch.device(device).type
    if dev_type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    d = DEFAULTS.get(dev_type, DEFAULTS["cpu"])
    batches, dims = args.batch or d["batch"], args.dim or d["dim"]
    classes, dtypes = sorted(args.classes or d["classes"]), args.dtype or d["dtype"]
    opts = L2SMOptions(normalize_weight=args.normalize_weight, margin_type=args.margin_type, margin=args.margin,
                       label_smoothing=args.label_smoothing)
    providers = [p for p in (args.providers or H.providers_for(dev_type)) if p not in args.skip]
    fused = [p for p in providers if p not in H.BASELINES and p not in (H.FLOOR, H.TORCH_LCE) and
             H.split_provider(p)[1] is None]
    for b in fused:  # the dial's rows right after the backend's own
        i = providers.index(b)
        providers[i + 1:i + 1] = [H.dialed(b, spec) for spec in args.keep if H.dialed(b, spec) not in providers]
    timing_kw = dict(warmup=args.warmup, min_reps=args.min_reps, max_reps=args.max_reps, min_time_s=args.min_time)
    limit = None if args.mem_limit_gib is None else int(args.mem_limit_gib * H.GiB)

    for name, why in H.fused_backends(dev_type).items():
        if why:
            print(f"note: backend {name!r} not benchmarked on {dev_type}: {why}", file=sys.stderr)
    env = H.environment(device)
    cases = [H.Case(B, C, D, H.DTYPES[dt], device, args.alpha, opts)
             for dt in dtypes for B in batches for D in dims for C in classes]
    rows: list[dict] = []
    bar = tqdm(total=len(cases) * len(args.ops) * len(providers), unit="run", disable=args.no_progress,
               dynamic_ncols=True)
    for case in cases:
        avail = H.available_bytes(device) if limit is None else limit
        too_big = H.fit_status(case.input_bytes(), avail)
        inputs = None if too_big else H.make_inputs(case)
        for op in args.ops:
            for p in providers:
                bar.set_description(f"{case.dtype_name} {case.shape} {op} {p}")
                if inputs is None:
                    rows.append(H.make_row(case, op, p, env, status=too_big.replace("would need", "inputs need"),
                                           need=case.input_bytes()))
                else:
                    rows.append(H.measure(case, op, p, inputs, env, available=limit, timing_kw=timing_kw))
                bar.update()
        del inputs
    bar.close()
    H.add_ratios(rows)

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.name or f"sweep_{dev_type}")
    paths = {}
    if "csv" in args.format:
        paths["csv"] = stem + ".csv"
        R.write_csv(rows, paths["csv"])
    if "json" in args.format:
        paths["json"] = stem + ".json"
        R.write_json(rows, paths["json"])
    if not args.no_plot:
        paths["png"] = stem + ".png"
        R.plot(rows, paths["png"])
    return rows, paths


def main(argv=None) -> int:
    args = parse_args(argv)
    rows, paths = run(args)
    print(R.format_table(rows))
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0


if __name__ == "__main__":
    gc.freeze()  # what exists after the imports is never garbage: each measurement's gc.collect() stays cheap
    sys.exit(main())
