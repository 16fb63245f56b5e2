"""Peak memory of a call, the one meter for tests, the benchmark harness, the demo and the GPU scripts.

- CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before
  (cuda_peak_bytes).
- CPU: the peak of the running sum of torch's CPU allocation and free events recorded by
  torch.profiler(profile_memory=True) (cpu_peak_bytes, allocator_peak_bytes).
peak_bytes(fn, device) picks the right one and says which it used.
"""
from __future__ import annotations

import contextlib
import gc
import os
import sys

import torch


def allocator_peak_bytes(prof) -> int:
    """Peak of the running sum of torch's CPU allocation (+bytes) and free (-bytes) events recorded by a
    finished torch.profiler.profile(profile_memory=True), relative to when it started. It sees the
    allocations of the profiled thread and of the threads it hands its state to (autograd's engine),
    not those made inside at::parallel_for / OpenMP workers nor memory taken outside torch's
    allocator (BLAS packing buffers). Frees of memory allocated before profiling count as negative."""
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda ev: ev[0])  # stable: events of one timestamp keep their recorded order
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


@contextlib.contextmanager
def quiet_profiler_logs():
    """Silence file descriptor 2 while the profiler starts or stops (kineto prints "USDT ...
    profiler_start / profiler_stop" lines there, past Python's sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_bytes(fn) -> int:
    """Peak CPU memory torch's allocator holds during fn() beyond what it held at the start
    (see allocator_peak_bytes for what it can and cannot see)."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with quiet_profiler_logs():
        prof.start()
    try:
        fn()
    finally:
        with quiet_profiler_logs():
            prof.stop()
    return allocator_peak_bytes(prof)


def available_bytes(device="cpu") -> int:
    """Memory a new allocation can get now: CUDA free memory, or MemAvailable of /proc/meminfo."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def cuda_peak_bytes(fn, device=None) -> int:
    """Peak CUDA memory allocated during fn() beyond what was allocated when it started (the caller
    drops what it does not want counted, e.g. old gradients, before calling)."""
    gc.collect()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


CUDA_METHOD = "torch.cuda.max_memory_allocated"
CPU_METHOD = "torch.profiler memory events (running sum, peak)"


def peak_bytes(fn, device) -> tuple[int, str]:
    """(peak bytes allocated by fn() beyond what existed before it, how it was measured) on `device`."""
    if torch.device(device).type == "cuda":
        return cuda_peak_bytes(fn, device), CUDA_METHOD
    return cpu_peak_bytes(fn), CPU_METHOD
