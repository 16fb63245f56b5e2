"""Test set-up: the backend is a test parameter (docs/conventions.md, "Backends as a test parameter").

Without CUDA, the triton backend runs under the Triton interpreter on CPU tensors: TRITON_INTERPRET=1
must be set before triton is first imported, which is why it is set here, before l2sm_kernels loads.
Set L2SM_TEST_BACKENDS=eager,cpu to run a subset. Set L2SM_REQUIRE_BACKENDS=eager,cpu,triton (CI
does) to make an unavailable backend a failure instead of a skip, so a broken build cannot pass.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import l2sm_kernels  # noqa: E402
from l2sm_kernels.backends import BACKENDS, triton_interpreted  # noqa: E402

_SELECTED = [b for b in os.environ.get("L2SM_TEST_BACKENDS", ",".join(BACKENDS)).split(",") if b]
_REQUIRED = [b for b in os.environ.get("L2SM_REQUIRE_BACKENDS", "").split(",") if b]


def backend_device(backend: str) -> str:
    """The device a backend's tests put their tensors on."""
    if backend == "cpu":
        return "cpu"
    if backend == "triton" and triton_interpreted():
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def is_slow(backend: str) -> bool:
    """Interpreted triton: tests use small shapes and a covering subset of option combinations."""
    return backend == "triton" and triton_interpreted()


def supports_fp64(backend: str) -> bool:
    return backend in ("eager", "cpu")


@pytest.fixture(params=_SELECTED)
def backend(request):
    name = request.param
    info = l2sm_kernels.available_backends()[name]
    if not info.available:
        if name in _REQUIRED:
            pytest.fail(f"backend {name} is required (L2SM_REQUIRE_BACKENDS) but unavailable: {info.reason}")
        pytest.skip(f"backend {name} unavailable: {info.reason}")
    return name


@pytest.fixture
def device(backend):
    return backend_device(backend)
