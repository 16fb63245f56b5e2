"""pytest set-up of the benchmarks.

Benchmark files are named benchmark_*.py (docs/conventions.md, "One base name per op": one base name with the op's kernel and test
files); this hook collects them when pytest is pointed at benchmarks/ (`python -m pytest benchmarks/`).
The test command `python -m pytest tests` (and a bare `python -m pytest`, whose testpaths is tests/)
never collects them. Unlike tests/conftest.py this does not set TRITON_INTERPRET: interpreted
kernels are not benchmarked.

After the pytest-benchmark tables, a summary lists each benchmark's peak memory beyond the inputs
(gradients included, and without them) next to its median time, grouped as the tables are (memory
alone under --benchmark-disable, which runs each benchmark once without timing it).

--bench-smoke swaps every benchmark shape for a tiny one: with --benchmark-disable, the CI check that
every benchmark still runs (`python -m pytest benchmarks --benchmark-disable --bench-smoke`).
"""
import pytest


MiB = 2**20
_RESULTS: list[dict] = []


def pytest_addoption(parser):
    parser.addoption("--bench-smoke", action="store_true", default=False,
                     help="l2sm benchmarks: tiny shapes instead of the real ones (with --benchmark-disable: CI)")


def pytest_collect_file(file_path, parent):
    # a file named on the command line is collected by pytest itself: collecting it here too ran every
    # benchmark of `python -m pytest benchmarks/benchmark_x.py` twice
    if file_path.suffix == ".py" and file_path.name.startswith("benchmark_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture
def record_result():
    """Append one finished benchmark's summary (group, provider, median_ms, memory) for the report."""
    return _RESULTS.append


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("peak memory beyond inputs (l2sm benchmarks)")
    by_group: dict[str, list[dict]] = {}
    for r in _RESULTS:
        by_group.setdefault(r["group"], []).append(r)
    for group, rows in by_group.items():
        tr.write_line(f"{group}   [memory: {rows[0]['mem_method']}]")
        base = {r["provider"]: r["median_ms"] for r in rows}
        for r in rows:
            rss = "" if r["peak_rss_bytes"] is None else f"  rss peak {r['peak_rss_bytes'] / MiB:.1f} MiB"
            if r["median_ms"] is None:  # --benchmark-disable
                timing = f"{'(not timed)':>52}"
            else:
                rel = f"{r['median_ms'] / base['plain']:.2f}x plain" if base.get("plain") else ""
                timing = f"median {r['median_ms']:10.2f} ms  {rel:>12}  {r['tflops']:.3f} TFLOP/s"
            tr.write_line(
                f"  {r['provider']:<11} {timing}  "
                f"peak {r['peak_mem_bytes'] / MiB:.1f} MiB  beyond grads {r['peak_beyond_grads_bytes'] / MiB:.1f} MiB  "
                f"(grads {r['grad_bytes'] / MiB:.1f} MiB){rss}"
            )
