"""The one place the benchmarks share: providers, timing, memory measurement, the fit check, tidy rows,
(the table and the plot are in report.py). Used by benchmark_l2_softmax.py (pytest-benchmark) and
sweep.py (the sweep).

Providers (what is measured; baselines are imported from the package, never rewritten; docs/conventions.md, "Benchmark rows"):
- "plain":      l2sm_kernels.reference.plain_formula, `F.cross_entropy(alpha * F.normalize(x) @ W.T, y)`,
                in the input dtype (with non-default loss options: reference.l2_softmax_loss_ref(upcast=False)).
- "eager":      l2_softmax_loss(backend="eager"), the hand-written backward in plain torch.
- "compile":    torch.compile(the "plain" function, dynamic=False), recompiled per shape.
- "torch_lce":  torch's own chunked linear cross-entropy (torch >= 2.13: torch.nn.functional.linear_cross_entropy
                with a torch.nn.LinearCrossEntropyOptions) on alpha * F.normalize(x) as the input: the
                batch is processed in chunks of TORCH_LCE_OPTIONS["batch_chunk_size"] rows, so no B x C
                logits exist at once. Where torch lacks it the provider is unavailable, with the reason;
                it computes the plain loss only (no margins, no normalize_weight; no label smoothing, which
                torch's chunked path does not take). Why a fixed chunk and
                not the shipped "auto" pick: see TORCH_LCE_OPTIONS.
- every fused backend that available_backends() lists as serving the device natively ("cpu", "triton",
                and any later one), through l2_softmax_loss(backend=name). Interpreted triton
                (TRITON_INTERPRET=1) is not benchmarked.
- "gemm_floor": the three matrix products of the same shapes, logits x_hat W^T, dZ W and dZ^T x_hat
                (forward: the logits product alone), nothing else: the time no exact method can beat.
- a fused backend with the memory dial set, "<backend> keep=<spec>" (dialed(); docs/memory_dial.md):
                max_logits_bytes = budget_bytes(case, spec), spec "0" (keep nothing), a fraction "a/b"
                of the B x C K products, "all", or a number of bytes. The plain backend name runs with
                the backend's default budget (None).

Ops: "forward" (the loss with inputs that require grad, result discarded) and "forward_backward"
(gradients reset to None, loss, backward). Model FLOPs: 2BCD forward, 6BCD forward + backward.

Memory ("peak memory beyond the inputs"): the peak of bytes allocated during one call above what was
allocated when it started; the gradients x.grad and W.grad are allocated inside the call, so they are
included, and reported separately (grad_bytes) so that "beyond inputs and gradients" is
peak_mem_bytes - grad_bytes (peak_beyond_grads_bytes). For gemm_floor the upstream gradient dZ (B x C)
is an input, allocated before the call.
- CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() before.
- CPU: torch keeps no peak counter for CPU memory; cpu_memory() measures one call two ways at once:
  peak_mem_bytes from torch.profiler(profile_memory=True) allocation / free events of torch's CPU
  allocator (exact; the calling thread and autograd's threads, not OpenMP workers' allocations nor
  malloc outside torch), and peak_rss_bytes, the process's resident-set high-water mark (VmHWM reset
  through /proc/self/clear_refs) above the resident set at the start (every thread and allocator,
  touched pages only, allocator slack included: an upper estimate). Compare the two when a backend
  allocates in worker threads or outside torch's allocator.
"""
from __future__ import annotations

import ctypes
import dataclasses
import datetime
import gc
import importlib.metadata
import os
import platform
import subprocess
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

import l2sm_kernels
from l2sm_kernels import available_backends, l2_softmax_loss
from l2sm_kernels.backends import resolve, triton_interpreted
from l2sm_kernels.options import L2SMOptions
from l2sm_kernels.reference import l2_softmax_loss_ref, plain_formula
from l2sm_kernels.testing.memory import CUDA_METHOD, quiet_profiler_logs
from l2sm_kernels.testing import allocator_peak_bytes, available_bytes, cuda_peak_bytes  # noqa: F401 (available_bytes: harness API)

OPS = ("forward", "forward_backward")
BASELINES = ("plain", "eager", "compile")
TORCH_LCE = "torch_lce"
FLOOR = "gemm_floor"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

# The tidy row: one per (op, provider, shape, dtype, options, device). Times in ms, memory in bytes.
COLUMNS = (
    "op", "provider", "B", "C", "D", "shape", "dtype", "options", "device", "status",
    "median_ms", "p20_ms", "p80_ms", "reps", "tflops", "ratio_eager", "ratio_floor",
    "peak_mem_bytes", "grad_bytes", "peak_beyond_grads_bytes", "peak_rss_bytes", "est_need_bytes", "mem_method",
    "device_name", "threads", "torch", "l2sm_kernels", "triton", "python", "git", "timestamp",
)

GiB = 2**30
MiB = 2**20


# The memory dial's settings the sweep times by default (sweep.py --keep): nothing, a quarter, all.
KEEP_SPECS = ("0", "1/4", "all")
_KEEP = " keep="


def dialed(provider: str, spec: str) -> str:
    """The provider name of a fused backend run with the memory dial at `spec` (see budget_bytes)."""
    return f"{provider}{_KEEP}{spec}"


def split_provider(provider: str) -> tuple[str, str | None]:
    """(backend or baseline name, dial spec or None)."""
    base, _, spec = provider.partition(_KEEP)
    return base, (spec or None)


def budget_bytes(case: "Case", spec: str) -> int:
    """max_logits_bytes for a dial spec: "0", "all" (B x C K products of the compute dtype: 4 bytes, 8
    for float64), a fraction "a/b" of that, or a plain number of bytes."""
    full = case.B * case.C * case.options.subcenters * (8 if case.dtype == torch.float64 else 4)
    if spec == "all":
        return full
    if "/" in spec:
        a, b = spec.split("/")
        return full * int(a) // int(b)
    n = int(spec)
    if n < 0:
        raise ValueError(f"a dial spec must be 0, a fraction a/b, 'all' or bytes >= 0, got {spec!r}")
    return n


# ----------------------------------------------------------------------------------------------- cases
@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark shape: features (B, D), class weights (C, D), targets (B,), on a device."""

    B: int
    C: int
    D: int
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    alpha: float = 16.0
    options: L2SMOptions = L2SMOptions()

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type

    @property
    def shape(self) -> str:
        return f"B={self.B} C={self.C} D={self.D}"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def flops(self, op: str) -> int:
        """Model FLOPs: the logits product (2BCD) forward, plus dZ W and dZ^T x_hat backward (6BCD)."""
        return (2 if op == "forward" else 6) * self.B * self.C * self.D

    def input_bytes(self) -> int:
        return (self.B + self.C) * self.D * self.itemsize + self.B * 8

    def grad_bytes(self, op: str = "forward_backward") -> int:
        """Bytes of x.grad and W.grad (0 for the forward alone)."""
        return 0 if op == "forward" else (self.B + self.C) * self.D * self.itemsize


def describe_options(opts: L2SMOptions) -> str:
    if opts == L2SMOptions():
        return "default"
    parts = []
    if opts.normalize_weight:
        parts.append("normalize_weight")
    if opts.margin_type != "none":
        parts.append(f"{opts.margin_type} m={opts.margin:g}")
    if opts.label_smoothing:
        parts.append(f"label_smoothing={opts.label_smoothing:g}")
    if opts.ignore_index != -100:
        parts.append(f"ignore_index={opts.ignore_index}")
    if opts.eps != 1e-12:
        parts.append(f"eps={opts.eps:g}")
    return " ".join(parts)


def _option_kwargs(opts: L2SMOptions, with_budget: bool = True) -> dict:
    """The options as l2_softmax_loss keywords (with_budget=False: without max_logits_bytes, which the
    reference and the baselines do not take)."""
    return {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)
            if with_budget or f.name != "max_logits_bytes"}


@dataclasses.dataclass
class Inputs:
    x: torch.Tensor
    W: torch.Tensor
    y: torch.Tensor

    def clear_grads(self) -> None:
        self.x.grad = None
        self.W.grad = None


def make_inputs(case: Case, seed: int = 0) -> Inputs:
    g = torch.Generator(device=case.device).manual_seed(seed)
    x = torch.randn(case.B, case.D, generator=g, device=case.device, dtype=case.dtype).requires_grad_()
    W = torch.randn(case.C, case.D, generator=g, device=case.device, dtype=case.dtype).mul_(0.05).requires_grad_()
    y = torch.randint(0, case.C, (case.B,), generator=g, device=case.device)
    return Inputs(x, W, y)


# ------------------------------------------------------------------------------------------- providers
def fused_backends(device_type: str) -> dict[str, str]:
    """Every non-eager backend the package knows, with "" if it runs natively on device_type here,
    else why it is not benchmarked. New backends join through l2sm_kernels.available_backends()."""
    out = {}
    for name, info in available_backends().items():
        if name == "eager":
            continue
        if not info.available:
            out[name] = info.reason
        elif name == "triton" and triton_interpreted():
            out[name] = "TRITON_INTERPRET=1: interpreted kernels are not benchmarked"
        elif device_type not in info.devices:
            out[name] = f"serves {'/'.join(info.devices)} tensors, not {device_type}"
        else:
            out[name] = ""
    return out


# torch_lce's options. batch_chunk_size fixed at 64 rows (chunking_method=None), not the shipped default
# (chunking_method="auto"): "auto" sizes a chunk as next_pow2(B / ceil(C / D)) / 2 rows, which at
# face-recognition shapes (B <= D, C >> D) is one or two rows: at B=256, D=512, C=65536, float32 on the
# 2-core CPU of docs/benchmarks.md's tables, forward + backward took 19.5 to 54.4 s a step with "auto" (1-row
# chunks), 0.90 s with 64-row chunks and 0.77 s on the unchunked reference path (options=None; medians
# of three steps, torch 2.13). torch's own note: chunking pays when B >= D.
TORCH_LCE_OPTIONS = dict(chunking_method=None, batch_chunk_size=64)


def torch_lce_missing() -> str:
    """"" when this torch has the chunked linear cross-entropy (torch.nn.functional.linear_cross_entropy
    taking options=torch.nn.LinearCrossEntropyOptions), else why not."""
    fn = getattr(F, "linear_cross_entropy", None)
    if fn is None or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return (f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy with "
                "LinearCrossEntropyOptions (torch >= 2.13)")
    try:
        import inspect
        if "options" not in inspect.signature(fn).parameters:
            return f"torch {torch.__version__}: linear_cross_entropy takes no options= (no chunked path)"
    except (TypeError, ValueError):  # a builtin without a signature: try it
        pass
    try:  # the fields this harness sets (an older torch may have the class with other fields)
        torch.nn.LinearCrossEntropyOptions(**TORCH_LCE_OPTIONS)
    except (TypeError, ValueError) as e:
        return f"torch {torch.__version__}: LinearCrossEntropyOptions(**{TORCH_LCE_OPTIONS}) fails: {e}"
    return ""


def torch_lce_function(alpha: float, opts: L2SMOptions = L2SMOptions()) -> Callable:
    """(x, W, y) -> mean loss through torch's chunked linear cross-entropy on alpha * F.normalize(x)."""
    options = torch.nn.LinearCrossEntropyOptions(**TORCH_LCE_OPTIONS)
    ignore_index, eps = opts.ignore_index, opts.eps

    def torch_lce(x, W, y):
        return F.linear_cross_entropy(alpha * F.normalize(x, dim=1, eps=eps), W, y, ignore_index=ignore_index,
                                      options=options)
    return torch_lce


def all_providers() -> list[str]:
    """Every provider name, available here or not (the pytest-benchmark parameters)."""
    return list(BASELINES) + [TORCH_LCE] + [n for n in available_backends() if n != "eager"] + [FLOOR]


def providers_for(device_type: str) -> list[str]:
    """The providers that run on device_type here, in table order."""
    lce = [] if torch_lce_missing() else [TORCH_LCE]
    return list(BASELINES) + lce + [n for n, why in fused_backends(device_type).items() if not why] + [FLOOR]


def unavailable_reason(provider: str, case: Case) -> str:
    """"" when provider can run case here, else why not (backend missing, device or dtype unsupported)."""
    provider, spec = split_provider(provider)
    if spec is not None:
        if provider in BASELINES or provider in (FLOOR, TORCH_LCE):
            return f"{provider} has no memory dial"
        try:
            budget_bytes(case, spec)
        except ValueError as e:
            return str(e)
    if provider in BASELINES or provider == FLOOR:
        return ""
    if provider == TORCH_LCE:
        why = torch_lce_missing()
        if not why and (case.options.margin_type != "none" or case.options.normalize_weight):
            why = "torch_lce computes the plain loss only (no margins, no normalize_weight)"
        if not why and case.options.label_smoothing:  # torch would warn and run the unchunked reference path
            why = "torch's chunked linear_cross_entropy takes no label smoothing (torch 2.13)"
        return why
    why = fused_backends(case.device_type).get(provider, f"unknown provider {provider!r}")
    if why:
        return why
    try:
        resolve(provider, case.device_type, {case.dtype})
    except ValueError as e:
        return str(e)
    return ""


def baseline_function(case: Case) -> Callable:
    """The plain-torch loss users write (imported from l2sm_kernels.reference), in the input dtype."""
    alpha, opts = case.alpha, case.options
    if dataclasses.replace(opts, max_logits_bytes=None) == L2SMOptions():
        return lambda x, W, y: plain_formula(x, W, y, alpha)
    kw = _option_kwargs(opts, with_budget=False)
    return lambda x, W, y: l2_softmax_loss_ref(x, W, y, alpha, upcast=False, **kw)


_compiled: dict = {}


def loss_function(provider: str, case: Case) -> Callable:
    """(x, W, y) -> scalar loss, for every provider but the GEMM floor."""
    if provider == "plain":
        return baseline_function(case)
    if provider == "compile":
        # one static-shape compilation per case, shared by its forward and forward + backward runs;
        # dynamo is reset for each new case, so that a sweep never reaches the recompile limit
        if _compiled.get("case") != case:
            _compiled.clear()
            torch._dynamo.reset()
            # compile in this process: a pool of background compile workers would go on using cores
            # while the next provider is timed (seen on a 2-core machine: cpu at C=4096 1.6x slower)
            torch._inductor.config.compile_threads = 1
            _compiled.update(case=case, fn=torch.compile(baseline_function(case), dynamic=False))
        return _compiled["fn"]
    if provider == TORCH_LCE:
        return torch_lce_function(case.alpha, case.options)
    alpha, kw = case.alpha, _option_kwargs(case.options)
    provider, spec = split_provider(provider)
    if spec is not None:
        kw["max_logits_bytes"] = budget_bytes(case, spec)
    return lambda x, W, y: l2_softmax_loss(x, W, y, alpha, backend=provider, **kw)


def make_step(provider: str, op: str, case: Case, inputs: Inputs) -> Callable[[], None]:
    """A zero-argument callable doing one measured unit of work (no device synchronization)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    x, W, y = inputs.x, inputs.W, inputs.y
    if provider == FLOOR:
        xh = F.normalize(x.detach(), dim=1)
        Wd = W.detach()
        if op == "forward":
            def floor_forward():
                xh @ Wd.T
            return floor_forward
        dz = torch.randn(case.B, case.C, device=case.device, dtype=case.dtype)

        def floor_three():
            # the three products, each result held to the end like the logits and gradients it stands for
            z = xh @ Wd.T  # logits
            gx = dz @ Wd  # dX (before the normalization backward)
            gw = dz.T @ xh  # dW
            del z, gx, gw
        return floor_three

    fn = loss_function(provider, case)
    if op == "forward":
        def forward():
            fn(x, W, y)
        return forward

    def forward_backward():
        x.grad = None
        W.grad = None
        fn(x, W, y).backward()
    return forward_backward


# --------------------------------------------------------------------------------------------- timing
def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def time_step(step: Callable[[], None], device: str, *, warmup: int = 1, min_reps: int = 3,
              max_reps: int = 100, min_time_s: float = 1.0) -> Timing:
    """Median and 20th / 80th percentiles of the step's time over at least min_reps calls, continuing
    until min_time_s has passed or max_reps calls were made. CUDA: CUDA events around each call."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    t0 = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - t0 < min_time_s):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1e3)
    med, p20, p80 = np.percentile(np.asarray(times), [50, 20, 80])
    return Timing(float(med), float(p20), float(p80), len(times))


# --------------------------------------------------------------------------------------------- memory
@dataclasses.dataclass
class Memory:
    peak: int  # allocator peak beyond the start: CUDA caching allocator, or torch's CPU allocator events
    rss_peak: int | None = None  # CPU: process RSS high-water mark beyond the start (None: not measurable)


_CLEAR_REFS = "/proc/self/clear_refs"


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {key} in /proc/self/status")


def _malloc_trim() -> None:
    """Hand glibc's free heap pages back to the OS, so that the RSS baseline is live memory."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _reset_rss_high_water() -> int | None:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0: writing 5 to /proc/self/clear_refs) and
    return the current RSS, or None where that is not possible."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return _status_bytes("VmRSS")
    except OSError:
        return None


def cpu_memory(fn: Callable[[], object]) -> Memory:
    """Peak CPU memory of one call of fn beyond what was held when it started, measured two ways.

    peak (exact, deterministic): fn runs under torch.profiler with profile_memory=True, which records
    every allocation (+bytes) and free (-bytes) of torch's CPU allocator with a timestamp; the maximum
    of their running sum in time order is the peak. The profiler sees allocations of the calling
    thread and of the threads it hands its state to (autograd's engine), not those made inside
    at::parallel_for / OpenMP worker threads nor memory taken outside torch's allocator (malloc in
    a C++ kernel, BLAS packing buffers).

    rss_peak (everything, but coarser): the process's resident-set high-water mark (VmHWM, reset
    through /proc/self/clear_refs after malloc_trim) minus the resident set at the start. It counts
    every thread and every allocator, only pages actually touched, and also allocator slack (freed
    heap pages glibc keeps): an upper estimate, with page granularity and some run-to-run noise.
    """
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    _malloc_trim()
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with quiet_profiler_logs():
        prof.start()
    rss0 = _reset_rss_high_water()
    try:
        fn()
        rss_peak = None if rss0 is None else max(_status_bytes("VmHWM") - rss0, 0)
    finally:
        with quiet_profiler_logs():
            prof.stop()
    peak = allocator_peak_bytes(prof)
    return Memory(int(peak), rss_peak)


def memory_method(device: str) -> str:
    if torch.device(device).type == "cuda":
        return CUDA_METHOD
    return "torch CPU allocator events (profiler); rss: VmHWM"


def measure_memory(step: Callable[[], None], device: str) -> Memory:
    """Peak memory of one step beyond what was allocated when it started (drop old gradients first:
    freeing memory allocated before the step would lower the count)."""
    if torch.device(device).type == "cuda":
        return Memory(cuda_peak_bytes(step, device))
    return cpu_memory(step)


# ------------------------------------------------------------------------------------------ fit check
# Peak B x C buffers alive at once (in fp32 bytes, a bound for fp16 / bf16 too), besides the
# gradients, per provider that materializes the logits; measured with cpu_memory (plain about
# 2 forward, 1 + gradients backward; eager about 5 + gradients) and checked as an upper bound by
# tests/test_bench_harness.py. Fused backends hold the gradients plus a bounded workspace.
BC_BUFFERS = {"plain": 3, "compile": 3, "eager": 6, FLOOR: 2}
FUSED_WORKSPACE_BYTES = 512 * MiB
FIT_FRACTION = 0.9  # run only what needs at most this share of the available memory


def estimated_need_bytes(provider: str, op: str, case: Case) -> int:
    """Memory one call of provider is expected to need beyond the inputs."""
    bc = case.B * case.C * max(case.itemsize, 4)
    grads = case.grad_bytes(op)
    if provider == FLOOR:  # the logits (forward); dZ, the logits and the two products (forward + backward)
        return bc if op == "forward" else BC_BUFFERS[FLOOR] * bc + grads
    if provider in BC_BUFFERS:
        return BC_BUFFERS[provider] * bc + grads
    if provider == TORCH_LCE:  # chunks' logits and their gradient, and the gradients computed in the forward
        chunk = min(case.B, TORCH_LCE_OPTIONS["batch_chunk_size"] or case.B)
        return 4 * chunk * case.C * max(case.itemsize, 4) + case.grad_bytes("forward_backward") + grads
    _, spec = split_provider(provider)
    kept = budget_bytes(case, spec) if spec is not None else 0
    return grads + FUSED_WORKSPACE_BYTES + min(kept, case.B * case.C * 8)


def fit_status(need: int, available: int) -> str:
    """"" if need fits in FIT_FRACTION of available, else the status of a row that was not run."""
    if need <= FIT_FRACTION * available:
        return ""
    return f"skipped: would need {_size(need)}, {_size(available)} available"


def _size(nbytes: int) -> str:
    return f"{nbytes / GiB:.1f} GiB" if nbytes >= GiB / 10 else f"{nbytes / MiB:.2f} MiB"


# ------------------------------------------------------------------------------------------ tidy rows
def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def device_name(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def environment(device: str) -> dict:
    """The columns that say where and with what a row was measured."""
    return {
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "l2sm_kernels": l2sm_kernels.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "git": _git_commit(),
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def make_row(case: Case, op: str, provider: str, env: dict, status: str = "ok", timing: Timing | None = None,
             memory: Memory | None = None, need: int | None = None) -> dict:
    grads = case.grad_bytes(op)
    row = dict.fromkeys(COLUMNS)
    row.update(
        op=op, provider=provider, B=case.B, C=case.C, D=case.D, shape=case.shape, dtype=case.dtype_name,
        options=describe_options(case.options), device=case.device_type, status=status,
        grad_bytes=grads, est_need_bytes=need, mem_method=memory_method(case.device),
    )
    if timing is not None:
        row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, reps=timing.reps,
                   tflops=case.flops(op) / (timing.median_ms * 1e-3) / 1e12)
    if memory is not None:
        row.update(peak_mem_bytes=memory.peak, peak_beyond_grads_bytes=memory.peak - grads,
                   peak_rss_bytes=memory.rss_peak)
    row.update(env)
    return row


def group_key(row: dict) -> tuple:
    """Rows of one comparison: same op, shape, dtype, options and device."""
    return (row["op"], row["B"], row["C"], row["D"], row["dtype"], row["options"], row["device"])


def add_ratios(rows: list[dict]) -> list[dict]:
    """ratio_eager / ratio_floor: median time over the eager / GEMM-floor median of the same group."""
    ref: dict[tuple, dict] = {}
    for r in rows:
        if r["provider"] in ("eager", FLOOR) and r["median_ms"]:
            ref[(group_key(r), r["provider"])] = r["median_ms"]
    for r in rows:
        if r["median_ms"]:
            e, f = ref.get((group_key(r), "eager")), ref.get((group_key(r), FLOOR))
            r["ratio_eager"] = r["median_ms"] / e if e else None
            r["ratio_floor"] = r["median_ms"] / f if f else None
    return rows


def measure(case: Case, op: str, provider: str, inputs: Inputs, env: dict, *, available: int | None = None,
            timing_kw: dict | None = None) -> dict:
    """One tidy row: the fit check, then time and peak memory of provider's op on case. Failures
    (a backend that cannot run, out of memory, a compile error) become the row's status."""
    why = unavailable_reason(provider, case)
    if why:
        return make_row(case, op, provider, env, status=f"unavailable: {why}")
    need = estimated_need_bytes(provider, op, case)
    status = fit_status(need, available_bytes(case.device) if available is None else available)
    if status:
        return make_row(case, op, provider, env, status=status, need=need)
    step = None
    try:
        step = make_step(provider, op, case, inputs)
        timing = time_step(step, case.device, **(timing_kw or {}))
        inputs.clear_grads()
        memory = measure_memory(step, case.device)
        return make_row(case, op, provider, env, timing=timing, memory=memory, need=need)
    except Exception as e:  # noqa: BLE001 - a failing provider is a row, not a crashed sweep
        msg = "out of memory" if isinstance(e, torch.OutOfMemoryError) else f"{type(e).__name__}: {e}"
        return make_row(case, op, provider, env, status="error: " + " ".join(msg.split())[:300], need=need)
    finally:
        del step
        inputs.clear_grads()
        if case.device_type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
