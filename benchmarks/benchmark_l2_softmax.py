"""pytest-benchmark microbenchmarks of l2_softmax_loss: forward and forward + backward of every provider
(plain formula, eager backend, torch.compile of the plain formula, every fused backend available here,
the 3-GEMM floor) side by side, one group per (op, device, dtype, shape).

    python -m pytest benchmarks/                       # CPU, and CUDA when present
    python -m pytest benchmarks/ -k issue3             # issue 3: cpu backend vs plain formula, fwd+bwd,
                                                       # B=256, D=512, C=65536, float32, CPU
    python -m pytest benchmarks/ -k "not compile"      # leave torch.compile out (it compiles per shape)

Each benchmark's peak memory beyond the inputs (gradients included; gradients' size separately) is
measured once before timing (harness.measure_memory), saved in pytest-benchmark's extra_info
(--benchmark-json=FILE keeps it) and listed after the timing tables. Providers that cannot run here
(backend not built, no GPU, would not fit in memory) are skipped with the reason.
"""
import pytest
import torch

from benchmarks import harness as H

_CPU = [H.Case(256, 16384, 512, torch.float32, "cpu")]
_CUDA = [H.Case(1024, 131072, 512, torch.bfloat16, "cuda"), H.Case(1024, 131072, 512, torch.float32, "cuda")]
CASES = _CPU + (_CUDA if torch.cuda.is_available() else [])

# Issue 3's shape: forward + backward at B=256, D=512, C=65536, float32, CPU; the cpu backend next to
# the plain formula (and the 3-GEMM floor for scale).
ISSUE3 = H.Case(256, 65536, 512, torch.float32, "cpu")
ISSUE3_PROVIDERS = ["plain", "cpu", H.FLOOR]


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
    median_ms = benchmark.stats.stats.median * 1e3
    tflops = case.flops(op) / (median_ms * 1e-3) / 1e12
    benchmark.extra_info["tflops"] = tflops
    record_result(dict(info, group=group, median_ms=median_ms, tflops=tflops))


@pytest.mark.parametrize("provider", H.all_providers())
@pytest.mark.parametrize("op", H.OPS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_l2_softmax(benchmark, record_result, case, op, provider):
    _bench(benchmark, record_result, case, op, provider, _group(op, case))


@pytest.mark.parametrize("provider", ISSUE3_PROVIDERS)
def test_issue3_cpu_forward_backward(benchmark, record_result, provider):
    _bench(benchmark, record_result, ISSUE3, "forward_backward", provider,
           "issue3 " + _group("forward_backward", ISSUE3))
