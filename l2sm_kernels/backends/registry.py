"""Backend registry: which backends exist, which can run here, and which one a call gets.

- "eager":  plain torch (eager.py), any device and dtype. Always available.
- "cpu":    the C++ kernels of csrc/ (cpu.py loads them), CPU tensors.
- "triton": the fused Triton kernels, CUDA tensors; CPU tensors only under the Triton interpreter
            (TRITON_INTERPRET=1 set before triton is imported), which is how CI tests them.
- "auto":   triton for CUDA tensors, cpu for CPU tensors, eager where neither can serve; the
            fallback is announced once per (device type, reason) with a warning, never per call.

Two ops: the loss (ops_for / resolve: a forward and backward op per backend, loaded by the backend's
module) and the cosine top-k (topk_op_for / resolve_topk: one op per backend, loaded after the backend by
one more module, backends/topk.py has the contract).
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import NamedTuple

import torch

from ..options import FLOAT_DTYPES
from . import eager
from .contract import OPS, define_python_backend
from .topk import TOPK_OPS

BACKENDS = ("eager", "cpu", "triton")
BACKEND_CHOICES = ("auto",) + BACKENDS


class BackendUnavailable(RuntimeError):
    """Raised by a backend module's load() with the reason it cannot run here."""


class BackendInfo(NamedTuple):
    available: bool
    devices: tuple  # device types it serves here
    reason: str  # why not (empty when available)


# module that provides load() -> (forward op, backward op), per non-eager backend
_MODULES = {"cpu": "l2sm_kernels.backends.cpu", "triton": "l2sm_kernels.backends.triton.op"}
_load_errors: dict[str, str] = {}
_dtypes: dict[str, tuple] = {}  # input dtypes a loaded backend takes (module attribute DTYPES)
_warned: set = set()


def _ensure_eager():
    if "eager" not in OPS:
        OPS["eager"] = define_python_backend("eager", eager.forward, eager.backward)


def _load(name: str) -> str:
    """Load backend `name` once; return "" when its ops are registered, else the reason."""
    if name == "eager":
        _ensure_eager()
        return ""
    if name in OPS:
        return ""
    if name in _load_errors:
        return _load_errors[name]
    try:
        mod = importlib.import_module(_MODULES[name])
        OPS[name] = mod.load()
        _dtypes[name] = tuple(getattr(mod, "DTYPES", FLOAT_DTYPES))
        return ""
    except Exception as e:  # noqa: BLE001 - any failure (another torch's API too) makes the backend unavailable, never the import
        _load_errors[name] = f"{type(e).__name__}: {e}"
        return _load_errors[name]


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _devices(name: str) -> tuple:
    if name == "eager":
        return ("cpu", "cuda", "any")
    if name == "cpu":
        return ("cpu",)
    return ("cpu",) if triton_interpreted() else ("cuda",)


def available_backends() -> dict[str, BackendInfo]:
    """For each backend: whether it can run here, on which device types, and if not, why not."""
    out = {}
    for name in BACKENDS:
        reason = _load(name)
        if not reason and name == "triton" and not triton_interpreted() and not torch.cuda.is_available():
            reason = "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run it on CPU tensors)"
        out[name] = BackendInfo(not reason, _devices(name) if not reason else (), reason)
    return out


def _serves(name: str, device_type: str, dtypes) -> str:
    """"" if backend `name` can take tensors of `dtypes` on `device_type`, else why not."""
    reason = _load(name)
    if reason:
        return reason
    if name == "eager":
        return ""
    if device_type not in _devices(name):
        if name == "triton" and device_type == "cpu":
            return "the triton backend takes CUDA tensors (CPU tensors only with TRITON_INTERPRET=1)"
        return f"the {name} backend does not take {device_type} tensors"
    bad = sorted({str(d) for d in dtypes if d not in _dtypes[name]})
    if bad:
        return f"the {name} backend does not take {', '.join(bad)} inputs"
    return ""


def check_backend(backend) -> str:
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    return backend


def _auto(device_type: str, reason_for, key: tuple, cost: str, what: str = "") -> str:
    """backend "auto": the preferred backend for the device type (triton for CUDA, cpu for CPU, else
    eager) when reason_for(it) is "", else the eager fallback, announced once per (key, device type,
    reason) with what the fallback costs. stacklevel: the user's call of the public function."""
    preferred = "triton" if device_type == "cuda" else "cpu" if device_type == "cpu" else "eager"
    reason = reason_for(preferred)
    if not reason:
        return preferred
    k = key + (device_type, reason)
    if k not in _warned and not torch.compiler.is_compiling():
        _warned.add(k)
        warnings.warn(
            f"l2sm_kernels: {what}backend 'auto' uses the eager fallback for {device_type} tensors "
            f"because the {preferred} backend is unavailable ({reason}); {cost}. This warning is shown once.",
            RuntimeWarning,
            stacklevel=4,
        )
    return "eager"


def resolve(backend: str, device_type: str, dtypes=()) -> str:
    """The backend a call runs on. An explicit backend that cannot serve raises ValueError;
    "auto" falls back to eager, warning once per (device type, reason)."""
    check_backend(backend)
    if backend != "auto":
        reason = _serves(backend, device_type, dtypes)
        if reason:
            raise ValueError(f"backend={backend!r} cannot run on {device_type} tensors here: {reason}")
        return backend
    return _auto(device_type, lambda name: _serves(name, device_type, dtypes), (),
                 "the eager backend materializes the B x C logits")


def ops_for(name: str):
    """(forward op, backward op) of a loaded backend."""
    reason = _load(name)
    if reason:
        raise ValueError(f"backend {name!r} is unavailable: {reason}")
    return OPS[name]


# ---------------------------------------------------------------------------------------------
# The second op: cosine top-k (backends/topk.py; l2sm_kernels.scoring.cosine_topk). Each backend serves
# it through one more module, loaded after the backend itself; device and dtype rules are the backend's.
# ---------------------------------------------------------------------------------------------
_TOPK_MODULES = {"eager": "l2sm_kernels.backends.eager_topk", "cpu": "l2sm_kernels.backends.cpu_topk",
                 "triton": "l2sm_kernels.backends.triton.topk_op"}
_topk_errors: dict[str, str] = {}


def _load_topk(name: str) -> str:
    """Load backend `name`'s top-k op once; return "" when it is registered, else the reason."""
    reason = _load(name)
    if reason:
        return reason
    if name in TOPK_OPS:
        return ""
    if name in _topk_errors:
        return _topk_errors[name]
    try:
        TOPK_OPS[name] = importlib.import_module(_TOPK_MODULES[name]).load()
        return ""
    except Exception as e:  # noqa: BLE001 - as _load: unavailable with the reason, never a broken import
        _topk_errors[name] = f"{type(e).__name__}: {e}"
        return _topk_errors[name]


def resolve_topk(backend: str, device_type: str, dtypes=()) -> str:
    """The backend a cosine top-k call runs on: resolve()'s rules ("auto": triton for CUDA, cpu for CPU,
    else the eager fallback, announced once per (device type, reason)); an explicit backend that cannot
    serve raises ValueError."""
    check_backend(backend)
    if backend != "auto":
        reason = _serves(backend, device_type, dtypes) or _load_topk(backend)
        if reason:
            raise ValueError(f"backend={backend!r} cannot run cosine_topk on {device_type} tensors here: {reason}")
        return backend
    return _auto(device_type, lambda name: _serves(name, device_type, dtypes) or _load_topk(name), ("cosine_topk",),
                 "the eager backend scores the gallery in chunks with torch and sorts each chunk", "cosine_topk with ")


def topk_op_for(name: str):
    """The cosine top-k op of a loaded backend."""
    reason = _load_topk(name)
    if reason:
        raise ValueError(f"backend {name!r} cannot run cosine_topk: {reason}")
    return TOPK_OPS[name]


# Load every backend at import, so that resolving a backend inside torch.compile only reads dicts.
for _name in BACKENDS:
    _load(_name)
    _load_topk(_name)
