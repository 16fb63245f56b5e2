"""pytest-benchmark microbenchmarks of l2sm_kernels.cosine_topk next to torch (the full Q x N matrix and
topk), faiss (IndexFlatIP on normalized vectors, when `faiss` is importable: pip install faiss-cpu) and
scikit-learn (NearestNeighbors(metric="cosine", algorithm="brute")), one group per shape; the providers and
their set-up are those of sweep_cosine_topk.py.

    python -m pytest benchmarks/ -k cosine_topk                 # the issue's shape: Q=2048, N=262144, D=512,
                                                                # k=10, fp32, CPU (about 3 minutes)
    python -m pytest benchmarks/ -k "cosine_topk and small"     # Q=256, N=16384, D=64: seconds

Each provider's peak memory beyond the inputs is measured once before timing (torch's CPU allocator peak
for the torch providers, the RSS high-water mark for every provider) and listed after the timing tables.
"""
import pytest
import torch

from benchmarks import harness as H
from benchmarks import sweep_cosine_topk as S

SHAPES = {"issue": (2048, 262144, 512, 10), "small": (256, 16384, 64, 10)}
SMOKE_SHAPES = {"issue": (16, 512, 32, 10), "small": (8, 128, 16, 3)}  # --bench-smoke (benchmarks/conftest.py)
PROVIDERS = ["torch", "eager", "cpu", "triton", "faiss", "sklearn"]
_INPUTS: dict = {}


def _inputs(shape, device):
    key = (shape, device)
    if key not in _INPUTS:
        _INPUTS.clear()
        Q, N, D, _ = shape
        gen = torch.Generator(device=device).manual_seed(0)
        _INPUTS[key] = (torch.randn(Q, D, generator=gen, device=device), torch.randn(N, D, generator=gen, device=device))
    return _INPUTS[key]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name", list(SHAPES))
def test_cosine_topk(benchmark, record_result, request, name, provider):
    shapes = SMOKE_SHAPES if request.config.getoption("bench_smoke", False) else SHAPES
    device = "cuda" if provider == "triton" and torch.cuda.is_available() else "cpu"
    why = S.unavailable(provider, torch.device(device).type)
    if why:
        pytest.skip(why)
    if name == "issue" and provider == "eager":
        pytest.skip("the eager fallback sorts every chunk: minutes at this shape (the sweep measures it)")
    Q, N, D, k = shapes[name]
    q, g = _inputs(shapes[name], device)
    call, setup = S.make_call(provider, q, g, k)
    call()  # warm-up
    mem = H.measure_memory(call, device)
    group = f"cosine_topk {device} float32 Q={Q} N={N} D={D} k={k}"
    info = dict(provider=provider, peak_mem_bytes=mem.peak if provider in S.TORCH_PROVIDERS else mem.rss_peak or 0,
                peak_rss_bytes=mem.rss_peak, setup_bytes=setup, grad_bytes=0, mem_method=H.memory_method(device),
                flops=2 * Q * N * D)
    benchmark.group = group
    benchmark.extra_info.update(info)
    if device == "cuda":
        def fn():
            call()
            torch.cuda.synchronize()
    else:
        fn = call
    rounds = 3 if name == "issue" else 10
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    if benchmark.stats is None:  # --benchmark-disable: fn ran once, untimed; the memory is still reported
        record_result(dict(info, group=group, median_ms=None, tflops=None,
                           peak_beyond_grads_bytes=info["peak_mem_bytes"]))
        return
    median_ms = benchmark.stats.stats.median * 1e3
    tflops = 2 * Q * N * D / (median_ms * 1e-3) / 1e12
    record_result(dict(info, group=group, median_ms=median_ms, tflops=tflops,
                       peak_beyond_grads_bytes=info["peak_mem_bytes"]))
