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
# (head, classes, provider): the plain formula at the full size; the cpu backend at the full size and at a quarter
RUNS = [(head, ROWS // opts.subcenters // scale, provider)
        for head, opts in HEADS.items()
        for provider, scales in (("plain", (1,)), ("cpu", (1, 4)))
        for scale in scales]


def _case(head: str, C: int) -> H.Case:
    return H.Case(B, C, D, DTYPE, "cpu", 16.0, HEADS[head])


def _inputs(case: H.Case, seed: int = 0) -> H.Inputs:
    """x (B, D), W (C K, D), targets in [0, C): make_inputs' distribution, W with K rows per class."""
    K = case.options.subcenters
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.B, case.D, generator=g, dtype=case.dtype).requires_grad_()
    W = torch.randn(case.C * K, case.D, generator=g, dtype=case.dtype).mul_(0.05).requires_grad_()
    y = torch.randint(0, case.C, (case.B,), generator=g)
    return H.Inputs(x, W, y)


@pytest.mark.parametrize("head,C,provider", RUNS, ids=[f"{h}-C{c}-{p}" for h, c, p in RUNS])
def test_margin_head_forward_backward(benchmark, record_result, head, C, provider):
    case = _case(head, C)
    why = H.unavailable_reason(provider, case)
    if why:
        pytest.skip(why)
    K = case.options.subcenters
    inputs = _inputs(case)
    step = H.make_step(provider, "forward_backward", case, inputs)
    step()  # warm-up
    inputs.clear_grads()
    mem = H.measure_memory(step, case.device)
    grads = (B + C * K) * D * 4  # x.grad and W.grad
    flops = 6 * B * C * K * D
    group = f"margins {head} forward_backward cpu float32 B={B} rows={ROWS} D={D} (K={K})"
    info = dict(provider=provider, op="forward_backward", shape=f"B={B} C={C} K={K} D={D}", dtype="float32",
                device="cpu", peak_mem_bytes=mem.peak, grad_bytes=grads, peak_beyond_grads_bytes=mem.peak - grads,
                peak_rss_bytes=mem.rss_peak, mem_method=H.memory_method("cpu"), flops=flops)
    benchmark.group = group
    benchmark.extra_info.update(info)
    benchmark(step)
    median_ms = benchmark.stats.stats.median * 1e3
    tflops = flops / (median_ms * 1e-3) / 1e12
    benchmark.extra_info["tflops"] = tflops
    # the summary keys its "x plain" ratio on the provider name: the quarter-size run is labelled apart
    label = provider if C == ROWS // K else f"{provider}@C={C}"
    record_result(dict(info, provider=label, group=group, median_ms=median_ms, tflops=tflops))
