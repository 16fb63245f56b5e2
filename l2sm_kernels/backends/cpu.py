"""Backend "cpu": the C++ kernels of csrc/ (loss.h has the overview), built as l2sm_kernels._C by setup.py.

Importing l2sm_kernels._C registers torch.ops.l2sm.cpu_forward / cpu_backward (TORCH_LIBRARY in
C++, CPU kernels); load() attaches the shared fake kernels and autograd formula (contract.py).

The kernels walk the classes in chunks: per chunk, a BLAS product gives the chunk's B x chunk logits
in a workspace buffer and fused epilogues (online logsumexp; softmax gradient) run on it while it is
in cache. Each thread takes an equal contiguous share of the classes (in units of 16 classes, so
every thread has work once C >= 16 x threads, whatever the chunk size) and walks it in chunks with
its own workspace and single-threaded BLAS (one parallel region per call; per-row statistics and dX
are combined in thread order afterwards). Below 32 classes one share runs, with threaded BLAS.

Workspace, per thread: B x chunk values of the compute dtype (4 bytes, 8 for float64), plus
chunk x D values when the weight is not a contiguous matrix of the compute dtype (bf16 / fp16 /
transposed weights are converted a chunk at a time), plus a (B, D) dX accumulator per extra thread
in the backward. No B x C buffer exists. The chunk size:

- default: chunk = budget / ((B + D + 1) x element size), rounded down to a multiple of 64, so that one chunk's
  logits and weight rows fit in a 4 MiB budget (``set_workspace_bytes``, env L2SM_CPU_WORKSPACE_MB).
  B = 256, D = 512, fp32: 1344 classes, a 1.3 MiB logits buffer per thread;
- fixed: ``set_chunk_classes(n)`` (env L2SM_CPU_CHUNK); 0 returns to the budget.

Results do not depend on the chunk size beyond rounding, and are bitwise reproducible for a given
chunk size and number of threads (torch.get_num_threads()).
"""
from __future__ import annotations

import importlib
import os

import torch

from ..options import FLOAT_DTYPES
from .contract import register_backend_ops
from .registry import BackendUnavailable

DTYPES = FLOAT_DTYPES  # inputs are converted to the compute dtype (fp32 / fp64) a chunk at a time

_C = None
_OPS = None  # (forward op, backward op) once registered


def _ext():
    if _C is None:
        raise BackendUnavailable("l2sm_kernels._C is not loaded (l2sm_kernels.backends.cpu.load() failed or was not run)")
    return _C


def load():
    """Import the extension and register its ops; -> (forward op, backward op). Idempotent."""
    global _C, _OPS
    if _OPS is not None:
        return _OPS
    try:
        ext = importlib.import_module("l2sm_kernels._C")  # registers the ops
    except ModuleNotFoundError as e:
        if e.name != "l2sm_kernels._C":
            raise
        note = _build_error()
        if note:
            raise BackendUnavailable(
                f"compiling l2sm_kernels._C failed when the package was built ({note}); "
                "`pip install -v --no-build-isolation -e .` shows the compiler's error "
                "(L2SM_REQUIRE_EXT=1 makes it fail the install)"
            ) from None
        raise BackendUnavailable(
            "l2sm_kernels._C is not built: run `pip install --no-build-isolation -e .` "
            "(or `python setup.py build_ext --inplace`) with torch installed; "
            "a failed compilation is shown with `pip install -v ...`"
        ) from None
    except ImportError as e:  # built against another torch / python, or a missing library
        raise BackendUnavailable(
            f"l2sm_kernels._C is built but cannot be loaded ({e}); rebuild it against torch "
            f"{torch.__version__}: pip install --no-build-isolation -e ."
        ) from None
    try:
        fwd, bwd = torch.ops.l2sm.cpu_forward.default, torch.ops.l2sm.cpu_backward.default
    except (AttributeError, RuntimeError) as e:
        raise BackendUnavailable(f"l2sm_kernels._C loaded but did not register l2sm::cpu_forward ({e})") from None
    _C = ext
    try:
        chunk = os.environ.get("L2SM_CPU_CHUNK", "")
        if chunk:
            set_chunk_classes(int(chunk))
        ws_mb = os.environ.get("L2SM_CPU_WORKSPACE_MB", "")
        if ws_mb:
            set_workspace_bytes(int(float(ws_mb) * 2**20))
    except ValueError as e:
        _C = None
        raise BackendUnavailable(f"bad L2SM_CPU_CHUNK / L2SM_CPU_WORKSPACE_MB environment variable: {e}") from None
    register_backend_ops("cpu", fwd, bwd)
    _OPS = (fwd, bwd)
    return _OPS


def _build_error() -> str:
    """The note setup.py leaves next to this module when compiling the extension failed, or ''."""
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # l2sm_kernels/, where _C lands
    path = os.path.join(package_dir, "_C.build_error.txt")
    try:
        with open(path) as f:
            return " ".join(f.read().split())[:500]
    except OSError:
        return ""


def set_chunk_classes(n: int) -> None:
    """Classes per chunk (> 0), or 0 to derive it from the workspace budget (the default)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"chunk_classes must be an int >= 0, got {n!r}")
    _ext().set_chunk_classes(n)


def get_chunk_classes() -> int:
    """The fixed chunk size, or 0 when it comes from the workspace budget."""
    return _ext().get_chunk_classes()


def set_workspace_bytes(n: int) -> None:
    """Byte budget of one chunk's working set, (B + D) x chunk values, used while chunk_classes is 0.
    Default 4 MiB."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"workspace_bytes must be an int > 0, got {n!r}")
    _ext().set_workspace_bytes(n)


def get_workspace_bytes() -> int:
    return _ext().get_workspace_bytes()


def chunk_for(batch: int, num_classes: int, dim: int, dtype: torch.dtype = torch.float32) -> int:
    """Classes per chunk of a call with `batch` rows, `num_classes` classes and `dim` features in the
    compute dtype `dtype` (float32, or float64 when an input is float64)."""
    return _ext().chunk_for(batch, num_classes, dim, torch.empty((), dtype=dtype).element_size())
