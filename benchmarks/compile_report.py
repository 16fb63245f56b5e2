"""Compile the triton backend's kernels for a GPU without having one, and report what the compiler
made of them: registers per thread, spills (local memory), shared memory, and whether the products
use Hopper's warpgroup MMA (HGMMA in the SASS). Nothing runs; no timing; no GPU needed.

It drives the real launchers (l2sm_kernels/backends/triton: loss_forward.forward, loss_backward.backward) on meta tensors with a
recording `launch`, so each kernel is compiled with exactly the arguments, constexprs and tiles the
op would use at that shape; pointers are assumed 16-byte aligned and unit strides specialized, as
triton's runtime does for contiguous tensors.

    python benchmarks/compile_report.py                  # B=1024, D=512, C=131072, bf16, sm_90
    python benchmarks/compile_report.py --dtype mixed --arch 90 --json out.json

Must run without TRITON_INTERPRET (the kernels are compiled, not interpreted).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_report.py compiles kernels: unset TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from l2sm_kernels.backends.triton import kernel_namespace  # noqa: E402
from l2sm_kernels.options import L2SMOptions  # noqa: E402

K = kernel_namespace()

_TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
       torch.int64: "i64", torch.int32: "i32"}
_OPTION_KEYS = ("num_warps", "num_stages")


class Recorder:
    """A `launch` for the launchers: records every kernel call instead of running it."""

    def __init__(self):
        self.calls = []

    def __call__(self, kernel):
        rec = self

        class _Grid:
            def __getitem__(self, grid):
                def call(*args, **kwargs):
                    rec.calls.append((kernel, grid, args, kwargs))
                return call

        return _Grid()


def _spec(kernel, args, kwargs):
    """(signature, constexprs, attrs, options) as triton's runtime would specialize them."""
    names = kernel.arg_names
    sig, const, attrs, opts = {}, {}, {}, {}
    for k in _OPTION_KEYS:
        if k in kwargs:
            opts[k] = kwargs[k]
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k not in _OPTION_KEYS})
    for i, name in enumerate(names):
        v = bound[name]
        p = kernel.params[i]
        if p.is_constexpr:
            sig[name] = "constexpr"
            const[name] = v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _TY[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            if v == 1:
                sig[name] = "constexpr"
                const[name] = 1
            else:
                sig[name] = "i64" if not -2**31 <= v < 2**31 else "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{name}: {type(v)}")
    return sig, const, attrs, opts


def _resources(cubin: bytes, arch: int):
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        res = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    out = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"{key}:(\d+)", res)
        out[key.lower()] = int(m.group(1)) if m else None
    out["hgmma"] = len(re.findall(r"\bHGMMA\b", sass))
    out["hmma"] = len(re.findall(r"\bHMMA\b", sass))
    out["ldl_stl"] = len(re.findall(r"\b(LDL|STL)\b", sass))
    return out


def compile_calls(calls, arch: int):
    rows, seen = [], set()
    target = GPUTarget("cuda", arch, 32)
    for kernel, grid, args, kwargs in calls:
        sig, const, attrs, opts = _spec(kernel, args, kwargs)
        key = (kernel.__name__, tuple(sorted((k, str(v)) for k, v in const.items())), tuple(sorted(sig.items())))
        if key in seen:
            continue
        seen.add(key)
        row = {"kernel": kernel.__name__, "grid": [int(g) for g in grid],
               "tiles": {k: v for k, v in const.items() if k.startswith("BLOCK") or k in ("CHAIN_BREAK", "PREFETCH")},
               **opts}
        try:
            cc = triton.compile(ASTSource(kernel, sig, const, attrs), target=target, options=opts)
            row.update(_resources(cc.asm["cubin"], arch))
            row["shared"] = cc.metadata.shared  # dynamic shared memory (what triton allocates), bytes
            # approximate sqrt / division (sqrt.approx.ftz, div.full: what tl.sqrt and / compile to); the
            # kernels use tl.sqrt_rn / tl.div_rn so that the GPU rounds as the interpreter does
            row["approx_sqrt_div"] = len(re.findall(r"\b(?:sqrt\.approx|div\.full|div\.approx|rcp\.approx)",
                                                    cc.asm["ptx"]))
            row["mma_layouts"] = sorted(set(re.findall(r"warpsPerCTA = \[\d+, \d+\], instrShape = \[[\d, ]+\]",
                                                       cc.asm["ttgir"])))
        except Exception as e:  # report, do not stop: the point is to see every kernel
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--B", type=int, default=1024)
    ap.add_argument("--D", type=int, default=512)
    ap.add_argument("--C", type=int, default=131072)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32", "mixed"])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--options", default="all",
                    help="plain (the benchmark's loss), all, or a comma list of bias,norm,arcface,smooth,alpha")
    ap.add_argument("--fwd-config", default=None, help="forward tiles as rows,cols,k,do,warps,stages[,chain_break[,prefetch]]")
    ap.add_argument("--dw-config", default=None, help="dW tiles as rows,cols,k,do,warps,stages[,chain_break[,prefetch]]")
    ap.add_argument("--only", default=None, help="report only kernels whose name contains this")
    ap.add_argument("--variants", action="store_true",
                    help="also compile the main kernels with the other GPU_CONFIGS the GPU benchmark times")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    xdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "mixed": torch.bfloat16}[a.dtype]
    wdt = torch.float32 if a.dtype == "mixed" else xdt
    dev = torch.device("meta")
    x = torch.empty(a.B, a.D, device=dev, dtype=xdt)
    w = torch.empty(a.C, a.D, device=dev, dtype=wdt)
    t = torch.empty(a.B, device=dev, dtype=torch.int64)
    alpha = torch.empty((), device=dev, dtype=torch.float32)
    on = {"bias", "norm", "arcface", "smooth", "alpha"} if a.options == "all" else (
        set() if a.options == "plain" else set(a.options.split(",")))
    bias = torch.empty(a.C, device=dev, dtype=wdt) if "bias" in on else None
    opts = L2SMOptions(normalize_weight="norm" in on, margin_type="arcface" if "arcface" in on else "none",
                       margin=0.5 if "arcface" in on else 0.0, label_smoothing=0.1 if "smooth" in on else 0.0)
    needs = (True, True, "bias" in on, "alpha" in on)
    def cfg(text, default):
        if not text:
            return default
        v = [int(t) for t in text.split(",")]
        return K.Config(*v[:6], chain_break=bool(v[6]) if len(v) > 6 else False,
                        prefetch=bool(v[7]) if len(v) > 7 else False)

    fcfg = cfg(a.fwd_config, K.forward_config(a.D, xdt, wdt, True, gpu=True))
    wcfg = cfg(a.dw_config, K.dw_config(a.D, xdt, wdt, gpu=True))
    rec = Recorder()
    splits = K.forward_splits(a.B, a.C, a.D, True, fcfg, a.sms)
    loss, lse, aux = K.forward(x, w, t, alpha, bias, *opts.op_arguments(a.B, dev), *needs, launch=rec, config=fcfg,
                               splits=splits)
    lse_only = K.forward_config(a.D, xdt, wdt, False, gpu=True)
    K.forward(x, w, t, alpha, bias, *opts.op_arguments(a.B, dev), False, False, False, False, launch=rec,
              config=lse_only,
              splits=K.forward_splits(a.B, a.C, a.D, False, lse_only, a.sms))
    g = torch.empty(a.B, device=dev, dtype=torch.float32)
    K.backward(g, g, x, w, t, alpha, bias, *opts.op_tensors(a.B, dev), lse, aux, *opts.op_args(), *needs,
               launch=rec, config=wcfg)
    if a.variants:
        d_pad = K._pow2(a.D)
        for v in ("fused_prefetch", "fused_chained", "split_d"):
            vc = K.GPU_CONFIGS[v](d_pad)
            _, lse_v, aux_v = K.forward(x, w, t, alpha, bias, *opts.op_arguments(a.B, dev), *needs, launch=rec,
                                        config=vc,
                                        splits=K.forward_splits(a.B, a.C, a.D, True, vc, a.sms))
            K.backward(g, g, x, w, t, alpha, bias, *opts.op_tensors(a.B, dev), lse_v, aux_v, *opts.op_args(),
                       *needs, launch=rec, config=vc)
    calls = [c for c in rec.calls if not a.only or a.only in c[0].__name__]
    rows = compile_calls(calls, a.arch)
    print(f"sm_{a.arch}, B={a.B} D={a.D} C={a.C} {a.dtype}, options={a.options}, forward splits={splits}")
    print(f"{'kernel':22s} {'tiles':44s} {'warps':>5s} {'regs':>5s} {'stack':>5s} {'LDL/STL':>7s} "
          f"{'smem KiB':>8s} {'HGMMA':>5s}")
    for r in rows:
        tiles = ",".join(f"{k.replace('BLOCK_', '').replace('CHAIN_BREAK', 'CB').replace('PREFETCH', 'PF')}={int(v)}"
                         for k, v in r["tiles"].items())
        if "error" in r:
            print(f"{r['kernel']:22s} {tiles:44s} ERROR {r['error'][:200]}")
            continue
        print(f"{r['kernel']:22s} {tiles:44s} {r.get('num_warps', 4):5d} {r['reg']:5d} {r['stack']:5d} "
              f"{r['ldl_stl']:7d} {r['shared'] / 1024:8.1f} {r['hgmma']:5d}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
