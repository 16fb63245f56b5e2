"""The backends behind the op boundary, and the registry that picks one.

  registry.py   which backends exist, which run here (available_backends), which one a call gets
                (resolve, "auto" and its one-time fallback warning), their ops (ops_for)
  contract.py   the op boundary: one forward / backward torch.library op pair per backend with one
                schema, the shared fake kernels and autograd formula
  eager.py      backend "eager": plain torch, the verification fallback
  cpu.py        backend "cpu": loads the C++ kernels of csrc/ (l2sm_kernels._C); the workspace knobs
  triton/       backend "triton": the fused Triton kernels (see its __init__ for the design)
  topk.py       the second op boundary, cosine top-k (l2sm_kernels.scoring): schema, fake kernel, score keys;
                eager_topk.py, cpu_topk.py and triton/topk_op.py serve it per backend (resolve_topk, topk_op_for)
"""
from .registry import (BACKEND_CHOICES, BACKENDS, BackendInfo, BackendUnavailable, available_backends, ops_for,
                       resolve, resolve_topk, topk_op_for, triton_interpreted)

__all__ = ["BACKEND_CHOICES", "BACKENDS", "BackendInfo", "BackendUnavailable", "available_backends", "ops_for",
           "resolve", "resolve_topk", "topk_op_for", "triton_interpreted"]
