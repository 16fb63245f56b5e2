"""Fast checks of the benchmark harness (benchmarks/harness.py, benchmarks/sweep.py): the tidy-row
schema, the CPU peak-memory meter on known allocation patterns, the memory-fit check, backends joining
by name, the torch_lce provider, a one-shape sweep end to end writing CSV, JSON and PNG, and the GPU
benchmark script (benchmarks/benchmark_l2_softmax_gpu.py): its report on known numbers and its --smoke
dry run on the CPU. The benchmarks themselves run with `python -m pytest benchmarks/`, not here."""
import csv
import json
import os
import pathlib
import subprocess
import sys
import threading

import pytest
import torch

try:
    from benchmarks import harness as H
    from benchmarks import sweep
except ImportError:  # bare `pytest` (not `python -m pytest`) from elsewhere: benchmarks/ is not installed
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from benchmarks import harness as H
    from benchmarks import sweep

MiB = 2**20
TINY = H.Case(B=8, C=64, D=16)


def test_row_schema_and_ratios():
    env = H.environment("cpu")
    assert set(env) <= set(H.COLUMNS)
    rows = [
        H.make_row(TINY, "forward_backward", p, env, timing=H.Timing(ms, ms * 0.9, ms * 1.1, 3),
                   memory=H.Memory(10 * MiB, 11 * MiB))
        for p, ms in (("plain", 4.0), ("eager", 8.0), (H.FLOOR, 2.0))
    ]
    rows.append(H.make_row(TINY, "forward_backward", "cpu", env, status="skipped: would need 9.0 GiB", need=9 << 30))
    H.add_ratios(rows)
    for r in rows:
        assert tuple(r) == H.COLUMNS
    plain, eager, floor, skipped = rows
    assert plain["status"] == "ok" and plain["ratio_eager"] == pytest.approx(0.5)
    assert plain["ratio_floor"] == pytest.approx(2.0) and floor["ratio_floor"] == pytest.approx(1.0)
    # TFLOP/s counts 6BCD for forward + backward, 2BCD for the forward
    assert plain["tflops"] == pytest.approx(6 * 8 * 64 * 16 / 4e-3 / 1e12)
    assert TINY.flops("forward") * 3 == TINY.flops("forward_backward")
    assert plain["grad_bytes"] == (8 + 64) * 16 * 4
    assert plain["peak_beyond_grads_bytes"] == 10 * MiB - plain["grad_bytes"]
    assert plain["peak_rss_bytes"] == 11 * MiB
    assert skipped["median_ms"] is None and skipped["ratio_eager"] is None and skipped["peak_mem_bytes"] is None
    assert plain["torch"] == torch.__version__ and plain["device"] == "cpu" and plain["options"] == "default"


def _rss_measurable() -> bool:
    return H._reset_rss_high_water() is not None


def _rss_close(measured: int, expected: int) -> bool:
    """The RSS high-water mark counts pages: the kernel's per-CPU RSS counters may lag by a few
    hundred KiB, and transparent huge pages can round an allocation up by up to 2 MiB."""
    return expected - MiB // 2 <= measured <= expected + 4 * MiB


def test_cpu_meter_known_pattern():
    def pattern():
        a = torch.ones(8 * MiB, dtype=torch.uint8)
        b = torch.ones(4 * MiB, dtype=torch.uint8)  # 12 MiB held: the peak
        del a
        c = torch.ones(2 * MiB, dtype=torch.uint8)  # 6 MiB held
        del b, c

    H.cpu_memory(pattern)  # first call: the profiler's own one-time set-up
    mem = H.cpu_memory(pattern)
    assert mem.peak == 12 * MiB
    if _rss_measurable():  # pages touched: the high-water mark sees them
        assert _rss_close(mem.rss_peak, 12 * MiB), mem.rss_peak / MiB
    held = torch.ones(16 * MiB, dtype=torch.uint8)  # allocated before the call: not counted
    mem = H.cpu_memory(lambda: torch.ones(3 * MiB, dtype=torch.uint8))
    assert mem.peak == 3 * MiB
    if _rss_measurable():
        assert _rss_close(mem.rss_peak, 3 * MiB), mem.rss_peak / MiB
    del held


def test_cpu_meter_threads_and_autograd():
    # autograd's backward allocates x.grad: both meters see it (the profiler through autograd's
    # thread-state hand-over)
    x = torch.randn(1024, 1024, requires_grad=True)

    def fwd_bwd():
        (x * 2.0).sum().backward()

    mem = H.cpu_memory(fwd_bwd)
    assert mem.peak >= x.numel() * 4 and x.grad is not None
    # a thread the profiler was not handed to (as OpenMP workers of at::parallel_for are not): its
    # allocation is invisible to the allocator events, and the RSS high-water mark still sees it
    def in_thread():
        t = threading.Thread(target=lambda: torch.ones(6 * MiB, dtype=torch.uint8))
        t.start()
        t.join()

    mem = H.cpu_memory(in_thread)
    assert mem.peak < 1 * MiB
    if _rss_measurable():
        assert _rss_close(mem.rss_peak, 6 * MiB), mem.rss_peak / MiB


_NO_LCE = H.torch_lce_missing()


@pytest.mark.parametrize("op", H.OPS)
@pytest.mark.parametrize("provider", ["plain", "eager", H.FLOOR, H.TORCH_LCE])
def test_need_estimate_bounds_measured_peak(provider, op):
    """The fit check's estimate is an upper bound of the measured peak (so it skips only what
    would not fit), and within a small factor of it (so it does not skip what would)."""
    if provider == H.TORCH_LCE and _NO_LCE:
        pytest.skip(_NO_LCE)
    case = H.Case(B=64, C=4096, D=128)
    inputs = H.make_inputs(case)
    step = H.make_step(provider, op, case, inputs)
    step()
    inputs.clear_grads()
    peak = H.cpu_memory(step).peak
    need = H.estimated_need_bytes(provider, op, case)
    if provider == H.TORCH_LCE:  # chunked: one chunk's logits at a time (here the chunk is the batch)
        assert min(case.B, H.TORCH_LCE_OPTIONS["batch_chunk_size"]) * case.C * 4 <= peak
    else:
        assert peak >= case.B * case.C * 4  # every one of them holds the B x C logits
    assert peak <= need <= 3 * peak, (peak, need)


@pytest.mark.skipif(bool(_NO_LCE), reason=_NO_LCE or "")
def test_torch_lce_is_the_plain_loss():
    """torch_lce computes the plain formula's loss and gradients (float64, several chunks: B > the chunk)
    on torch's chunked path (no fallback warning), takes ignore_index, and declines margins,
    normalize_weight and label smoothing (which torch would run unchunked) with a reason."""
    import warnings

    from l2sm_kernels.options import L2SMOptions
    from l2sm_kernels.reference import l2_softmax_loss_ref
    chunk = H.TORCH_LCE_OPTIONS["batch_chunk_size"]
    B = 2 * chunk + 5
    for opts in (L2SMOptions(), L2SMOptions(ignore_index=3)):
        case = H.Case(B=B, C=50, D=16, dtype=torch.float64, options=opts)
        got, want = H.make_inputs(case, seed=3), H.make_inputs(case, seed=3)
        got.y[:4] = 3  # ignored rows when ignore_index = 3
        want.y[:4] = 3
        fn = H.loss_function(H.TORCH_LCE, case)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback to the unchunked path warns
            loss = fn(got.x, got.W, got.y)
            loss.backward()
        ref = l2_softmax_loss_ref(want.x, want.W, want.y, case.alpha, ignore_index=opts.ignore_index)
        ref.backward()
        assert torch.allclose(loss, ref)
        assert torch.allclose(got.x.grad, want.x.grad) and torch.allclose(got.W.grad, want.W.grad)
    arc = H.Case(B=8, C=64, D=16, options=L2SMOptions(margin_type="arcface", margin=0.5))
    assert "plain loss only" in H.unavailable_reason(H.TORCH_LCE, arc)
    smooth = H.Case(B=8, C=64, D=16, options=L2SMOptions(label_smoothing=0.1))
    assert "label smoothing" in H.unavailable_reason(H.TORCH_LCE, smooth)
    assert H.unavailable_reason(H.TORCH_LCE, TINY) == ""
    assert H.TORCH_LCE in H.providers_for("cpu")


def test_torch_lce_absent_is_a_reason(monkeypatch):
    """Where torch has no chunked linear cross-entropy (torch 2.11 on the GPU machine), torch_lce is a
    provider with a reason, not an error."""
    monkeypatch.delattr(H.F, "linear_cross_entropy", raising=False)
    why = H.torch_lce_missing()
    assert "linear_cross_entropy" in why and torch.__version__ in why
    assert H.unavailable_reason(H.TORCH_LCE, TINY) == why
    assert H.TORCH_LCE not in H.providers_for("cpu") and H.TORCH_LCE in H.all_providers()


def test_fit_check():
    assert H.fit_status(1 * MiB, 10 << 30) == ""
    st = H.fit_status(10 << 30, 4 << 30)
    assert st.startswith("skipped: would need 10.0 GiB") and "4.0 GiB available" in st
    avail = H.available_bytes("cpu")
    with open("/proc/meminfo") as f:
        total = int(next(line for line in f if line.startswith("MemTotal:")).split()[1]) * 1024
    assert 0 < avail <= total
    # measure() turns a provider that would not fit into a row, without running it
    inputs = H.make_inputs(TINY)
    row = H.measure(TINY, "forward_backward", "plain", inputs, H.environment("cpu"), available=1024)
    assert row["status"].startswith("skipped: would need") and row["median_ms"] is None
    assert row["est_need_bytes"] == H.estimated_need_bytes("plain", "forward_backward", TINY)
    assert inputs.x.grad is None  # it did not run


def test_backends_join_by_name(monkeypatch):
    real = H.available_backends()
    fake = dict(real)
    fake["newfast"] = type(real["eager"])(True, ("cpu",), "")
    fake["gpuonly"] = type(real["eager"])(True, ("cuda",), "")
    fake["broken"] = type(real["eager"])(False, (), "ImportError: not built")
    monkeypatch.setattr(H, "available_backends", lambda: fake)
    provs = H.providers_for("cpu")
    assert provs[:3] == ["plain", "eager", "compile"] and provs[-1] == H.FLOOR
    assert "newfast" in provs and "gpuonly" not in provs and "broken" not in provs
    assert "newfast" in H.all_providers() and "broken" in H.all_providers()
    assert H.unavailable_reason("broken", TINY) == "ImportError: not built"
    assert "not cpu" in H.unavailable_reason("gpuonly", TINY)


def test_tiny_sweep_end_to_end(tmp_path, capsys):
    args = ["-C", "64", "-B", "8", "-D", "16", "--skip", "compile", "--warmup", "0", "--min-reps", "2",
            "--min-time", "0", "--out", str(tmp_path), "--name", "tiny", "--no-progress"]
    assert sweep.main(args) == 0
    out = capsys.readouterr().out
    providers = [p for p in H.providers_for("cpu") if p != "compile"]
    fused = [p for p in providers if p not in H.BASELINES and p not in (H.FLOOR, H.TORCH_LCE)]
    providers += [H.dialed(b, s) for b in fused for s in H.KEEP_SPECS]  # the memory dial's rows (--keep)
    assert "cpu keep=1/4" in providers or not fused
    with open(tmp_path / "tiny.csv") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == H.COLUMNS
        rows = list(reader)
    assert len(rows) == len(H.OPS) * len(providers)
    assert {r["provider"] for r in rows} == set(providers)
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["median_ms"]) > 0 and float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert int(r["reps"]) >= 2 and int(r["peak_mem_bytes"]) > 0 and float(r["tflops"]) > 0
        if r["provider"] == "eager":
            assert float(r["ratio_eager"]) == pytest.approx(1.0)
    assert len(json.loads((tmp_path / "tiny.json").read_text())) == len(rows)
    assert (tmp_path / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| C | provider | median ms (p20-p80) |" in out and "wrote png:" in out


def test_memory_dial_providers():
    """"<backend> keep=<spec>" runs the backend with max_logits_bytes = that share of the B x C K
    products (compute dtype); baselines have no dial; the budget counts in the fit estimate."""
    from l2sm_kernels.options import L2SMOptions
    case = H.Case(B=8, C=64, D=16)
    assert H.split_provider(H.dialed("cpu", "1/4")) == ("cpu", "1/4") and H.split_provider("cpu") == ("cpu", None)
    assert [H.budget_bytes(case, s) for s in ("0", "1/4", "all", "100")] == [0, 512, 2048, 100]
    assert H.budget_bytes(H.Case(B=8, C=64, D=16, dtype=torch.float64, options=L2SMOptions(subcenters=2)),
                          "all") == 8 * 128 * 8
    assert H.budget_bytes(H.Case(B=8, C=64, D=16, dtype=torch.bfloat16), "all") == 2048  # fp32 products
    assert "no memory dial" in H.unavailable_reason(H.dialed("plain", "0"), case)
    assert "no memory dial" in H.unavailable_reason(H.dialed(H.FLOOR, "all"), case)
    assert "no memory dial" in H.unavailable_reason(H.dialed("eager", "all"), case)  # a baseline: it ignores it
    big = H.Case(B=256, C=65536, D=512)
    assert (H.estimated_need_bytes(H.dialed("cpu", "all"), "forward_backward", big)
            - H.estimated_need_bytes(H.dialed("cpu", "0"), "forward_backward", big)) == 256 * 65536 * 4
    seen = []
    real = H.l2_softmax_loss
    try:
        H.l2_softmax_loss = lambda *a, **k: seen.append(k["max_logits_bytes"])
        H.loss_function(H.dialed("cpu", "1/4"), case)(None, None, None)
        H.loss_function("cpu", case)(None, None, None)
    finally:
        H.l2_softmax_loss = real
    assert seen == [512, None]
    # the baselines never see the dial (the reference takes no max_logits_bytes)
    dial = H.Case(B=8, C=64, D=16, options=L2SMOptions(max_logits_bytes=0, label_smoothing=0.1))
    x = H.make_inputs(dial)
    assert torch.isfinite(H.baseline_function(dial)(x.x, x.W, x.y))


def test_sweep_reports_shapes_that_do_not_fit(tmp_path, capsys):
    """With 8 KiB "available": at C=64 the inputs fit but the providers would not; at C=128 the
    inputs alone would not. Both are rows with a status, nothing crashes."""
    case = H.Case(B=8, C=64, D=16)
    limit = 8192
    assert H.fit_status(case.input_bytes(), limit) == ""
    assert H.fit_status(H.Case(B=8, C=128, D=16).input_bytes(), limit)
    args = ["-C", "64", "128", "-B", "8", "-D", "16", "--providers", "plain", H.FLOOR, "--ops", "forward_backward",
            "--mem-limit-gib", str(limit / 2**30), "--out", str(tmp_path), "--format", "csv", "--no-progress",
            "--min-time", "0"]
    assert sweep.main(args) == 0
    with open(tmp_path / "sweep_cpu.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["C"], r["status"]) for r in rows] == [
        ("64", "skipped: would need 0.01 MiB, 0.01 MiB available"),
        ("64", "skipped: would need 0.01 MiB, 0.01 MiB available"),
        ("128", "skipped: inputs need 0.01 MiB, 0.01 MiB available"),
        ("128", "skipped: inputs need 0.01 MiB, 0.01 MiB available"),
    ]
    out = capsys.readouterr().out
    assert "skipped: would need" in out and "skipped: inputs need" in out
    assert (tmp_path / "sweep_cpu.png").exists()  # the plot copes with no measured point


# ------------------------------------------------------------------------------------ the GPU benchmark
def _gpu_script():
    from benchmarks import benchmark_l2_softmax_gpu as G
    return G


def test_gpu_report_on_known_numbers():
    """The GPU benchmark's tables from a hand-written result: ratios to the floor and to the gradients,
    the per-kernel line, failed and absent rows, and the summary last."""
    G = _gpu_script()
    g = 10 * 2**30
    res = {"env": {"device": "GPU", "torch": "2.11", "triton": "3.6", "sms": 132, "check_shape": [256, 512, 8192]},
           "bf16_mm_tflops": 790.0,
           "runs": {"B1024_D512_C131072": {
               "gemm_floor": {"ms": 0.5, "peak_bytes": g, "grad_bytes": g},
               "triton": {"ms": 1.0, "peak_bytes": int(1.5 * g), "grad_bytes": g, "profile": {
                   "steps": 3, "what": "GPU kernels", "sum_ms_per_step": 0.9, "kernels": [
                       {"name": "_fwd_split_kernel", "label": "split", "ms_per_step": 0.5, "calls_per_step": 1},
                       {"name": "_bwd_dw_kernel", "label": "dW", "ms_per_step": 0.3, "calls_per_step": 1},
                       {"name": "memset", "label": "", "ms_per_step": 0.1, "calls_per_step": 2}]}},
               "triton_ops": {"fwd_ms": 0.6, "bwd_ms": 0.4, "fwd_lse_only_ms": 0.3},
               "triton:split_d": {"error": "not timed: its accuracy check failed"},
               "plain": {"ms": 2.0, "peak_bytes": 4 * g, "grad_bytes": g}}},
           "checks": {"triton": {"ok": True, "rel": {"loss": 1e-6, "grad x": 2e-3}, "fail": []},
                      "triton:split_d": {"ok": False, "rel": {"loss": 1.0}, "fail": ["grad x: error 1 exceeds"]}},
           "missing": {"torch_lce": "torch 2.11 has no torch.nn.functional.linear_cross_entropy"}}
    text = G.report(res)
    assert "floor 0.500 ms" in text and "forward 0.600 ms (lse only 0.300), backward 0.400 ms" in text
    assert "split 0.500, dW 0.300, other 0.100; sum 0.900 ms/step" in text
    assert "triton:split_d         FAIL loss 1.00e+00" in text and "not timed: its accuracy check failed" in text
    summary = text[text.index("summary:"):].splitlines()
    assert summary[1].split() == ["provider", "C=131072"]
    rows = {ln.split()[0]: ln.split()[1:] for ln in summary[2:]}
    assert rows["gemm_floor"] == ["1.00x", "/", "1.00x"]
    assert rows["triton"] == ["2.00x", "/", "1.50x"] and rows["plain"] == ["4.00x", "/", "4.00x"]
    assert rows["torch_lce"] == ["absent"] and rows["triton:split_d"][0] == "not"


def test_gpu_benchmark_dry_run(tmp_path):
    """benchmarks/benchmark_l2_softmax_gpu.py --smoke (CPU tensors, the Triton interpreter, tiny shapes)
    runs its phases and writes the JSON and the table: floor, triton (checked, timed, its ops apart,
    forced tiles), plain, a profile per provider shape. `bash benchmarks/gpu_run.sh --smoke` is the
    whole session's dry run (docs/benchmarks.md, "On a GPU")."""
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root)] + sys.path), TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, str(root / "benchmarks" / "benchmark_l2_softmax_gpu.py"), "--smoke",
                          "--phase", "all", "--only", "gemm_floor", "triton", "plain", "--no-variants",
                          "--no-variant-checks", "--profile-steps", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=600, cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / "l2_softmax_gpu.json").read_text())
    assert all(p["done"] for p in out["phases"].values()) and set(out["phases"]) == {"triton", "baselines"}
    assert out["checks"]["triton"]["ok"] and out["checks"]["plain"]["ok"]
    assert out["checks"]["triton:fused"]["ok"]  # through forced tiles (triton_calls.forced_tiles)
    gemm = [f"triton:gemm@{d}" for d in ("0", "quarter", "all")]  # the GEMM path at three budgets: core rows
    assert all(out["checks"][n]["ok"] for n in gemm)
    assert len(out["runs"]) == 2
    for key, r in out["runs"].items():
        assert set(r) == {"gemm_floor", "triton", "triton_ops", "plain", *gemm}, (key, r)
        for name in ("gemm_floor", "triton", "plain", *gemm):
            assert r[name]["ms"] > 0 and r[name]["peak_bytes"] > 0 and r[name]["profile"]["kernels"], (key, name)
        assert set(r["triton_ops"]) == {"fwd_ms", "bwd_ms", "fwd_lse_only_ms"}
    table = (tmp_path / "table.txt").read_text().splitlines()
    summary = table[max(i for i, ln in enumerate(table) if ln.startswith("summary:")):]
    assert {ln.split()[0] for ln in summary[2:]} >= {"gemm_floor", "triton", "plain", *gemm}


def test_scripts_name_only_what_the_harness_has():
    """Every `H.name` a benchmark script uses exists in benchmarks/harness.py. The GPU script runs its
    profiler phase only where a profile is asked for, so a renamed helper there fails only on the GPU
    machine, after its one build; this catches it on the CPU first (a rename of _quiet_stderr_fd did)."""
    import re

    root = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
    missing = [(f.name, a) for f in sorted(root.glob("*.py"))
               for a in sorted(set(re.findall(r"\bH\.(\w+)", f.read_text()))) if not hasattr(H, a)]
    assert not missing, missing


def test_gpu_session_test_steps_select_tests(tmp_path):
    """The test steps of `bash benchmarks/gpu_run.sh --smoke` (their -k expressions narrowed to a few
    tests, interpreted) each select and pass tests: a -k expression that no longer matches any test id
    exits 5 ("no tests ran") and would cost the GPU session that step (the option matrix's ids changed
    once and its smoke filter selected nothing)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    steps = ["tests_cuda", "tests_triton", "tests_options", "tests_out_of_range"]
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, L2SM_GPU_STEPS=",".join(steps),
               L2SM_GPU_BUDGET="400")
    env.pop("L2SM_TEST_BACKENDS", None)
    res = subprocess.run(["bash", str(root / "benchmarks" / "gpu_run.sh"), "--smoke"], capture_output=True,
                         text=True, env=env, timeout=600, cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    log = (tmp_path / "env.txt").read_text()
    for name in steps:
        assert f"step {name}: exit 0 " in log, (name, log, (tmp_path / "tests.log").read_text()[-3000:])
