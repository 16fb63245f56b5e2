"""What the tests, the benchmarks and the GPU scripts share: case builders and the accuracy relation
(accuracy.py), the option combinations they run (combinations.py), the peak-memory meters (memory.py),
and the class-parallel feature gradient's rounding bound (rank_rounding.py)."""
from .accuracy import (ATOL_REL, Case, assert_accurate, check_case, loss_and_grads, make_case, max_err, run,
                       run_reference)
from .memory import allocator_peak_bytes, available_bytes, cpu_peak_bytes, cuda_peak_bytes, peak_bytes

__all__ = [
    "ATOL_REL", "Case", "allocator_peak_bytes", "assert_accurate", "available_bytes", "check_case",
    "cpu_peak_bytes", "cuda_peak_bytes", "loss_and_grads", "make_case", "max_err", "peak_bytes", "run",
    "run_reference",
]
