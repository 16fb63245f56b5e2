"""Backend "triton": the fused GPU kernels (loss_forward.py, loss_backward.py) behind the op boundary.

l2sm::triton_forward / l2sm::triton_backward are torch.library.triton_op ops: torch.compile sees the
Triton kernels inside them (wrap_triton), so a compiled training step traces through the loss with
no graph break; contract.register_backend_ops attaches the shared fake kernels and the autograd formula.
The backend loads wherever triton imports; registry.py decides which tensors it may take (CUDA
tensors, or CPU tensors under the Triton interpreter, TRITON_INTERPRET=1, which is how CI runs it).

Inputs: float16, bfloat16, float32 (x, W and b may differ, e.g. bf16 features with fp32 master
weights, read as stored: no cast copy of W). Outputs as contract.py says: loss, lse, aux in fp32,
each gradient in its input's dtype, no host synchronization, nothing written into the inputs,
bitwise deterministic (no atomics; every reduction has a fixed order).
"""
from typing import Optional, Tuple

import torch

from .. import contract
from ..registry import BackendUnavailable

DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_LOADED = None


def _check(x, weight, bias, interpreted: bool) -> None:
    for name, t in (("features", x), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype not in DTYPES:
            raise TypeError(f"the triton backend takes float16, bfloat16 or float32 {name}, got {t.dtype}")
        if t.device.type != "cuda" and not (interpreted and t.device.type == "cpu"):
            raise ValueError(
                f"the triton backend takes CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), "
                f"got {name} on {t.device}"
            )


def triton_library():
    """(torch.library.triton_op, wrap_triton), or BackendUnavailable when triton does not import (both
    of the backend's registrations start here: this op and topk_op.py)."""
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise BackendUnavailable(f"triton is not importable ({e})") from e
    from torch.library import triton_op, wrap_triton

    return triton_op, wrap_triton


def load():
    """Define and register the triton ops; -> (forward op, backward op)."""
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    triton_op, wrap_triton = triton_library()

    from .common import INTERPRETED
    from .aux_layout import aux_meta as fused_aux_meta
    from .config import forward_config, on_gpu
    from .gemm_path import aux_numel as gemm_aux_numel
    from .loss_backward import backward
    from .loss_forward import forward
    from .margin import check_margin_inputs, check_negatives_inputs

    def aux_meta(x, weight, target, alpha, bias, margins, label_smoothing, negatives_table, normalize_weight,
                 margin_kind, margin_detached, subcenters, ignore_index, eps, negatives, max_logits_bytes, need_x,
                 need_weight, need_bias, need_alpha):
        """The fake kernel's aux: the fused forward's layout, or the GEMM path's (the path the forward takes)."""
        D = x.shape[1]
        cfg = forward_config(D, x.dtype, weight.dtype, need_x, on_gpu(x.device), C=weight.shape[0] // subcenters,
                             subcenters=subcenters)
        if cfg.gemm:
            numel = gemm_aux_numel(x, weight, subcenters, need_x, need_weight, need_bias, cfg, max_logits_bytes)
            return x.new_empty((numel,), dtype=torch.float32)
        return fused_aux_meta(x, weight, target, alpha, bias, margins, label_smoothing, negatives_table,
                              normalize_weight, margin_kind, margin_detached, subcenters, ignore_index, eps, negatives,
                              max_logits_bytes, need_x, need_weight, need_bias, need_alpha)

    def triton_forward(
        x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, alpha: torch.Tensor,
        bias: Optional[torch.Tensor], margins: Optional[torch.Tensor], label_smoothing: Optional[torch.Tensor],
        negatives_table: Optional[torch.Tensor], normalize_weight: bool, margin_kind: str, margin_detached: bool,
        subcenters: int, ignore_index: int, eps: float, negatives: str, max_logits_bytes: Optional[int],
        need_x: bool, need_weight: bool, need_bias: bool, need_alpha: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _check(x, weight, bias, INTERPRETED)
        check_margin_inputs(x, margins, label_smoothing, margin_kind)
        check_negatives_inputs(x, negatives_table, negatives)
        return forward(x, weight, target, alpha, bias, margins, label_smoothing, negatives_table, normalize_weight,
                       margin_kind, margin_detached, subcenters, ignore_index, eps, negatives, max_logits_bytes,
                       need_x, need_weight, need_bias, need_alpha, launch=wrap_triton)

    def triton_backward(
        grad_loss: torch.Tensor, grad_lse: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
        target: torch.Tensor, alpha: torch.Tensor, bias: Optional[torch.Tensor], margins: Optional[torch.Tensor],
        label_smoothing: Optional[torch.Tensor], negatives_table: Optional[torch.Tensor], lse: torch.Tensor,
        aux: torch.Tensor, normalize_weight: bool, margin_kind: str, margin_detached: bool, subcenters: int,
        ignore_index: int, eps: float, negatives: str, max_logits_bytes: Optional[int], need_x: bool,
        need_weight: bool, need_bias: bool, need_alpha: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        _check(x, weight, bias, INTERPRETED)
        check_margin_inputs(x, margins, label_smoothing, margin_kind)
        check_negatives_inputs(x, negatives_table, negatives)
        return backward(grad_loss, grad_lse, x, weight, target, alpha, bias, margins, label_smoothing, negatives_table,
                        lse, aux, normalize_weight, margin_kind, margin_detached, subcenters, ignore_index, eps,
                        negatives, max_logits_bytes, need_x, need_weight, need_bias, need_alpha, launch=wrap_triton)

    # triton_op infers the schema from the annotations (torch 2.11 - 2.13 accept schema= and ignore
    # it); check that the inference gives the shared one, so the two cannot drift apart silently.
    # The one difference inference cannot avoid: a Python int becomes SymInt (subcenters, ignore_index).
    fwd = triton_op(contract.forward_name("triton"), triton_forward, mutates_args=(), schema=contract.FORWARD_SCHEMA)
    bwd = triton_op(contract.backward_name("triton"), triton_backward, mutates_args=(), schema=contract.BACKWARD_SCHEMA)
    for op, name, schema in ((fwd, contract.forward_name("triton"), contract.FORWARD_SCHEMA),
                             (bwd, contract.backward_name("triton"), contract.BACKWARD_SCHEMA)):
        got = str(op._opoverload._schema).replace("SymInt ", "int ").replace("SymInt? ", "int? ")
        want = str(torch._C.parse_schema(name + schema))
        if got != want:
            raise RuntimeError(f"triton op schema drifted from contract.py: {got} != {want}")
    contract.register_backend_ops("triton", fwd, bwd, aux_meta=aux_meta)
    _LOADED = (fwd, bwd)
    return _LOADED

