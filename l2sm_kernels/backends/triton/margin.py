"""The target column's margin and the target rules, as the kernels compute them (device functions),
and the host-side arguments the launchers pass for them."""
from __future__ import annotations

import math

import triton
import triton.language as tl

from ...options import ARCFACE_CLAMP

MARGIN_CODES = {"none": 0, "cosface": 1, "arcface": 2}
# _margin writes the arcface clamp as the literal 1e-7 (a constexpr global would also do; a literal reads better)
assert ARCFACE_CLAMP == 1e-7, "update the literal in _margin"


@triton.jit
def _margin(c, MARGIN: tl.constexpr, m, cos_m, sin_m, th, mm):
    """f(c) and f'(c) of the target column (eager.margin_value_and_slope). arcface: cos(theta + m)
    = c~ cos m - sin(theta) sin m with c~ = clamp(c, -1 + 1e-7, 1 - 1e-7), sin(theta) = sqrt(1 - c~^2),
    derivative cos m + c~ sin m / sin(theta) at the clamped point; past c <= cos(pi - m) = th the
    monotonic fallback c - m sin m (mm) with slope 1."""
    one = tl.full(c.shape, 1.0, tl.float32)
    if MARGIN == 0:
        f = c
        fp = one
    elif MARGIN == 1:
        f = c - m
        fp = one
    else:
        cc = tl.minimum(tl.maximum(c, -1.0 + 1e-7), 1.0 - 1e-7)
        sin_t = tl.sqrt_rn(1.0 - cc * cc)
        phi = cc * cos_m - sin_t * sin_m
        dphi = cos_m + tl.div_rn(cc * sin_m, sin_t)
        hard = c > th
        f = tl.where(hard, phi, c - mm)
        fp = tl.where(hard, dphi, one)
    return f, fp


@triton.jit
def _target_info(t, ignore_index, C):
    """valid (not ignored), has a target column (valid and in range), bad (valid, out of range)."""
    valid = t != ignore_index
    in_range = (t >= 0) & (t < C)
    return valid, valid & in_range, valid & (~in_range)


def margin_kwargs(margin_type: str, margin: float) -> dict:
    """The margin's launch arguments of the per-row kernels: MARGIN (code), m, cos m, sin m,
    th = cos(pi - m) (the arcface switch point) and mm = m sin m (its fallback's offset)."""
    m = float(margin)
    return dict(MARGIN=MARGIN_CODES[margin_type], margin=m, cos_m=math.cos(m), sin_m=math.sin(m),
                th=math.cos(math.pi - m), mm=m * math.sin(m))
