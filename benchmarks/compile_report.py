"""Compile the triton backend's kernels for a GPU without having one, and report what the compiler
made of them, so that a kernel change can be judged on a CPU machine. Nothing runs; no timing.

It drives the real launchers (through benchmarks/triton_calls.py: loss_forward.forward,
loss_backward.backward) on meta tensors with a recording `launch`, so each kernel is compiled with
exactly the arguments, constexprs and tiles the op would use at that shape; pointers are assumed
16-byte aligned and unit strides specialized, as triton's runtime does for contiguous tensors. Then
triton's bundled ptxas builds the cubin and its cuobjdump gives the resource usage and the SASS.

    python benchmarks/compile_report.py                          # sm_90, B=1024 D=512 C=131072 bf16, plain and all options
    python benchmarks/compile_report.py --variants --markdown    # also the timed variants and the GEMM path's row kernels
    python benchmarks/compile_report.py --dtype mixed --options all --json out.json

Per kernel x configuration x option set ("plain": the benchmark's loss; "all": bias, normalize_weight,
arcface, label smoothing, alpha gradient), the fields of a row (--json writes them all):
  registers         registers per thread (also "reg")
  stack             stack frame bytes per thread (where spilled registers live)
  spill_bytes       bytes of local-memory traffic in the code: the widths of every LDL / STL instruction
                    summed (what ptxas -v counts as spill loads + spill stores)
  loop_spill_bytes  the same inside the main loop: local-memory bytes each thread moves per iteration
  shared            dynamic shared memory, bytes
  loop_instructions SASS instructions in the main loop's body
  loop_mma          matrix instructions in it (HGMMA: warpgroup MMA; HMMA: the older mma.sync path)
  async_tile_loads  whether the main loop loads asynchronously (cp.async: LDGSTS; TMA: UTMALDG; bulk
                    copies: UBLKCP): True means the streamed tiles come through the software pipeline,
                    False that each tile is a synchronous load (None: no main loop)
  async_ops         those instructions in the whole kernel, by opcode; ptx_cp_async: cp.async* in the PTX
  hgmma, hmma, ldl_stl   counts in the whole kernel; approx_sqrt_div: approximate sqrt / division in the PTX

The main loop, from the SASS: a loop is a backward branch (a BRA whose target address is lower than its
own) with every instruction from the target to the branch. If the kernel has matrix instructions inside
loops, the main loop is the smallest loop that contains all of them: the per-tile walk of the main
kernels (the class loop of the forward; the row loop of the dW pass, not its outer loop over class
blocks; with a K loop, the loop around it that also holds the second product). Otherwise it is the
loop with the most global loads (LDG / LDGSTS / UTMALDG), the smallest on a tie; none without loops.

Must run without TRITON_INTERPRET (the kernels are compiled, not interpreted); the SASS functions
(parse_sass, loops, main_loop, sass_report) can be imported anywhere.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks import triton_calls as TC  # noqa: E402
from l2sm_kernels.backends.triton import kernel_namespace  # noqa: E402
from l2sm_kernels.options import L2SMOptions  # noqa: E402

K = kernel_namespace()

_TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
       torch.int64: "i64", torch.int32: "i32"}
_OPTION_KEYS = ("num_warps", "num_stages")
NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def bundled_tools_missing() -> str:
    """"" when triton's bundled ptxas and cuobjdump are there, else what is missing."""
    missing = [t for t in ("ptxas", "cuobjdump") if not os.access(os.path.join(NVIDIA_BIN, t), os.X_OK)]
    return f"triton has no bundled {', '.join(missing)} in {NVIDIA_BIN}" if missing else ""


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
        elif type(v).__name__ == "TensorDescriptor":  # host-side TMA descriptor (triton.tools.tensor_descriptor)
            sig[name] = f"tensordesc<{_TY[v.base.dtype]}[{', '.join(str(int(b)) for b in v.block_shape)}]>"
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


# ----------------------------------------------------------------------------------------- the SASS
# one instruction of `cuobjdump -sass`: /*addr*/  [@[!]predicate]  OPCODE[.modifiers]  operands ;
_INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P(?:T|\d+)\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)([^;]*);",
                   re.M)
MMA_OPS = {"HGMMA", "HMMA", "QGMMA", "IGMMA", "IMMA", "BGMMA", "DMMA"}
ASYNC_OPS = {"LDGSTS", "UTMALDG", "UBLKCP"}  # cp.async, TMA tensor load, bulk copy
GLOBAL_LOADS = {"LDG", "LDGSTS", "UTMALDG", "UBLKCP"}
_WIDTH = {"64": 8, "128": 16, "U8": 1, "S8": 1, "U16": 2, "S16": 2}


def parse_sass(sass: str):
    """[(address, opcode with modifiers, operands)] of every instruction, in address order."""
    return [(int(a, 16), op, rest.strip()) for a, op, rest in _INSN.findall(sass)]


def _base(op: str) -> str:
    return op.split(".", 1)[0]


def local_bytes(op: str) -> int:
    """Bytes one LDL / STL moves per thread (by its width modifier), 0 for other instructions."""
    if _base(op) not in ("LDL", "STL"):
        return 0
    for m in op.split(".")[1:]:
        if m in _WIDTH:
            return _WIDTH[m]
    return 4


def loops(insns):
    """[(start, end)] address ranges of the loops: each backward branch (BRA to a lower address; a branch
    to itself, the trap after EXIT, is no loop) with everything from its target to itself."""
    out = []
    for addr, op, rest in insns:
        if _base(op) != "BRA":
            continue
        targets = re.findall(r"0x([0-9a-f]+)", rest)
        if targets and int(targets[-1], 16) < addr:
            out.append((int(targets[-1], 16), addr))
    return out


def main_loop(insns):
    """(start, end) of the main loop (see the module docstring), or None."""
    ls = loops(insns)
    if not ls:
        return None

    def inside(lo, hi, ops):
        return [a for a, op, _ in insns if lo <= a <= hi and _base(op) in ops]

    size = {lp: sum(1 for a, _, _ in insns if lp[0] <= a <= lp[1]) for lp in ls}
    mma = sorted({a for lp in ls for a in inside(*lp, MMA_OPS)})
    if mma:
        holding = [lp for lp in ls if lp[0] <= mma[0] and mma[-1] <= lp[1]]
        if holding:
            return min(holding, key=lambda lp: size[lp])
        return max(ls, key=lambda lp: (len(inside(*lp, MMA_OPS)), -size[lp]))  # split over sibling loops
    best = max(ls, key=lambda lp: (len(inside(*lp, GLOBAL_LOADS)), -size[lp]))
    return best if inside(*best, GLOBAL_LOADS) else None


def sass_report(sass: str) -> dict:
    """The SASS-derived fields of a row (see the module docstring)."""
    insns = parse_sass(sass)
    ops = [_base(op) for _, op, _ in insns]
    row = {"instructions": len(insns), "hgmma": ops.count("HGMMA"), "hmma": ops.count("HMMA"),
           "ldl_stl": sum(o in ("LDL", "STL") for o in ops),
           "spill_bytes": sum(local_bytes(op) for _, op, _ in insns),
           "async_ops": {o: ops.count(o) for o in sorted(ASYNC_OPS) if o in ops}}
    lp = main_loop(insns)
    if lp is None:
        row.update(loop=None, loop_instructions=None, loop_mma=None, loop_spill_bytes=None, async_tile_loads=None)
        return row
    body = [(a, op) for a, op, _ in insns if lp[0] <= a <= lp[1]]
    row.update(loop=[f"{lp[0]:#x}", f"{lp[1]:#x}"], loop_instructions=len(body),
               loop_mma=sum(_base(op) in MMA_OPS for _, op in body),
               loop_spill_bytes=sum(local_bytes(op) for _, op in body),
               async_tile_loads=any(_base(op) in ASYNC_OPS for _, op in body))
    return row


def _resources(cubin: bytes, arch: int):
    cuobjdump = os.path.join(NVIDIA_BIN, "cuobjdump")
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
    out["registers"] = out["reg"]
    out.update(sass_report(sass))
    return out


# ------------------------------------------------------------------------------------------ compiling
_COMPILED: dict = {}  # compile key -> the compiler's fields (a kernel shared by several configurations once)


def _config_name(cfg, D: int) -> str:
    """The GPU_CONFIGS entry a Config is (at the padded D), else its tile sizes."""
    for name, make in K.GPU_CONFIGS.items():
        if make(K._pow2(D)) == cfg:
            return name
    return (f"{cfg.block_rows}x{cfg.block_cols}x{cfg.block_k}/{cfg.block_do} w{cfg.num_warps} s{cfg.num_stages}"
            + (" cb" if cfg.chain_break else "") + (" pf" if cfg.prefetch else ""))


def compile_calls(calls, arch: int, labels: dict | None = None, seen: set | None = None):
    """One row per distinct kernel compile among `calls` (those already in `seen` are left out)."""
    rows = []
    seen = set() if seen is None else seen
    target = GPUTarget("cuda", arch, 32)
    for kernel, grid, args, kwargs in calls:
        sig, const, attrs, opts = _spec(kernel, args, kwargs)
        key = (kernel.__name__, tuple(sorted((k, str(v)) for k, v in const.items())), tuple(sorted(sig.items())),
               tuple(sorted(opts.items())), arch)
        if key in seen:
            continue
        seen.add(key)
        row = {"kernel": kernel.__name__, **(labels or {}), "grid": [int(g) for g in grid],
               "tiles": {k: v for k, v in const.items() if k.startswith("BLOCK") or k in ("CHAIN_BREAK", "PREFETCH")},
               **opts}
        if key not in _COMPILED:
            info = {}
            try:
                cc = triton.compile(ASTSource(kernel, sig, const, attrs), target=target, options=opts)
                info.update(_resources(cc.asm["cubin"], arch))
                info["shared"] = cc.metadata.shared  # dynamic shared memory (what triton allocates), bytes
                # approximate sqrt / division (sqrt.approx.ftz, div.full: what tl.sqrt and / compile to); the
                # kernels use tl.sqrt_rn / tl.div_rn so that the GPU rounds as the interpreter does
                ptx = cc.asm["ptx"]
                info["approx_sqrt_div"] = len(re.findall(r"\b(?:sqrt\.approx|div\.full|div\.approx|rcp\.approx)", ptx))
                info["ptx_cp_async"] = len(re.findall(r"\bcp\.async\b", ptx))
                info["mma_layouts"] = sorted(set(re.findall(r"warpsPerCTA = \[\d+, \d+\], instrShape = \[[\d, ]+\]",
                                                            cc.asm["ttgir"])))
            except Exception as e:  # report, do not stop: the point is to see every kernel
                info["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            _COMPILED[key] = info
        row.update(_COMPILED[key])
        rows.append(row)
    return rows


def option_set(name: str):
    """(L2SMOptions, bias?, alpha gradient?) of an option set: plain, all, or a comma list of
    bias,norm,arcface,smooth,alpha."""
    on = {"bias", "norm", "arcface", "smooth", "alpha"} if name == "all" else (
        set() if name == "plain" else set(name.split(",")))
    opts = L2SMOptions(normalize_weight="norm" in on, margin_type="arcface" if "arcface" in on else "none",
                       margin=TC.ALL_OPTIONS.margin if "arcface" in on else 0.0,
                       label_smoothing=TC.ALL_OPTIONS.label_smoothing if "smooth" in on else 0.0)
    return opts, "bias" in on, "alpha" in on


def record(a, xdt, wdt, options_name, fcfg_text=None, wcfg_text=None):
    """[(path, config, calls)]: the launches of one training step for each configuration: the default
    (forward with the dX hint, backward), the forward without it ("lse only"), and the variants."""
    dev = torch.device("meta")
    x = torch.empty(a.B, a.D, device=dev, dtype=xdt)
    w = torch.empty(a.C, a.D, device=dev, dtype=wdt)
    t = torch.empty(a.B, device=dev, dtype=torch.int64)
    alpha = torch.empty((), device=dev, dtype=torch.float32)
    opts, has_bias, alpha_grad = option_set(options_name)
    bias = torch.empty(a.C, device=dev, dtype=wdt) if has_bias else None
    needs = (True, True, has_bias, alpha_grad)
    g = torch.empty(a.B, device=dev, dtype=torch.float32)

    def cfg(text, default):
        if not text:
            return default
        v = [int(s) for s in text.split(",")]
        return K.Config(*v[:6], chain_break=bool(v[6]) if len(v) > 6 else False,
                        prefetch=bool(v[7]) if len(v) > 7 else False)

    def step(fcfg, wcfg):
        rec = Recorder()
        splits = K.forward_splits(a.B, a.C, a.D, True, fcfg, a.sms)
        _, lse, aux = TC.launch_forward(K, x, w, t, alpha, bias, opts, needs, launch=rec, config=fcfg, splits=splits)
        TC.launch_backward(K, g, g, x, w, t, alpha, bias, lse, aux, opts, needs, launch=rec, config=wcfg)
        return rec.calls, splits

    # "default": the fused kernels' default tiles (on a GPU the op's default path is the GEMM path, reported
    # as the "gemm" row with --variants: its row kernels)
    from l2sm_kernels.backends.triton import config as cfg_mod
    saved_path = cfg_mod._PATH
    cfg_mod._PATH = "fused"
    try:
        fcfg = cfg(fcfg_text, K.forward_config(a.D, xdt, wdt, True, gpu=True))
        wcfg = cfg(wcfg_text, K.dw_config(a.D, xdt, wdt, gpu=True))
        lse_cfg = K.forward_config(a.D, xdt, wdt, False, gpu=True)
    finally:
        cfg_mod._PATH = saved_path
    calls, splits = step(fcfg, wcfg)
    out = [("default", f"{_config_name(fcfg, a.D)} / dW {_config_name(wcfg, a.D)}", calls, splits)]
    rec = Recorder()
    lse_splits = K.forward_splits(a.B, a.C, a.D, False, lse_cfg, a.sms)
    TC.launch_forward(K, x, w, t, alpha, bias, opts, (False, False, False, False), launch=rec, config=lse_cfg,
                      splits=lse_splits)
    out.append(("lse only", _config_name(lse_cfg, a.D), rec.calls, lse_splits))
    if a.variants:
        for v in TC.TIMED_VARIANTS + ("gemm",):
            fv, wv = K.VARIANT_PAIRS.get(v, (v, v))
            calls, splits = step(K.GPU_CONFIGS[fv](K._pow2(a.D)), K.GPU_CONFIGS[wv](K._pow2(a.D)))
            out.append((v, v, calls, splits))
    return out


def markdown(rows, title) -> str:
    cols = ["options", "path", "kernel", "tiles", "warps", "regs", "stack", "spill B", "loop spill B", "smem KiB",
            "loop instr", "loop MMA", "async loads"]
    out = [title, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['options']} | {r['path']} | {r['kernel']} | ERROR {r['error'][:120]} |" + " |" * 9)
            continue
        out.append("| " + " | ".join(str(c) for c in [
            r["options"], r["path"], r["kernel"].strip("_").replace("_kernel", ""), _tiles(r),
            r.get("num_warps", 4), r["registers"], r["stack"], r["spill_bytes"], _na(r["loop_spill_bytes"]),
            f"{r['shared'] / 1024:.1f}", _na(r["loop_instructions"]), _na(r["loop_mma"]),
            _na(r["async_tile_loads"], {True: "yes", False: "no"})]) + " |")
    return "\n".join(out)


def _na(v, names=None):
    return "-" if v is None else (names or {}).get(v, v)


def _tiles(r):
    return ",".join(f"{k.replace('BLOCK_', '').replace('CHAIN_BREAK', 'CB').replace('PREFETCH', 'PF')}={int(v)}"
                    for k, v in r["tiles"].items())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--B", type=int, default=1024)
    ap.add_argument("--D", type=int, default=512)
    ap.add_argument("--C", type=int, default=131072)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32", "mixed"])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--options", nargs="+", default=["plain", "all"],
                    help="option sets: plain (the benchmark's loss), all, or comma lists of bias,norm,arcface,smooth,alpha")
    ap.add_argument("--fwd-config", default=None, help="forward tiles as rows,cols,k,do,warps,stages[,chain_break[,prefetch]]")
    ap.add_argument("--dw-config", default=None, help="dW tiles as rows,cols,k,do,warps,stages[,chain_break[,prefetch]]")
    ap.add_argument("--only", nargs="+", default=None, help="report only kernels whose name contains one of these")
    ap.add_argument("--variants", action="store_true",
                    help="also compile the main kernels with the other GPU_CONFIGS the GPU benchmark times")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table (docs/triton_notes.md)")
    ap.add_argument("--json", default=None, help="write every row, all fields, here")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):  # (importing this module is fine: tests do)
        sys.exit("compile_report.py compiles kernels: unset TRITON_INTERPRET")
    missing = bundled_tools_missing()
    if missing:
        sys.exit(missing)
    xdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "mixed": torch.bfloat16}[a.dtype]
    wdt = torch.float32 if a.dtype == "mixed" else xdt
    rows, splits_seen = [], {}
    for oname in a.options:
        seen = set()
        for path, cfg_name, calls, splits in record(a, xdt, wdt, oname, a.fwd_config, a.dw_config):
            splits_seen[path] = splits
            calls = [c for c in calls if not a.only or any(o in c[0].__name__ for o in a.only)]
            rows += compile_calls(calls, a.arch, {"options": oname, "path": path, "config": cfg_name}, seen)
    title = (f"sm_{a.arch}, B={a.B} D={a.D} C={a.C} {a.dtype}; forward splits {splits_seen.get('default')} "
             f"(lse only {splits_seen.get('lse only')}) for {a.sms} SMs; triton {triton.__version__}")
    if a.markdown:
        print(markdown(rows, title))
    else:
        print(title)
        print(f"{'options':8s} {'path':15s} {'kernel':20s} {'tiles':40s} {'warps':>5s} {'regs':>4s} {'stack':>5s} "
              f"{'spillB':>6s} {'loopSpB':>7s} {'smemKiB':>7s} {'loopIns':>7s} {'loopMMA':>7s} {'async':>5s}")
        for r in rows:
            head = f"{r['options'][:8]:8s} {r['path'][:15]:15s} {r['kernel'][:20]:20s} {_tiles(r)[:40]:40s}"
            if "error" in r:
                print(f"{head} ERROR {r['error'][:200]}")
                continue
            print(f"{head} {r.get('num_warps', 4):5d} {r['registers']:4d} {r['stack']:5d} {r['spill_bytes']:6d} "
                  f"{str(_na(r['loop_spill_bytes'])):>7s} {r['shared'] / 1024:7.1f} "
                  f"{str(_na(r['loop_instructions'])):>7s} {str(_na(r['loop_mma'])):>7s} "
                  f"{str(_na(r['async_tile_loads'], {True: 'yes', False: 'no'})):>5s}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "title": title, "rows": rows}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
