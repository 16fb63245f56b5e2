"""pytest-benchmark microbenchmarks of l2_softmax_loss: forward and forward + backward of every provider
(plain formula, eager backend, torch.compile of the plain formula, every fused backend available here,
the 3-GEMM floor) side by side, one group per (op, device, dtype, shape).

    python -m pytest benchmarks/                       # CPU, and CUDA when present
    python -m pytest benchmarks/ -k issue3             # issue 3: cpu backend vs plain formula, fwd+bwd,
                                                       # B=256, D=512, C=65536, float32, CPU
    python -m pytest benchmarks/ -k issue19            # issue 19: the cpu backend's memory dial (keep 0, 1/4,
                                                       # all; default) beside plain, compile and the floor,
                                                       # fwd+bwd, B=256, D=512, C=65536, float32 and bfloat16
    python -m pytest benchmarks/ -k "not compile"      # leave torch.compile out (it compiles per shape)
    python -m pytest benchmarks/ --benchmark-disable --bench-smoke   # CI: every benchmark once, tiny shapes,
                                                       # nothing timed (memory still measured and listed)

Each benchmark's peak memory beyond the inputs (gradients included; gradients' size separately) is
measured once before timing (harness.measure_memory), saved in pytest-benchmark's extra_info
(--benchmark-json=FILE keeps it) and listed after the timing tables. Providers that cannot run here
(backend not built, no GPU, would not fit in memory) are skipped with the reason. Providers: the
harness's (plain, eager, compile, torch_lce where torch has it, every fused backend, gemm_floor).

--benchmark-disable (pytest-benchmark's smoke mode) runs each benchmark once without timing it; the
summary then lists memory alone. --bench-smoke (benchmarks/conftest.py) swaps every shape for a tiny
one, so that the whole file runs in seconds of compute (CI runs both).
"""
import pytest
import torch

from benchmarks import harness as H

_CPU = [H.Case(256, 16384, 512, torch.float32, "cpu")]
_CUDA = [H.Case(1024, 131072, 512, torch.bfloat16, "cuda"), H.Case(1024, 131072, 512, torch.float32, "cuda")]
CASES = _CPU + (_CUDA if torch.cuda.is_available() else [])
# --bench-smoke: the same dtypes and devices at a tiny size
SMOKE_CASES = [H.Case(8, 64, 16, c.dtype, c.device) for c in CASES]

# Issue 3's shape: forward + backward at B=256, D=512, C=65536, float32, CPU; the cpu backend next to
# the plain formula (and the 3-GEMM floor for scale).
ISSUE3 = H.Case(256, 65536, 512, torch.float32, "cpu")
ISSUE3_SMOKE = H.Case(8, 64, 16, torch.float32, "cpu")
ISSUE3_PROVIDERS = ["plain", "cpu", H.FLOOR]

# issue 19's CPU targets: the memory dial at 0, a quarter and all of the B x C products, and the default
ISSUE19 = [H.Case(256, 65536, 512, torch.float32, "cpu"), H.Case(256, 65536, 512, torch.bfloat16, "cpu")]
ISSUE19_SMOKE = [H.Case(8, 64, 16, c.dtype, "cpu") for c in ISSUE19]
ISSUE19_PROVIDERS = ["plain", "compile", "cpu"] + [H.dialed("cpu", s) for s in H.KEEP_SPECS] + [H.FLOOR]


def _smoke(config) -> bool:
    return bool(config.getoption("bench_smoke", False))


def pytest_generate_tests(metafunc):
    """The shapes of test_l2_softmax: CASES, or SMOKE_CASES with --bench-smoke."""
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", SMOKE_CASES if _smoke(metafunc.config) else CASES, ids=_case_id)


@pytest.fixture
def issue3_case(request):
    return ISSUE3_SMOKE if _smoke(request.config) else ISSUE3


@pytest.fixture(params=[0, 1], ids=["float32", "bfloat16"])
def issue19_case(request):
    return (ISSUE19_SMOKE if _smoke(request.config) else ISSUE19)[request.param]


def _case_id(case: H.Case) -> str:
    return f"{case.device}-{case.dtype_name}-B{case.B}-C{case.C}-D{case.D}"


def _group(op: str, case: H.Case) -> str:
    return f"{op} {case.device} {case.dtype_name} {case.shape}"


def _bench(benchmark, record_result, case: H.Case, op: str, provider: str, group: str) -> None:
    why = H.unavailable_reason(provider, case)
    if why:
        pytest.skip(why)
    need = H.estimated_need_bytes(provider, op, case) + case.input_bytes()
    status = H.fit_status(need, H.available_bytes(case.device))
    if status:
        pytest.skip(status)
    inputs = H.make_inputs(case)
    step = H.make_step(provider, op, case, inputs)
    try:
        step()  # warm-up; torch.compile compiles here
    except Exception as e:  # noqa: BLE001
        if provider == "compile":
            pytest.skip(f"torch.compile does not work here: {type(e).__name__}: {e}")
        raise
    inputs.clear_grads()
    mem = H.measure_memory(step, case.device)
    grads = case.grad_bytes(op)
    info = dict(provider=provider, op=op, shape=case.shape, dtype=case.dtype_name, device=case.device,
                peak_mem_bytes=mem.peak, grad_bytes=grads, peak_beyond_grads_bytes=mem.peak - grads,
                peak_rss_bytes=mem.rss_peak, mem_method=H.memory_method(case.device), flops=case.flops(op))
    benchmark.group = group
    benchmark.extra_info.update(info)

    if case.device_type == "cuda":
        def fn():
            step()
            torch.cuda.synchronize()
    else:
        fn = step
    benchmark(fn)
    if benchmark.stats is None:  # --benchmark-disable: fn ran once, untimed; the memory is still reported
        record_result(dict(info, group=group, median_ms=None, tflops=None))
        return
    median_ms = benchmark.stats.stats.median * 1e3
    tflops = case.flops(op) / (median_ms * 1e-3) / 1e12
    benchmark.extra_info["tflops"] = tflops
    record_result(dict(info, group=group, median_ms=median_ms, tflops=tflops))


@pytest.mark.parametrize("provider", H.all_providers())
@pytest.mark.parametrize("op", H.OPS)
def test_l2_softmax(benchmark, record_result, case, op, provider):
    _bench(benchmark, record_result, case, op, provider, _group(op, case))


@pytest.mark.parametrize("provider", ISSUE3_PROVIDERS)
def test_issue3_cpu_forward_backward(benchmark, record_result, issue3_case, provider):
    _bench(benchmark, record_result, issue3_case, "forward_backward", provider,
           "issue3 " + _group("forward_backward", issue3_case))


@pytest.mark.parametrize("provider", ISSUE19_PROVIDERS)
def test_issue19_memory_dial(benchmark, record_result, issue19_case, provider):
    _bench(benchmark, record_result, issue19_case, "forward_backward", provider,
           "issue19 " + _group("forward_backward", issue19_case))
