"""Benchmarks of l2sm_kernels: pytest-benchmark microbenchmarks (benchmark_l2_softmax.py) and the sweep
harness (sweep.py), both built on harness.py (providers, memory measurement, tidy rows)."""
