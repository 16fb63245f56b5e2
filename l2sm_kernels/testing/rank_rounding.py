"""The accuracy relation for the class-parallel loss's feature gradient in fp16 / bf16, shared by
tests/test_distributed.py and benchmarks/gpu_distributed_check.py."""
from __future__ import annotations

import torch

from ..reference import l2_softmax_logits_ref
from .accuracy import ATOL_REL, max_err

# unit roundoff (half an ulp, relative) of the half-precision feature dtypes
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def rank_sum_rounding(x, weight, target, alpha, bias, grad_output, shards, rows, kwargs) -> float:
    """u * sum_r max |dX_r| over the feature rows `rows` = (start, end) of the global batch.

    The op boundary returns each rank's contribution dX_r (B_g x D) in the features' dtype, i.e.
    rounded once (relative error <= u) before distributed.py sums the ranks' contributions in fp32
    and rounds once more (as the single-process op does). dX_r is the float64 reference's gradient,
    through the logits of shard r (shards: the ranks' class counts, in order), of what the op
    differentiates there: lse_i - (1 - s) z_iy (the label-smoothing term is computed in fp32)."""
    u = UNIT_ROUNDOFF[x.dtype]
    ignore_index = kwargs.get("ignore_index", -100)
    x64 = x.detach().double().requires_grad_(True)
    a = alpha.detach().double() if isinstance(alpha, torch.Tensor) else alpha
    z = l2_softmax_logits_ref(x64, weight.detach().double(), target, a,
                              bias.detach().double() if bias is not None else None,
                              normalize_weight=kwargs.get("normalize_weight", False), margin=kwargs.get("margin", 0.0),
                              margin_type=kwargs.get("margin_type", "none"), ignore_index=ignore_index)
    valid = target != ignore_index
    col = torch.where(valid, target, torch.zeros_like(target))
    s = kwargs.get("label_smoothing", 0.0)
    reduction = kwargs.get("reduction", "mean")
    total, c0 = 0.0, 0
    for n in shards:
        mask = torch.zeros(z.shape[1], dtype=torch.bool, device=z.device)
        mask[c0:c0 + n] = True
        c0 += n
        zr = torch.where(mask, z, z.detach())
        per_row = torch.logsumexp(zr, dim=1) - (1 - s) * zr.gather(1, col[:, None]).squeeze(1)
        per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
        if reduction == "mean":
            out = per_row.sum() / valid.sum()
        elif reduction == "sum":
            out = per_row.sum()
        else:
            out = per_row
        (g,) = torch.autograd.grad(out, x64, grad_output.to(out), retain_graph=True)
        if rows[1] > rows[0]:
            total += float(g[rows[0]:rows[1]].abs().max())
    return u * total


def assert_accurate_rank_sum(name, got, want, plain, x, weight, target, alpha, bias, grad_output, shards, rows,
                             kwargs, roundings: int = 1) -> None:
    """STYLE's relation for the feature gradient of fp16 / bf16 features of the class-parallel loss:
    err(got) <= 2 err(plain) + atol + rank_sum_rounding(...), errors against the float64 reference
    `want`; plain: the single-process op's gradient. The added term is exactly the rounding the op
    boundary puts on each rank's contribution, nothing more. roundings: how many times that term
    (grad_reduce_dtype="features": the partial sums over the ranks are rounded to the features' dtype too,
    at most world roundings more of at most the sum of the contributions' magnitudes)."""
    finite = want[torch.isfinite(want)]
    atol = ATOL_REL[got.dtype] * max(float(finite.abs().max()) if finite.numel() else 1.0, 1e-30)
    extra = roundings * rank_sum_rounding(x, weight, target, alpha, bias, grad_output, shards, rows, kwargs)
    err, base = max_err(got, want), max_err(plain, want)
    assert err <= 2 * base + atol + extra, (
        f"{name}: error {err:.3e} against the float64 reference exceeds 2 x the single-process op's {base:.3e} "
        f"+ atol {atol:.3e} + the rounding of the ranks' contributions {extra:.3e} ({got.dtype})"
    )
