"""Backend "cpu": the C++ kernels of csrc/ (loss.h has the overview), built as l2sm_kernels._C by setup.py.

Importing l2sm_kernels._C registers torch.ops.l2sm.cpu_forward / cpu_backward (TORCH_LIBRARY in
C++, CPU kernels); load() attaches the shared fake kernels (aux_meta: the forward's aux is (B,) in
the compute dtype, q_i = 1 - p_iy, which the backward's target column uses) and autograd formula
(contract.py).

The kernels walk the classes in chunks: per chunk, a BLAS product gives the chunk's B x chunk K
cosines (K sub-centers per class) in a workspace buffer and fused epilogues (the sub-center max;
online logsumexp; softmax gradient) run on it while it is in cache. Each thread takes an equal
contiguous share of the classes (in units of 16 classes, so every thread has work once
C >= 16 x threads, whatever the chunk size) and walks it in chunks with its own workspace and
single-threaded BLAS (one parallel region per call; per-row statistics and dX are combined in thread
order afterwards). Below 32 classes one share runs, with threaded BLAS.

Workspace, per thread: B x chunk x K values of the compute dtype (4 bytes, 8 for float64), plus
chunk x K x D values when the weight is not a contiguous matrix of the compute dtype (bf16 / fp16 /
transposed weights are converted a chunk at a time), plus a (B, D) dX accumulator per extra thread
in the backward. No B x C buffer exists beyond the memory dial's kept block (below). The chunk size,
in classes:

- default: chunk = budget / ((B + D + 1) x element size x K), rounded down to a multiple of 64 (at
  least 64), so that one chunk's cosines and weight rows fit in a 4 MiB budget
  (``set_workspace_bytes``, env L2SM_CPU_WORKSPACE_MB). B = 256, D = 512, fp32: 1344 classes
  (448 with K = 3), a 1.3 MiB cosine buffer per thread;
- fixed: ``set_chunk_classes(n)`` (env L2SM_CPU_CHUNK); 0 returns to the budget.

The memory dial (max_logits_bytes; docs/memory_dial.md): the forward keeps the products of the
first R = min(B, max_logits_bytes // (C K x element size)) rows of the batch with every row of W,
an (R, C K) block returned inside aux, and the backward copies those rows back instead of
recomputing them: 3 + (B - R) / B GEMM-equivalents per step instead of 4. Default (None): up to
DEFAULT_MAX_LOGITS_BYTES (256 MiB), 0 when features and weights are both bf16 (their products are bf16
GEMMs: set_bf16_gemm). Nothing is kept when no gradient is asked for.

Results do not depend on the chunk size beyond rounding, and are bitwise reproducible for a given
chunk size and number of threads (torch.get_num_threads()).

The environment knobs never stop the package from importing: a value that is not a number of the
right kind (text, NaN, inf, negative, zero bytes, a fractional chunk) is ignored, the knob keeps its
default; a valid value above the maximum (MAX_WORKSPACE_BYTES = 2^40 bytes = 1 TiB, i.e.
L2SM_CPU_WORKSPACE_MB above 1048576; MAX_CHUNK_CLASSES = 2^40 classes) is clamped to it. Either way
a RuntimeWarning at load names the variable and its value, and ``knob_notes`` (variable -> reason)
keeps the reason for later reading.
"""
from __future__ import annotations

import importlib
import math
import os
import warnings

import torch

from ..options import FLOAT_DTYPES, compute_dtype
from .contract import BACKWARD_SCHEMA, FORWARD_SCHEMA, register_backend_ops
from .registry import BackendUnavailable

DTYPES = FLOAT_DTYPES  # inputs are converted to the compute dtype (fp32 / fp64) a chunk at a time

_C = None
_OPS = None  # (forward op, backward op) once registered

# environment knobs whose value was ignored or clamped at load: variable -> why (also warned once)
knob_notes: dict[str, str] = {}

# the knobs' largest values (csrc/chunking.h: kMaxWorkspaceBytes, kMaxChunkClasses)
MAX_WORKSPACE_BYTES = 1 << 40
MAX_CHUNK_CLASSES = 1 << 40


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
    for op, name, schema in ((fwd, "cpu_forward", FORWARD_SCHEMA), (bwd, "cpu_backward", BACKWARD_SCHEMA)):
        if str(op._schema) != f"l2sm::{name}{schema}":  # a build of older sources
            raise BackendUnavailable(
                f"l2sm_kernels._C is out of date: l2sm::{name} has the schema {str(op._schema)!r}, this package's "
                f"is {name}{schema!r}; rebuild it: pip install --no-build-isolation -e ."
            )
    _C = ext
    _apply_env_knobs()
    register_backend_ops("cpu", fwd, bwd, aux_meta)
    _OPS = (fwd, bwd)
    return _OPS


# The memory dial's default (max_logits_bytes None): keep up to this many bytes of products
# (csrc/chunking.h: kDefaultMaxLogitsBytes; the extension's DEFAULT_MAX_LOGITS_BYTES, tested equal).
DEFAULT_MAX_LOGITS_BYTES = 256 << 20


def kept_rows(batch, num_classes, subcenters, element_size, max_logits_bytes, bf16_inputs=False):
    """Rows of the batch whose products with every row of W the forward keeps for the backward
    (csrc/chunking.h, kept_rows): min(B, budget // (C K element_size)); 0 without a budget for one row.
    The default budget (None) is DEFAULT_MAX_LOGITS_BYTES, or 0 when features and weights are both bf16
    (bf16_inputs: bf16 GEMMs recompute faster than the kept products are written and read back).
    Traces under torch.compile with symbolic B and C (no host values)."""
    if max_logits_bytes is None:
        budget = 0 if bf16_inputs else DEFAULT_MAX_LOGITS_BYTES
    else:
        budget = max_logits_bytes
    row = num_classes * subcenters * element_size
    if budget <= 0 or row == 0:
        return 0
    return torch.sym_min(batch, budget // row)


def aux_meta(x, weight, target, alpha, bias, margins, label_smoothing, negatives_table, normalize_weight,
             margin_kind, margin_detached, subcenters, ignore_index, eps, negatives, max_logits_bytes, need_x,
             need_weight, need_bias, need_alpha):
    """The forward's aux: (B + R C K,) in the compute dtype: q_i = 1 - p_iy of each row, then the kept
    products of the first R rows (csrc/loss_forward.cpp), R = kept_rows(...) when a gradient is asked
    for, else 0."""
    dt = compute_dtype(x, weight, bias)
    B = x.shape[0]
    C = weight.shape[0] // subcenters
    R = 0
    if need_x or need_weight or need_bias or need_alpha:
        R = kept_rows(B, C, subcenters, torch.empty((), dtype=dt).element_size(), max_logits_bytes,
                      x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16)
    return x.new_empty((B + R * C * subcenters,), dtype=dt)


def _env_chunk(value: str):
    """(classes per chunk, note): the note says why the value was ignored (classes None) or clamped."""
    try:
        n = int(value.strip())
    except ValueError:
        return None, "not an integer number of classes"
    if n < 0:
        return None, "negative (0 means: from the workspace budget)"
    if n > MAX_CHUNK_CLASSES:
        return MAX_CHUNK_CLASSES, f"above the maximum; clamped to {MAX_CHUNK_CLASSES} classes"
    return n, ""


def _env_workspace(value: str):
    """(bytes, note) of L2SM_CPU_WORKSPACE_MB (MiB, may be fractional), as _env_chunk."""
    try:
        mb = float(value.strip())
    except ValueError:
        return None, "not a number of MiB"
    if math.isnan(mb) or math.isinf(mb):
        return None, "not a finite number of MiB"
    if mb <= 0:
        return None, "not positive"
    if mb * 2**20 > MAX_WORKSPACE_BYTES:
        return MAX_WORKSPACE_BYTES, (f"above the maximum of {MAX_WORKSPACE_BYTES >> 20} MiB (1 TiB); clamped to it")
    n = int(mb * 2**20)
    if n < 1:
        return None, "less than one byte"
    return n, ""


def _apply_env_knobs() -> None:
    """Read L2SM_CPU_CHUNK / L2SM_CPU_WORKSPACE_MB. Never raises: a bad value is ignored (the knob keeps
    its default) or clamped, with a RuntimeWarning and a note in knob_notes."""
    knobs = (("L2SM_CPU_CHUNK", _env_chunk, set_chunk_classes, "classes from the workspace budget"),
             ("L2SM_CPU_WORKSPACE_MB", _env_workspace, set_workspace_bytes, "4 MiB"))
    for name, parse, setter, default in knobs:
        value = os.environ.get(name, "")
        if not value:
            continue
        try:
            n, why = parse(value)
            if n is not None:
                setter(n)
        except Exception as e:  # noqa: BLE001  (belt and braces: a knob must not break the import)
            n, why = None, f"{type(e).__name__}: {e}"
        if not why:
            continue
        note = (f"{name}={value!r} ignored ({why}); the cpu backend uses its default ({default})" if n is None
                else f"{name}={value!r}: {why}")
        knob_notes[name] = note
        try:
            warnings.warn(f"l2sm_kernels: {note}", RuntimeWarning, stacklevel=2)
        except Exception:  # noqa: BLE001  (-W error: the note stays in knob_notes, the import goes on)
            pass


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
    """Classes per chunk (1 .. MAX_CHUNK_CLASSES), or 0 to derive it from the workspace budget (the default)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0 or n > MAX_CHUNK_CLASSES:
        raise ValueError(f"chunk_classes must be an int >= 0 (at most {MAX_CHUNK_CLASSES}), got {n!r}")
    _ext().set_chunk_classes(n)


def get_chunk_classes() -> int:
    """The fixed chunk size, or 0 when it comes from the workspace budget."""
    return _ext().get_chunk_classes()


def set_workspace_bytes(n: int) -> None:
    """Byte budget of one chunk's working set, (B + D + 1) x chunk x K values, used while
    chunk_classes is 0. Default 4 MiB; at most MAX_WORKSPACE_BYTES (1 TiB)."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0 or n > MAX_WORKSPACE_BYTES:
        raise ValueError(f"workspace_bytes must be an int > 0 (at most {MAX_WORKSPACE_BYTES}), got {n!r}")
    _ext().set_workspace_bytes(n)


def get_workspace_bytes() -> int:
    return _ext().get_workspace_bytes()


def set_bf16_gemm(on: bool) -> None:
    """With bf16 features and weights: run the three products through ATen's bf16 GEMM (True, the
    default; rounded to bf16 where plain torch's bf16 matmuls round, docs/memory_dial.md) or in fp32
    (False: the arithmetic of fp32 inputs)."""
    if not isinstance(on, bool):
        raise TypeError(f"set_bf16_gemm takes a bool, got {on!r}")
    _ext().set_bf16_gemm(on)


def get_bf16_gemm() -> bool:
    return _ext().get_bf16_gemm()


def chunk_for(batch: int, num_classes: int, dim: int, dtype: torch.dtype = torch.float32, subcenters: int = 1) -> int:
    """Classes per chunk of a call with `batch` rows, `num_classes` classes of `subcenters` sub-centers
    each and `dim` features in the compute dtype `dtype` (float32, or float64 when an input is float64)."""
    return _ext().chunk_for(batch, num_classes, dim, torch.empty((), dtype=dtype).element_size(), subcenters)
