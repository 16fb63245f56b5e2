"""The cosine top-k of backend "cpu": the C++ kernel of csrc/cosine_topk.cpp (its header has the design and
the workspace bound), registered as l2sm::cpu_cosine_topk when l2sm_kernels._C is imported; this module
attaches the fake kernel."""
from __future__ import annotations

import torch

from . import cpu
from .registry import BackendUnavailable
from .topk import register_topk_op

_OP = None


def load():
    """-> the op l2sm::cpu_cosine_topk. Idempotent."""
    global _OP
    if _OP is not None:
        return _OP
    cpu.load()  # imports l2sm_kernels._C (raises BackendUnavailable with the reason when it cannot)
    try:
        op = torch.ops.l2sm.cpu_cosine_topk.default
    except (AttributeError, RuntimeError) as e:
        raise BackendUnavailable(
            f"l2sm_kernels._C does not register l2sm::cpu_cosine_topk ({e}): it was built from older sources; "
            "rebuild it (pip install --no-build-isolation -e .)") from None
    register_topk_op(op)
    _OP = op
    return op


def set_blocks(query_block: int = 0, gallery_chunk: int = 0) -> tuple[int, int]:
    """Set the C++ kernel's query block and gallery chunk (rows; 0 keeps the current value) and return
    (query_block, gallery_chunk). Defaults 256 and 512. Results do not depend on them (exact top-k)."""
    for name, v in (("query_block", query_block), ("gallery_chunk", gallery_chunk)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    load()
    qb, nc = torch.ops.l2sm._cpu_cosine_topk_blocks(query_block, gallery_chunk)
    return int(qb), int(nc)
