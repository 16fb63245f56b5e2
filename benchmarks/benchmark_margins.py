"""pytest-benchmark microbenchmarks of the margin heads (issue 12's benchmark item): forward + backward of

- "subcenter": sub-center ArcFace, K = 3 sub-centers per class, margin 0.5, normalize_weight;
- "per-row":   the combined margin (1, m2, m3) with per-row (B,) m2 and m3 (ElasticFace / AdaFace style),
               normalize_weight;

on the cpu backend next to the plain torch formula of the same head (provider "plain":
l2sm_kernels.reference.l2_softmax_loss_ref(..., upcast=False), plain torch in the input dtype, which
builds the B x C K cosines), CPU, float32, B = 256, D = 512, C = 65536 / K classes (so W has 65536 rows
either way), one group per head. The cpu backend also runs at C = 16384 / K, so that the summary shows
its peak memory beyond the gradients at two class counts: the same, because its workspace does not grow
with C (the plain formula's does, 4x).

    python -m pytest benchmarks/ -k margin_head                # the tables and the memory summary
    python -m pytest benchmarks/ -k "margin_head and subcenter"
    python -m pytest benchmarks/ -k margin_head --benchmark-disable --bench-smoke   # CI: once each, tiny

(Point pytest at benchmarks/, as for benchmark_l2_softmax.py: naming the file as well collects it twice,
once through benchmarks/conftest.py's hook.)

Timing, memory measurement, providers and steps come from benchmarks/harness.py (measure_memory:
torch's CPU allocator events, and the process's RSS high-water mark, which also sees the worker
threads' buffers); the inputs are made here because the weight has C x K rows.
"""
import pytest
import torch

from benchmarks import harness as H
from l2sm_kernels.options import L2SMOptions

B, D, ROWS = 256, 512, 65536
DTYPE = torch.float32


def _per_row_margins():
    g = torch.Generator().manual_seed(1)
    m2 = 0.3 + 0.2 * torch.rand(B, generator=g, dtype=torch.float64)  # ElasticFace-like draws around 0.4
    m3 = 0.1 * torch.rand(B, generator=g, dtype=torch.float64)
    return m2, m3


HEADS = {
    "subcenter": L2SMOptions(normalize_weight=True, margin_type="arcface", margin=0.5, subcenters=3),
    "per-row": L2SMOptions(normalize_weight=True, margin_type="combined", margin=(1.0, *_per_row_margins())),
}
SMOKE = (8, 16, 192)  # --bench-smoke (benchmarks/conftest.py): B, D, rows of W
# (head, scale, provider): the plain formula at the full size; the cpu backend at the full size and at a quarter
RUNS = [(head, scale, provider)
        for head in HEADS
        for provider, scales in (("plain", (1,)), ("cpu", (1, 4)))
        for scale in scales]


def _heads(b: int) -> dict:
    """HEADS for a batch of b rows (the per-row margins are (B,) tensors: cut for the smoke size)."""
    return {h: (o if h != "per-row" else L2SMOptions(normalize_weight=True, margin_type="combined",
                                                      margin=(1.0, *(m[:b] for m in _per_row_margins()))))
            for h, o in HEADS.items()}


def _case(head: str, C: int, b: int = B, d: int = D) -> H.Case:
    return H.Case(b, C, d, DTYPE, "cpu", 16.0, _heads(b)[head])


def _inputs(case: H.Case, seed: int = 0) -> H.Inputs:
    """x (B, D), W (C K, D), targets in [0, C): make_inputs' distribution, W with K rows per class."""
    K = case.options.subcenters
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.B, case.D, generator=g, dtype=case.dtype).requires_grad_()
    W = torch.randn(case.C * K, case.D, generator=g, dtype=case.dtype).mul_(0.05).requires_grad_()
    y = torch.randint(0, case.C, (case.B,), generator=g)
    return H.Inputs(x, W, y)


@pytest.mark.parametrize("head,scale,provider", RUNS,
                         ids=[f"{h}-C{ROWS // HEADS[h].subcenters // s}-{p}" for h, s, p in RUNS])
def test_margin_head_forward_backward(benchmark, record_result, request, head, scale, provider):
    b, d, rows = SMOKE if request.config.getoption("bench_smoke", False) else (B, D, ROWS)
    C = rows // HEADS[head].subcenters // scale
    case = _case(head, C, b, d)
    why = H.unavailable_reason(provider, case)
    if why:
        pytest.skip(why)
    K = case.options.subcenters
    inputs = _inputs(case)
    step = H.make_step(provider, "forward_backward", case, inputs)
    step()  # warm-up
    inputs.clear_grads()
    mem = H.measure_memory(step, case.device)
    grads = (b + C * K) * d * 4  # x.grad and W.grad
    flops = 6 * b * C * K * d
    group = f"margins {head} forward_backward cpu float32 B={b} rows={rows} D={d} (K={K})"
    info = dict(provider=provider, op="forward_backward", shape=f"B={b} C={C} K={K} D={d}", dtype="float32",
                device="cpu", peak_mem_bytes=mem.peak, grad_bytes=grads, peak_beyond_grads_bytes=mem.peak - grads,
                peak_rss_bytes=mem.rss_peak, mem_method=H.memory_method("cpu"), flops=flops)
    benchmark.group = group
    benchmark.extra_info.update(info)
    benchmark(step)
    # the summary keys its "x plain" ratio on the provider name: the quarter-size run is labelled apart
    label = provider if scale == 1 else f"{provider}@C={C}"
    if benchmark.stats is None:  # --benchmark-disable: step ran once, untimed; the memory is still reported
        record_result(dict(info, provider=label, group=group, median_ms=None, tflops=None))
        return
    median_ms = benchmark.stats.stats.median * 1e3
    tflops = flops / (median_ms * 1e-3) / 1e12
    benchmark.extra_info["tflops"] = tflops
    record_result(dict(info, provider=label, group=group, median_ms=median_ms, tflops=tflops))
