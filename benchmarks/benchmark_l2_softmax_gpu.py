"""GPU benchmark of the fused L2-softmax loss: forward + backward at face-verification shapes, next to
the cuBLAS floor and the baselines, all in one run on one GPU (torch 2.11+, triton 3.6; nothing to install).

Rows (B=1024, D=512, bf16 features and weights, alpha=16, mean loss, C = 131072 and 1048576):
  gemm_floor       the three cuBLAS GEMMs of the same shapes (logits, dX = dZ W, dW = dZ^T X), bf16
  triton           l2_softmax_loss(..., backend="triton") + backward (the default tiles)
  triton:<variant> the same with other tiles (l2sm_kernels/backends/triton/config.py: GPU_CONFIGS), to choose defaults
  triton fwd/bwd   the forward op alone and the backward op alone (default tiles)
  plain            reference.plain_formula: F.cross_entropy(alpha * F.normalize(x) @ W.T, y) in bf16
  compile          torch.compile of the same formula with fp32 logits (as the H200 anchors were measured, docs/design.md, "The roofline")
  cce, cce_exact   Cut Cross-Entropy (default filtering / filter_eps=None), when importable
  liger            Liger-Kernel's fused linear cross-entropy, when importable (skipped at C=1M: ~2 s a step)
Each: median time (triton.testing.do_bench, CUDA events), peak memory allocated beyond the inputs
during one forward + backward (gradients included), and the relative error of loss, dX, dW against
float64 at B=256, C=8192. Memory measured the way the anchors measured it.

Order: the baselines first (bf16 mm peak, gemm_floor, plain, compile, cce, liger; accuracy, then every shape),
then triton, then its variants: a fault in a triton kernel that kills the CUDA context cannot take the
baselines along (the rows after it are marked as skipped). Writes every number to <out>/l2_softmax_gpu.json
(out: --out, else $OUT, else results/) as it comes and prints a short table last. Meant to take a few
minutes; the optional rows (cce, liger, variants) are skipped once --budget seconds have passed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

if "--smoke" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import l2sm_kernels as L  # noqa: E402
from l2sm_kernels.reference import plain_formula  # noqa: E402
from l2sm_kernels.testing import peak_bytes  # noqa: E402

ALPHA = 16.0
SHAPES = [(1024, 512, 131072), (1024, 512, 1048576)]
SMOKE_SHAPES = [(8, 16, 64), (8, 16, 257)]  # --smoke: CPU, Triton interpreter, to test this script itself
DEV = "cuda"


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def _bench(fn, warmup, rep):
    """Median milliseconds: triton.testing.do_bench (CUDA events) on the GPU, a host clock in --smoke."""
    if DEV == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return sorted(ts)[1]
VARIANTS = ["fused_prefetch", "fused_chained", "split_d"]  # besides the default ("fused" for bf16 at D <= 512)
ESSENTIAL = {"gemm_floor", "plain", "compile", "triton", "triton_ops"}  # rows measured whatever the time budget


def _l2(x):
    return ALPHA * F.normalize(x, dim=1)


def methods():
    """name -> fn(x, w, y) returning the mean loss; baselines that cannot load give their reason."""
    out, missing = {}, {}
    out["triton"] = lambda x, w, y: L.l2_softmax_loss(x, w, y, ALPHA, backend="triton")
    out["plain"] = lambda x, w, y: plain_formula(x, w, y, ALPHA)

    def fp32_logits(x, w, y):
        return F.cross_entropy((_l2(x) @ w.T).float(), y)

    out["compile"] = torch.compile(fp32_logits, dynamic=False)
    try:
        from cut_cross_entropy import linear_cross_entropy
        out["cce"] = lambda x, w, y: linear_cross_entropy(_l2(x), w, y)
        out["cce_exact"] = lambda x, w, y: linear_cross_entropy(_l2(x), w, y, filter_eps=None)
    except Exception as e:  # noqa: BLE001 - any import failure: report it
        missing["cce"] = repr(e)[:200]
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        lig = LigerFusedLinearCrossEntropyLoss()
        out["liger"] = lambda x, w, y: lig(w, _l2(x), y)
    except Exception as e:  # noqa: BLE001
        missing["liger"] = repr(e)[:200]
    return out, missing


def inputs(B, D, C, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(B, D, device=DEV, dtype=torch.bfloat16, generator=g).requires_grad_()
    w = (torch.randn(C, D, device=DEV, generator=g) * 0.05).bfloat16().requires_grad_()
    y = torch.randint(0, C, (B,), device=DEV, generator=g)
    return x, w, y


def accuracy(fn, B=256, D=512, C=8192):
    if DEV != "cuda":
        B, D, C = 8, 16, 100
    """Relative error (Frobenius) of loss, dX, dW against float64 autograd of the formula."""
    x, w, y = inputs(B, D, C, seed=1)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    l64 = F.cross_entropy(_l2(x64) @ w64.T, y)
    l64.backward()
    loss = fn(x, w, y)
    loss.backward()

    def rel(a, b):
        return float((a.double() - b).norm() / b.norm())

    return {"loss_rel": abs(float(loss) - float(l64)) / abs(float(l64)), "gx_rel": rel(x.grad, x64.grad),
            "gw_rel": rel(w.grad, w64.grad)}


def bench(fn, B, D, C, warmup=100, rep=400):
    x, w, y = inputs(B, D, C)

    def step():
        x.grad = None
        w.grad = None
        fn(x, w, y).backward()

    step()
    _sync()
    x.grad = None
    w.grad = None
    peak, _ = peak_bytes(lambda: fn(x, w, y).backward(), DEV)
    x.grad = None
    w.grad = None
    ms = _bench(step, warmup, rep)
    return {"ms": ms, "peak_extra_GiB": peak / 2**30, "grads_GiB": (x.numel() + w.numel()) * 2 / 2**30}


def bench_ops(B, D, C):
    """The triton forward op and backward op timed apart (default tiles)."""
    from l2sm_kernels.backends import ops_for
    fwd, bwd = ops_for("triton")
    x, w, y = inputs(B, D, C)
    x, w = x.detach(), w.detach()
    alpha = torch.tensor(ALPHA, device=DEV)
    opts = L.L2SMOptions().op_args()
    needs = (True, True, False, False)
    loss, lse, aux = fwd(x, w, y, alpha, None, *opts, *needs)
    g = torch.full_like(loss, 1.0 / B)
    z = torch.zeros_like(lse)
    out = {"fwd_ms": _bench(lambda: fwd(x, w, y, alpha, None, *opts, *needs), 50, 200),
           "bwd_ms": _bench(lambda: bwd(g, z, x, w, y, alpha, None, lse, aux, *opts, *needs), 50, 200),
           "fwd_lse_only_ms": _bench(lambda: fwd(x, w, y, alpha, None, *opts, False, False, False, False), 50, 200)}
    return out


def gemm_floor(B, D, C):
    xs = torch.randn(B, D, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(C, D, device=DEV, dtype=torch.bfloat16)
    dz = torch.randn(B, C, device=DEV, dtype=torch.bfloat16)

    def three():
        xs @ w.T
        dz @ w
        dz.T @ xs

    ms = _bench(three, 50, 300)
    del dz
    return {"ms": ms, "tflops": 6 * B * C * D / ms / 1e9}


def peak_mm():
    n = 8192 if DEV == "cuda" else 256
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    return 2 * n ** 3 / _bench(lambda: a @ b, 50, 300) / 1e9


class _Variant:
    """Make the triton launchers use GPU_CONFIGS[name] for both main kernels (the benchmark only)."""

    def __init__(self, name):
        from l2sm_kernels.backends.triton import kernel_namespace
        K = kernel_namespace()
        self.K, self.name = K, name

    def __enter__(self):
        K, name = self.K, self.name
        self.saved = K.forward_config, K.dw_config
        fwd0, dw0 = self.saved
        K.forward_config = lambda D, xdt, wdt, acc_o, gpu, variant=None, C=0: (
            fwd0(D, xdt, wdt, acc_o, gpu, variant=name if acc_o else None, C=C))
        K.dw_config = lambda D, xdt, wdt, gpu, variant=None, C=0: dw0(D, xdt, wdt, gpu, variant=name, C=C)

    def __exit__(self, *exc):
        self.K.forward_config, self.K.dw_config = self.saved


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "results")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds after which remaining rows are skipped")
    ap.add_argument("--no-variants", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU tensors, Triton interpreter, tiny shapes: checks this script, measures nothing")
    a = ap.parse_args()
    global DEV, SHAPES
    if a.smoke:
        DEV, SHAPES = "cpu", SMOKE_SHAPES
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device (use --smoke to check the script on a CPU machine)")
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    res = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (--smoke: nothing measured)",
           "torch": torch.__version__, "runs": {}, "checks": {}}
    import triton
    res["triton"] = triton.__version__
    res["sms"] = torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else None
    fns, res["missing"] = methods()

    def save():
        with open(os.path.join(a.out, "l2_softmax_gpu.json"), "w") as f:
            json.dump(res, f, indent=1)

    lost = []  # the CUDA error that killed the context (illegal address etc. are sticky), once one has

    def guarded(fn, *args):
        """fn(*args), or {"error": ...}: one failing row must not lose the others. A fault that kills the
        CUDA context makes every later GPU call fail: the rows after it are marked, not attempted."""
        if lost:
            return {"error": f"skipped: the CUDA context was lost earlier ({lost[0]})"}
        try:
            out = fn(*args)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            out = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        if DEV == "cuda":
            try:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001 - an asynchronous fault surfaces here
                lost.append(f"{type(e).__name__}: {str(e)[:200]}")
                print("CUDA context lost:", lost[0], flush=True)
                out = {"error": f"CUDA fault during this row: {lost[0]}"}
        return out

    def run_rows(rows):
        """rows: (name, fn) measured at every shape. gemm_floor, plain, compile, triton and its ops always run;
        the others are skipped once the budget is spent."""
        for (B, D, C) in SHAPES:
            key = f"B{B}_D{D}_C{C}"
            r = res["runs"].setdefault(key, {})
            for name, fn in rows:
                if name not in ESSENTIAL and time.time() - t0 > a.budget:
                    r[name] = {"error": "skipped: time budget"}
                    continue
                if name == "liger" and C > 200_000:
                    r[name] = {"error": "skipped: ~2 s per step at this size (anchors: 1797 ms)"}
                    continue
                if name == "gemm_floor":
                    r[name] = guarded(gemm_floor, B, D, C)
                elif name == "triton_ops":
                    r[name] = guarded(bench_ops, B, D, C)
                elif fn is None:  # a triton variant: the whole step (backward too) under its tiles
                    with _Variant(name.split(":", 1)[1]):
                        r[name] = guarded(bench, lambda x, w, y: L.l2_softmax_loss(x, w, y, ALPHA, backend="triton"),
                                          B, D, C)
                else:
                    r[name] = guarded(bench, fn, B, D, C)
                print(key, name, r[name], f"t={time.time() - t0:.0f}s", flush=True)
                save()

    def check(name, fn):
        res["checks"][name] = guarded(accuracy, fn)
        print("check", name, res["checks"][name], f"t={time.time() - t0:.0f}s", flush=True)
        save()

    # the baselines first (peak mm, gemm_floor, plain, compile, ...), all shapes, saved as they come: this is the
    # kernels' first run on a GPU, and a fault there (sticky: the CUDA context is lost) must not take them along
    res["bf16_mm_tflops_8192"] = guarded(peak_mm)
    baselines = [(n, f) for n, f in fns.items() if n != "triton"]
    for name, fn in baselines:
        check(name, fn)
    run_rows([("gemm_floor", None)] + baselines)
    # then triton: accuracy, the whole step, the ops apart; other tiles last (the first to go when time runs out)
    check("triton", fns["triton"])
    run_rows([("triton", fns["triton"]), ("triton_ops", None)])
    if not a.no_variants:
        run_rows([(f"triton:{v}", None) for v in VARIANTS])
    res["wall_s"] = time.time() - t0
    save()

    # the short table, last
    mm = res["bf16_mm_tflops_8192"]
    mm = f"{mm:.0f} TFLOP/s" if isinstance(mm, float) else str(mm)[:100]
    print(f"\n{res['device']}, torch {res['torch']}, triton {res['triton']}; bf16 mm {mm}; "
          f"bf16 alpha=16, forward+backward, median; peak memory beyond the inputs")
    for key, r in res["runs"].items():
        fl = r.get("gemm_floor", {}).get("ms")
        print(f"== {key}: 3-GEMM floor {fl:.3f} ms" if fl else f"== {key}: floor {r.get('gemm_floor')}")
        ops = r.get("triton_ops", {})
        if "fwd_ms" in ops:
            print(f"   triton ops: forward {ops['fwd_ms']:.3f} ms (lse only {ops['fwd_lse_only_ms']:.3f}), "
                  f"backward {ops['bwd_ms']:.3f} ms")
        elif "error" in ops:
            print(f"   triton ops: {ops['error'][:100]}")
        for name, v in r.items():
            if name in ("gemm_floor", "triton_ops") or not isinstance(v, dict):
                continue
            if "ms" in v:
                ratio = f"x{v['ms'] / fl:5.2f}" if fl else ""
                print(f"   {name:20s} {v['ms']:9.3f} ms {ratio} floor   peak {v['peak_extra_GiB']:6.3f} GiB "
                      f"(x{v['peak_extra_GiB'] / v['grads_GiB']:4.2f} grads)")
            else:
                print(f"   {name:20s} {v['error'][:100]}")
    print("accuracy vs float64 (relative Frobenius error; B=256, D=512, C=8192 on the GPU):")
    for name, c in res["checks"].items():
        text = " ".join(f"{k} {v:.2e}" for k, v in c.items()) if "error" not in c else c["error"][:100]
        print(f"   {name:20s} {text}")
    print(f"saved {os.path.join(a.out, 'l2_softmax_gpu.json')}; {res['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
