"""GPU benchmark of the fused L2-softmax loss: forward + backward at face-verification shapes, next to
the cuBLAS floor and the baselines, on one GPU (torch 2.11+, triton 3.6; nothing to install).

Shapes: B=1024, D=512, bf16 features and weights, alpha=16, mean loss, C = 131072 and 1048576.
Providers (the harness's names, benchmarks/harness.py, where they mean the same):
  gemm_floor       the three cuBLAS GEMMs of the same shapes (harness.make_step: logits, dX = dZ W, dW = dZ^T X)
  triton           l2_softmax_loss(..., backend="triton") + backward, the default: on a GPU the GEMM path
                   (gemm_path.py: cuBLAS GEMMs per class chunk + Triton row kernels) with its default budget
  triton:gemm@<d>  the GEMM path with max_logits_bytes = 0, a quarter of B x C x 2 bytes, all (d = 0, quarter,
                   all; triton_calls.GEMM_DIALS): 4 GEMMs, in between, 3 GEMMs. Core rows (also with --no-variants)
  triton:<name>    the fused kernels with both main kernels on GPU_CONFIGS[name] (l2sm_kernels/backends/triton/
                   config.py), for TIMED_VARIANTS (benchmarks/triton_calls.py: "fused", the fused default tiles,
                   and the alternatives; "fused_tma_wide" forces forward 64x128 and dW 128x64 TMA tiles), to
                   choose the defaults
  triton ops       the forward op alone, the backward op alone, the forward without the dX hint (lse only)
  plain            reference.plain_formula: F.cross_entropy(alpha * F.normalize(x) @ W.T, y) in bf16
  eager            l2_softmax_loss(..., backend="eager")
  compile          torch.compile of the plain formula with fp32 logits (as the H200 anchors were measured,
                   docs/design.md, "The roofline"; the harness's "compile" keeps bf16 logits)
  torch_lce        torch's chunked F.linear_cross_entropy (harness.torch_lce_function), where torch has it
  cce, cce_exact   Cut Cross-Entropy (default filtering / filter_eps=None), when importable
  liger            Liger-Kernel's fused linear cross-entropy, when importable (skipped at C=1M: ~2 s a step)
Each: median time (triton.testing.do_bench, CUDA events), peak memory allocated beyond the inputs during
one forward + backward, gradients included (l2sm_kernels.testing.peak_bytes: the one meter of the tests,
the harness and this script), and one torch.profiler pass (a few steps) giving each GPU kernel's time
per step (for triton: split, combine, rows, dW, inv-norm, colsum; the GEMM path: stats, dz, normalize,
norm-bwd and the library GEMMs, labelled GEMM), next to the whole step.

Accuracy first, on the GPU, at B=256, D=512, C=8192 bf16 (the same compiled kernels as the timed shapes):
loss, dX and dW against float64 by the accuracy relation of l2sm_kernels.testing (error <= 2 x plain
bf16's + atol) and as relative errors. Every GPU_CONFIGS entry is checked: the timed ones before they are
timed (a wrong variant is reported and not timed), the others (other dtypes' tiles: forced on both main
kernels in the dtype they serve) after the timings.

Phases (each its own process in benchmarks/gpu_run.sh, so that a CUDA fault, which is sticky and kills
the process's context, or a time-box kill costs that phase only; all merge into one JSON file):
  --phase triton     bf16 mm peak, gemm_floor, triton checks, triton and its ops, the variants, profiles,
                     then the checks of the other GPU_CONFIGS
  --phase baselines  plain, torch_lce, cce, liger, eager, then compile last (its cold compiles: one per
                     shape plus one for its accuracy check, the slowest part of the run)
  --phase report     no GPU: the tables from the JSON (table.txt), ending with time / floor and peak / gradients
  --phase all        the three in one process (a fault then loses what follows)
<out>/l2_softmax_gpu.json (--out, else $OUT, else results/) is rewritten after every row. Optional rows
(variants, extra baselines, profiles) are skipped once --budget seconds of the phase have passed.
--smoke: CPU tensors, the Triton interpreter, tiny shapes: checks this script, measures nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback

if "--smoke" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import warnings  # the interpreter's numpy evaluates masked-out lanes too (log(0) there is discarded)
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import l2sm_kernels as L  # noqa: E402
from benchmarks import harness as H  # noqa: E402
from benchmarks import triton_calls as TC  # noqa: E402
from l2sm_kernels.testing import assert_accurate, make_case, peak_bytes, run_reference  # noqa: E402
from l2sm_kernels.testing.accuracy import loss_and_grads  # noqa: E402

ALPHA = 16.0
SHAPES = [(1024, 512, 131072), (1024, 512, 1048576)]
CHECK_SHAPE = (256, 512, 8192)
SMOKE_SHAPES = [(8, 16, 64), (8, 16, 257)]  # --smoke: CPU, Triton interpreter, to test this script itself
SMOKE_CHECK_SHAPE = (8, 16, 100)
DTYPE = torch.bfloat16
DEV = "cuda"
JSON_NAME = "l2_softmax_gpu.json"
TABLE_NAME = "table.txt"

# the triton kernels by the names the profiler reports, and their short labels in the table
KERNEL_LABELS = {"_fwd_split_kernel": "split", "_fwd_combine_kernel": "combine", "_bwd_rows_kernel": "rows",
                 "_bwd_dw_kernel": "dW", "_inv_norm_kernel": "inv-norm", "_colsum_kernel": "colsum",
                 "_chunk_stats_kernel": "stats", "_chunk_dz_kernel": "dz", "_normalize_rows_kernel": "normalize",
                 "_normalize_backward_kernel": "norm-bwd"}
# library GEMM kernels (cuBLAS / cuBLASLt / CUTLASS names) in a profile: labelled "GEMM"
GEMM_KERNEL_MARKS = ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "ampere_", "cublas")


def kernel_label(name: str) -> str:
    """The short label of a profiled kernel: the triton kernels by name, library GEMMs as "GEMM", else ""."""
    if name in KERNEL_LABELS:
        return KERNEL_LABELS[name]
    low = name.lower()
    return "GEMM" if any(m in low for m in GEMM_KERNEL_MARKS) else ""
# GPU_CONFIGS entries not meant for bf16 x bf16 with a dX: checked in the setting they serve
CHECK_SETTINGS = {
    "lse": dict(dtype=torch.bfloat16, frozen_x=True),  # the forward without O' (features need no gradient)
    "lse_fp16": dict(dtype=torch.float16, frozen_x=True),
    "tf32": dict(dtype=torch.float32, matmul="high"),
    "ieee_fwd": dict(dtype=torch.float32, matmul="highest"),
    "ieee_dw": dict(dtype=torch.float32, matmul="highest"),
}
ANCHOR_ORDER = ["gemm_floor", "triton", "plain", "compile", "torch_lce", "cce", "cce_exact", "liger", "eager"]


# ------------------------------------------------------------------------------------------- basics
def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def _bench(fn, warmup=100, rep=400):
    """Median milliseconds: triton.testing.do_bench (CUDA events) on the GPU, a host clock in --smoke."""
    if DEV == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    t = time.perf_counter()  # --smoke: one call, the path not the number
    fn()
    return (time.perf_counter() - t) * 1e3


def _case(B, D, C):
    return H.Case(B, C, D, DTYPE, DEV, ALPHA)


def _key(B, D, C):
    return f"B{B}_D{D}_C{C}"


def _triton_fn(x, w, y):
    return L.l2_softmax_loss(x, w, y, ALPHA, backend="triton")


def baseline_functions():
    """name -> fn(x, W, y) -> mean loss, and name -> why absent. Baselines are imported, never rewritten."""
    fns, missing = {}, {}
    fns["plain"] = H.loss_function("plain", _case(*SHAPES[0]))
    why = H.torch_lce_missing()
    if why:
        missing["torch_lce"] = why
    else:
        fns["torch_lce"] = H.torch_lce_function(ALPHA)

    def l2(x):
        return ALPHA * F.normalize(x, dim=1)

    try:
        from cut_cross_entropy import linear_cross_entropy
        fns["cce"] = lambda x, w, y: linear_cross_entropy(l2(x), w, y)
        fns["cce_exact"] = lambda x, w, y: linear_cross_entropy(l2(x), w, y, filter_eps=None)
    except Exception as e:  # noqa: BLE001 - any import failure: report it
        missing["cce"] = missing["cce_exact"] = f"not importable: {type(e).__name__}: {str(e)[:150]}"
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        lig = LigerFusedLinearCrossEntropyLoss()
        fns["liger"] = lambda x, w, y: lig(w, l2(x), y)
    except Exception as e:  # noqa: BLE001
        missing["liger"] = f"not importable: {type(e).__name__}: {str(e)[:150]}"
    fns["eager"] = H.loss_function("eager", _case(*SHAPES[0]))

    def fp32_logits(x, w, y):
        return F.cross_entropy((l2(x) @ w.T).float(), y)

    fns["compile"] = torch.compile(fp32_logits, dynamic=False)
    return fns, missing


# ----------------------------------------------------------------------------------------- accuracy
def _fresh(t):
    return t.detach().clone().requires_grad_(t.requires_grad)


def accuracy(fn, dtype=DTYPE, frozen_x=False, shape=None):
    """Loss, dX, dW of fn(x, W, y) against float64 autograd of the formula, at the check shape:
    relative Frobenius errors, and the accuracy relation (error <= 2 x plain torch's in the same dtype
    + atol; l2sm_kernels.testing.assert_accurate) for each: {"ok": bool, "rel": {...}, "fail": [...]}."""
    B, D, C = shape or CHECK_SHAPE
    case = make_case(B, D, C, dtype=dtype, device=DEV, seed=1)
    if frozen_x:
        case.x.requires_grad_(False)
    ref, rgrads = run_reference(case, True)
    plain, pgrads = run_reference(case, False)
    mine = type(case)(_fresh(case.x), _fresh(case.weight), case.target, case.alpha)
    out, grads = loss_and_grads(lambda x, w, t, alpha, bias: fn(x, w, t), mine)
    res = {"ok": True, "rel": {}, "fail": []}
    for name, got, want, base in [("loss", out, ref, plain)] + [
            (f"grad {k}", grads[k], rgrads[k], pgrads[k]) for k in grads]:
        want64 = want.double()
        res["rel"][name] = float((got.double() - want64).norm() / want64.norm().clamp_min(1e-300))
        try:
            assert_accurate(name, got, want, base, dtype)
        except AssertionError as e:
            res["ok"] = False
            res["fail"].append(str(e)[:300])
    return res


@contextlib.contextmanager
def _matmul_precision(p):
    old = torch.get_float32_matmul_precision()
    if p:
        torch.set_float32_matmul_precision(p)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def variant(name, shape):
    """The context of a triton row: GPU_CONFIGS[name] forced on both main kernels (a VARIANT_PAIRS name: a
    configuration each), or "gemm@<dial>": the GEMM path with that dial's budget at this (B, D, C)."""
    base, _, dial = (name or "").partition("@")
    if dial:
        return TC.gemm_path(TC.gemm_budget(shape[0], shape[2], dial))
    return TC.forced_tiles(name)


def check_variant(name):
    """Accuracy of the triton backend with GPU_CONFIGS[name] forced on both main kernels (None: default;
    "gemm@<dial>": the GEMM path at that budget), in the setting that entry serves."""
    setting = CHECK_SETTINGS.get(name, {}) if name else {}
    with _matmul_precision(setting.get("matmul")), variant(name, CHECK_SHAPE) as used:
        res = accuracy(_triton_fn, dtype=setting.get("dtype", DTYPE), frozen_x=setting.get("frozen_x", False))
    res["setting"] = {k: str(v) for k, v in setting.items()} or {"dtype": str(DTYPE)}
    if name and used["calls"] == 0:  # the override never reached the launchers: the check checked nothing
        res["ok"] = False
        res["fail"].append("forced tiles were never asked for: the override did not take effect")
    return res


# ---------------------------------------------------------------------------------------- measuring
def _inputs(case):
    inp = H.make_inputs(case)
    return inp


def measure_loss(fn, case, prof_steps):
    """Time, peak memory and (prof_steps > 0) a kernel profile of forward + backward of fn."""
    inp = _inputs(case)
    x, w, y = inp.x, inp.W, inp.y

    def step():
        x.grad = None
        w.grad = None
        fn(x, w, y).backward()

    step()
    _sync()
    inp.clear_grads()
    peak, method = peak_bytes(step, DEV)
    inp.clear_grads()
    row = {"ms": _bench(step), "peak_bytes": peak, "grad_bytes": case.grad_bytes(), "mem_method": method}
    if prof_steps:
        row["profile"] = profile_kernels(step, prof_steps)
    inp.clear_grads()
    return row


def measure_floor(case, prof_steps):
    inp = _inputs(case)
    step = H.make_step(H.FLOOR, "forward_backward", case, inp)
    step()
    _sync()
    peak, method = peak_bytes(step, DEV)
    row = {"ms": _bench(step, 50, 300), "peak_bytes": peak, "grad_bytes": case.grad_bytes(), "mem_method": method}
    row["tflops"] = case.flops("forward_backward") / row["ms"] / 1e9
    if prof_steps:
        row["profile"] = profile_kernels(step, prof_steps)
    return row


def measure_ops(case):
    """The triton forward op and backward op timed apart (default tiles), through triton_calls."""
    inp = _inputs(case)
    x, w, y = inp.x.detach(), inp.W.detach(), inp.y
    alpha = torch.tensor(ALPHA, device=DEV)
    needs = (True, True, False, False)
    loss, lse, aux = TC.op_forward(x, w, y, alpha, None, TC.PLAIN, needs)
    g = torch.full_like(loss, 1.0 / case.B)
    z = torch.zeros_like(lse)
    return {"fwd_ms": _bench(lambda: TC.op_forward(x, w, y, alpha, None, TC.PLAIN, needs), 50, 200),
            "bwd_ms": _bench(lambda: TC.op_backward(g, z, x, w, y, alpha, None, lse, aux, TC.PLAIN, needs), 50, 200),
            "fwd_lse_only_ms": _bench(lambda: TC.op_forward(x, w, y, alpha, None, TC.PLAIN, (False,) * 4), 50, 200)}


def profile_kernels(step, steps):
    """One torch.profiler pass over `steps` steps: each GPU kernel's time per step (kernel events, their
    device time ranges), the triton ones labelled. On the CPU (--smoke) the top operators' self time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = DEV == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync()
    with H.quiet_profiler_logs(), profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        _sync()
    per = {}
    if cuda:
        for e in prof.events():
            if e.device_type != DeviceType.CUDA:
                continue
            k = per.setdefault(e.name, [0.0, 0])
            k[0] += e.time_range.elapsed_us()
            k[1] += 1
    else:
        for e in prof.key_averages():
            if e.self_cpu_time_total > 0:
                per[e.key] = [e.self_cpu_time_total, e.count]
    rows = [{"name": n[:120], "label": kernel_label(n), "ms_per_step": us / steps / 1e3,
             "calls_per_step": c / steps} for n, (us, c) in per.items()]
    rows.sort(key=lambda r: -r["ms_per_step"])
    return {"steps": steps, "what": "GPU kernels" if cuda else "CPU operators (self time)",
            "sum_ms_per_step": sum(r["ms_per_step"] for r in rows), "kernels": rows[:25]}


def peak_mm():
    n = 8192 if DEV == "cuda" else 256
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    return 2 * n ** 3 / _bench(lambda: a @ b, 50, 300) / 1e9


# ------------------------------------------------------------------------------------------- phases
class Run:
    """The JSON being built (merged into what earlier phases wrote) and the guards around each row."""

    def __init__(self, out, budget, only=None):
        self.path = os.path.join(out, JSON_NAME)
        self.t0 = time.time()
        self.budget = budget
        self.only = only  # name prefixes of the rows and checks to run (None: all)
        self.lost = None  # the CUDA error that killed this process's context, once one has
        try:
            with open(self.path) as f:
                self.res = json.load(f)
        except (OSError, ValueError):
            self.res = {}
        for k in ("runs", "checks", "missing", "phases"):
            self.res.setdefault(k, {})

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.res, f, indent=1)
        os.replace(tmp, self.path)

    def over_budget(self):
        return time.time() - self.t0 > self.budget

    def guarded(self, fn, *args):
        """fn(*args), or {"error": ...}: one failing row must not lose the others. A fault that kills the
        CUDA context makes every later GPU call fail: the rows after it are marked, not attempted."""
        if self.lost:
            return {"error": f"skipped: the CUDA context was lost earlier ({self.lost})"}
        try:
            out = fn(*args)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            out = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
        if DEV == "cuda":
            try:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001 - an asynchronous fault surfaces here
                self.lost = f"{type(e).__name__}: {str(e)[:200]}"
                print("CUDA context lost:", self.lost, flush=True)
                out = {"error": f"CUDA fault during this row: {self.lost}"}
        return out

    def selected(self, name):
        return self.only is None or any(name.startswith(p) for p in self.only)

    def row(self, shape, name, fn, *args, optional=False):
        if not self.selected(name):
            return {}
        key = _key(*shape)
        r = self.res["runs"].setdefault(key, {})
        if optional and self.over_budget():
            r[name] = {"error": "skipped: time budget"}
        else:
            r[name] = self.guarded(fn, *args)
        brief = {k: v for k, v in r[name].items() if k != "profile"}
        print(f"{key} {name} {brief} t={time.time() - self.t0:.0f}s", flush=True)
        self.save()
        return r[name]

    def check(self, name, fn, *args, optional=False):
        if not self.selected(name):
            return {}
        if optional and self.over_budget():
            self.res["checks"][name] = {"error": "skipped: time budget"}
        else:
            self.res["checks"][name] = self.guarded(fn, *args)
        print(f"check {name} {self.res['checks'][name]} t={time.time() - self.t0:.0f}s", flush=True)
        self.save()
        return self.res["checks"][name]


def environment(run):
    import triton
    env = run.res.setdefault("env", {})
    env.update(device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu (--smoke: nothing measured)",
               torch=torch.__version__, triton=triton.__version__,
               sms=torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else None,
               shapes=[list(s) for s in SHAPES], check_shape=list(CHECK_SHAPE), dtype=str(DTYPE), alpha=ALPHA)
    run.save()


def phase_triton(run, a):
    from l2sm_kernels.backends.triton.config import GPU_CONFIGS, VARIANT_PAIRS
    prof = a.profile_steps
    environment(run)
    run.res["bf16_mm_tflops"] = run.guarded(peak_mm)
    run.save()
    for s in SHAPES:
        run.row(s, "gemm_floor", measure_floor, _case(*s), prof)
    # accuracy before timing: the default, then each timed variant (a wrong one is not timed)
    ok = {}
    for name in (None,) + (() if a.no_variants else TC.TIMED_VARIANTS):
        c = run.check(f"triton:{name}" if name else "triton", check_variant, name)
        ok[name] = c.get("ok", False)
    for s in SHAPES:
        run.row(s, "triton", measure_loss, _triton_fn, _case(*s), prof)
        run.row(s, "triton_ops", measure_ops, _case(*s))
    # the GEMM path at its three budgets (core rows): checked, then timed beside the fused variants below
    for name in TC.GEMM_ROWS:
        c = run.check(f"triton:{name}", check_variant, name)
        ok[name] = c.get("ok", False)
    for name in TC.GEMM_ROWS:
        for s in SHAPES:
            if not ok[name]:
                run.res["runs"].setdefault(_key(*s), {})[f"triton:{name}"] = {
                    "error": "not timed: its accuracy check failed or did not run"}
                run.save()
                continue

            def timed_gemm(shape=s, n=name):
                with variant(n, shape):
                    return measure_loss(_triton_fn, _case(*shape), prof)
            run.row(s, f"triton:{name}", timed_gemm)
    for name in () if a.no_variants else TC.TIMED_VARIANTS:
        for s in SHAPES:
            if not run.selected(f"triton:{name}"):
                continue
            if not ok[name]:
                r = run.res["runs"].setdefault(_key(*s), {})
                r[f"triton:{name}"] = {"error": "not timed: " + ("its accuracy check failed"
                                                                   if "error" not in run.res["checks"][f"triton:{name}"]
                                                                   else "its accuracy check did not run")}
                run.save()
                continue

            def timed(shape=s, n=name):
                with variant(n, shape):
                    return measure_loss(_triton_fn, _case(*shape), prof)
            run.row(s, f"triton:{name}", timed, optional=True)
    # the other tiles, each in the setting it serves (other dtypes, the forward without dX); the halves of a
    # pair and the GEMM path's entry are checked above, as "fused_tma_wide" and "gemm@<dial>"
    halves = {n for pair in VARIANT_PAIRS.values() for n in pair} | {"gemm"}
    for name in GPU_CONFIGS:
        if f"triton:{name}" not in run.res["checks"] and name not in halves and (
                a.variant_checks or name not in CHECK_SETTINGS):
            run.check(f"triton:{name}", check_variant, name, optional=True)


def phase_baselines(run, a):
    prof = a.profile_steps
    environment(run)
    fns, missing = baseline_functions()
    run.res["missing"].update(missing)
    run.save()
    order = [n for n in ("plain", "torch_lce", "cce", "cce_exact", "liger", "eager") if n in fns]
    for name in order:
        run.check(name, accuracy, fns[name], optional=name != "plain")
        for s in SHAPES:
            if name == "liger" and s[2] > 200_000:
                run.res["runs"].setdefault(_key(*s), {})[name] = {
                    "error": "skipped: ~2 s per step at this size (anchors: 1797 ms)"}
                continue
            run.row(s, name, measure_loss, fns[name], _case(*s), prof, optional=name != "plain")
    # torch.compile last: one cold compile per shape (dynamic=False), then one more for its check
    for s in SHAPES:
        run.row(s, "compile", measure_loss, fns["compile"], _case(*s), prof)
    run.check("compile", accuracy, fns["compile"], optional=True)


# ------------------------------------------------------------------------------------------- report
def _gib(b):
    return b / 2**30


def report(res) -> str:
    """The tables: per shape every row (time, x floor, peak, x gradients, kernels); the checks; last a
    summary of time / floor and peak memory / gradients for triton and the anchors."""
    env = res.get("env", {})
    mm = res.get("bf16_mm_tflops")
    mm = f"{mm:.0f} TFLOP/s" if isinstance(mm, (int, float)) else (str(mm)[:80] if mm else "not measured")
    out = [f"{env.get('device', '?')}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
           f"{env.get('sms')} SMs; bf16 mm (8192^3) {mm}",
           "forward + backward, bf16, alpha=16, mean; median (do_bench); peak = memory allocated beyond the inputs "
           "(gradients included); kernels: torch.profiler, ms per step"]
    runs = res.get("runs", {})
    for key, r in runs.items():
        fl = (r.get("gemm_floor") or {}).get("ms")
        grads = next((v["grad_bytes"] for v in r.values() if isinstance(v, dict) and "grad_bytes" in v), None)
        out.append(f"\n== {key.replace('_', ' ')}: floor {fl:.3f} ms" if fl else f"\n== {key}: floor not measured")
        ops = r.get("triton_ops", {})
        if "fwd_ms" in ops:
            out.append(f"   triton ops: forward {ops['fwd_ms']:.3f} ms (lse only {ops['fwd_lse_only_ms']:.3f}), "
                       f"backward {ops['bwd_ms']:.3f} ms")
        elif ops:
            out.append(f"   triton ops: {ops.get('error', '')[:110]}")
        out.append(f"   {'provider':22s} {'ms':>9s} {'x floor':>8s} {'peak GiB':>9s} {'x grads':>8s}")
        for name, v in r.items():
            if name == "triton_ops" or not isinstance(v, dict):
                continue
            if "ms" not in v:
                out.append(f"   {name:22s} {v.get('error', '?')[:110]}")
                continue
            ratio = f"{v['ms'] / fl:8.2f}" if fl else f"{'':8s}"
            g = v.get("grad_bytes") or grads
            out.append(f"   {name:22s} {v['ms']:9.3f} {ratio} {_gib(v['peak_bytes']):9.3f} "
                       f"{v['peak_bytes'] / g if g else float('nan'):8.2f}")
            p = v.get("profile")
            if p and p.get("kernels"):
                named = [k for k in p["kernels"] if k["label"]]
                shown = named if named else p["kernels"][:3]
                other = p["sum_ms_per_step"] - sum(k["ms_per_step"] for k in shown)
                parts = [f"{k['label'] or k['name'][:40]} {k['ms_per_step']:.3f}" for k in shown]
                out.append(f"   {'':22s} kernels: " + ", ".join(parts) + f", other {other:.3f}; "
                           f"sum {p['sum_ms_per_step']:.3f} ms/step ({p['what']})")
    checks = res.get("checks", {})
    if checks:
        B, D, C = env.get("check_shape", CHECK_SHAPE)
        out.append(f"\naccuracy vs float64 (B={B} D={D} C={C}; relative Frobenius error; relation: error <= "
                   "2 x plain torch's in the same dtype + atol)")
        for name, c in checks.items():
            if "rel" not in c:
                out.append(f"   {name:22s} {c.get('error', '?')[:110]}")
                continue
            short = {"grad x": "dX", "grad weight": "dW"}
            rel = " ".join(f"{short.get(k, k)} {v:.2e}" for k, v in c["rel"].items())
            verdict = "ok  " if c["ok"] else "FAIL"
            setting = c.get("setting", {})
            extra = f" [{', '.join(f'{k}={v}' for k, v in setting.items())}]" if setting and name.startswith(
                "triton:") and name.split(":")[1] in CHECK_SETTINGS else ""
            out.append(f"   {name:22s} {verdict} {rel}{extra}")
            for f in c.get("fail", [])[:2]:
                out.append(f"      {f[:160]}")
    for name, why in res.get("missing", {}).items():
        out.append(f"   absent: {name}: {why[:150]}")
    # last: the summary docs/benchmarks.md shows
    keys = list(runs)
    names = [n for n in ANCHOR_ORDER if any(n in runs[k] for k in keys)]
    for n in [n for k in keys for n in runs[k] if n.startswith("triton:")] + list(res.get("missing", {})):
        if n not in names:
            names.append(n)
    out.append("\nsummary: time / floor, peak memory / gradients")
    out.append(f"   {'provider':22s} " + " ".join(f"{'C=' + k.split('_C')[-1]:>22s}" for k in keys))
    for name in names:
        cells = []
        for k in keys:
            r = runs[k]
            v, fl = r.get(name), (r.get("gemm_floor") or {}).get("ms")
            if v is None:
                cells.append(f"{'absent' if name in res.get('missing', {}) else '-':>22s}")
            elif "ms" in v:
                t = f"{v['ms'] / fl:.2f}x" if fl else f"{v['ms']:.2f}ms"
                m = f"{v['peak_bytes'] / v['grad_bytes']:.2f}x" if v.get("grad_bytes") else "?"
                cells.append(f"{t + ' / ' + m:>22s}")
            else:
                cells.append(f"{v.get('error', '?')[:21]:>22s}")
        out.append(f"   {name:22s} " + " ".join(cells))
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phase", choices=["triton", "baselines", "report", "all"], default="all")
    ap.add_argument("--out", default=os.environ.get("OUT") or "results")
    ap.add_argument("--budget", type=float, default=300.0,
                    help="seconds of this phase after which optional rows are skipped")
    ap.add_argument("--profile-steps", type=int, default=3, help="steps per torch.profiler pass (0: none)")
    ap.add_argument("--no-variants", action="store_true", help="time the default tiles only")
    ap.add_argument("--no-variant-checks", dest="variant_checks", action="store_false",
                    help="skip the accuracy checks of the GPU_CONFIGS entries of other settings (other dtypes, lse only)")
    ap.add_argument("--only", nargs="+", default=None,
                    help="run only the rows and checks whose name starts with one of these (e.g. gemm_floor triton plain)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU tensors, Triton interpreter, tiny shapes: checks this script, measures nothing")
    a = ap.parse_args()
    global DEV, SHAPES, CHECK_SHAPE
    if a.smoke:
        DEV, SHAPES, CHECK_SHAPE = "cpu", SMOKE_SHAPES, SMOKE_CHECK_SHAPE
    elif a.phase != "report" and not torch.cuda.is_available():
        sys.exit("no CUDA device (use --smoke to check the script on a CPU machine)")
    os.makedirs(a.out, exist_ok=True)
    run = Run(a.out, a.budget, a.only)
    phases = ["triton", "baselines", "report"] if a.phase == "all" else [a.phase]
    try:
        for ph in phases:
            if ph == "report":
                continue
            t = time.time()
            run.res["phases"][ph] = {"started": time.strftime("%H:%M:%S"), "done": False}
            run.save()
            (phase_triton if ph == "triton" else phase_baselines)(run, a)
            run.res["phases"][ph].update(done=True, wall_s=round(time.time() - t, 1))
            run.save()
    except KeyboardInterrupt:  # the time box (timeout -s INT): what was measured is already saved
        print(f"interrupted after {time.time() - run.t0:.0f} s; rows so far are in {run.path}", flush=True)
        run.save()
        sys.exit(124)
    if "report" in phases:
        text = report(run.res)
        with open(os.path.join(a.out, TABLE_NAME), "w") as f:
            f.write(text + "\n")
        print(text)
    return 1 if run.lost else 0


if __name__ == "__main__":
    sys.exit(main())
