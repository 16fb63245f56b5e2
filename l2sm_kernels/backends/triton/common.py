"""Device helpers shared by the triton kernels: matrix-product operands and precision, the
interpreter's bf16 emulation, the scratch round trip that breaks Triton's chained-product layout,
an L1 prefetch, 64-bit D indices and log1p; and the launchers' shared host helpers."""
from __future__ import annotations

import os

import triton
import triton.language as tl

# @triton.jit returns interpreted functions when TRITON_INTERPRET=1 was set before triton was imported
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# log2(e) and ln(2) for the kernels' exp2 (logits in log2 units); an fp64 operand takes them exactly
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _rne_bf16(v):
    """Round fp32 to the nearest bf16 (ties to even), kept in fp32. Only used under the Triton
    interpreter, whose fp32 -> bf16 cast truncates (the GPU's rounds to nearest)."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _operand(a, DT: tl.constexpr, EMU: tl.constexpr):
    """a as a matrix-product operand of dtype DT (0 fp32, 1 fp16, 2 bf16). EMU (interpreter only):
    the interpreter's bf16 dot multiplies raw bits, so bf16 operands are rounded exactly as the GPU
    would and handed to an fp32 dot, which gives the GPU's result (products of bf16 are exact in fp32)."""
    if DT == 2:
        if EMU:
            if a.dtype == tl.bfloat16:
                r = a.to(tl.float32)
            else:
                r = _rne_bf16(a.to(tl.float32))
        else:
            r = a.to(tl.bfloat16)
    elif DT == 1:
        r = a.to(tl.float16)
    else:
        r = a.to(tl.float32)
    return r


@triton.jit
def _mma(a, b, acc, DT: tl.constexpr, TF32: tl.constexpr, EMU: tl.constexpr):
    """acc + a @ b with fp32 accumulation, operands of dtype DT; fp32 operands in tf32 or IEEE."""
    a = _operand(a, DT, EMU)
    b = _operand(b, DT, EMU)
    if DT == 0:
        if TF32:
            r = tl.dot(a, b, acc, input_precision="tf32")
        else:
            r = tl.dot(a, b, acc, input_precision="ieee")
    else:
        r = tl.dot(a, b, acc)
    return r


@triton.jit
def _out(v, ptr, EMU: tl.constexpr):
    """v (fp32) ready to store through ptr: under the interpreter, bf16 outputs are rounded to nearest
    here (its own cast truncates)."""
    if EMU:
        if ptr.dtype.element_ty == tl.bfloat16:
            v = _rne_bf16(v)
    return v


@triton.jit
def _through_scratch(v, u, v_base, u_base, R: tl.constexpr, K: tl.constexpr):
    """v (R x K) and u (R,) written to a program-private scratch slot and read back after a barrier:
    the same values, but Triton no longer sees them flow from one matrix product into the next.
    Triton lays out a product whose result feeds another product (S -> p -> O here) with every warp
    along M; with 64 rows and 8 warps both warpgroups then compute all of S (seen in the compiled
    code: twice the HGMMA instructions). Through memory, S gets warps along N: each warpgroup computes
    half. Callers alternate two slots by iteration parity, so one barrier per iteration suffices: a
    thread writes slot k+2 only after passing the barrier of iteration k+1, which every thread
    reaches only after reading slot k."""
    off = tl.arange(0, R)[:, None] * K + tl.arange(0, K)[None, :]
    tl.store(v_base + off, v)
    tl.store(u_base + tl.arange(0, R), u)
    tl.debug_barrier()
    return tl.load(v_base + off), tl.load(u_base + tl.arange(0, R))


@triton.jit
def _through_scratch2d(v, v_base, R: tl.constexpr, K: tl.constexpr):
    """_through_scratch for a matrix alone."""
    off = tl.arange(0, R)[:, None] * K + tl.arange(0, K)[None, :]
    tl.store(v_base + off, v)
    tl.debug_barrier()
    return tl.load(v_base + off)


@triton.jit
def _prefetch_l1(base, rows, stride_row, D, BLOCK_D: tl.constexpr):
    """Hint the L1 cache to fetch the rows (clamped to valid ones by the caller) of a (rows x D) tile:
    one prefetch per 128-byte line of bf16 (64 elements), a couple per thread. The default tiles'
    scratch barrier stops Triton's software pipelining, so without this each tile's load waits on L2.
    Assumes rows of 2-byte elements with a unit D stride: the launchers enable it only then (_prefetch_ok).
    GPU only (the interpreter has no inline assembly)."""
    ptrs = base + rows[:, None] * stride_row + (tl.arange(0, BLOCK_D // 64) * 64)[None, :]
    ptrs = tl.where((tl.arange(0, BLOCK_D // 64) * 64 < D)[None, :], ptrs, base + rows[:, None] * stride_row)
    tl.inline_asm_elementwise("prefetch.global.L1 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _didx(i, D64: tl.constexpr):
    """A D-axis index ready to multiply a runtime D stride: int64 when D64 (the launchers set it when
    stride x (D - 1) reaches 2^31 elements, e.g. W stored (D, C) and passed as .T: Triton gives a stride
    below 2^31 an i32, so the product would wrap); contiguous rows keep 32-bit offsets."""
    if D64:
        i = i.to(tl.int64)
    return i


@triton.jit
def _subcenter_max(best, win, c, k):
    """One step of the maximum over a class's sub-centers (k = 1, 2, ... after best = c_0, win = 0):
    c_k replaces the best where it is larger (strictly: a tie keeps the lower k, as torch.max) or NaN
    (where the best is not yet: torch.max propagates the first NaN); win records k there."""
    upd = (c > best) | ((c != c) & (best == best))  # noqa: PLR0124 (x != x: x is NaN)
    return tl.where(upd, c, best), tl.where(upd, k, win)


@triton.jit
def _log1p(v):
    """log(1 + v) for v in [0, 1], accurate for small v (Goldberg's trick: no libdevice needed, and
    it runs under the interpreter)."""
    w = 1.0 + v
    return tl.where(w == 1.0, v, tl.log(w) * tl.div_rn(v, tl.where(w == 1.0, 1.0, w - 1.0)))


def _identity(kernel):
    """launch= default of the launchers: run the kernel as it is (the op wraps it in wrap_triton)."""
    return kernel


def wide_d(D: int, *tensors) -> bool:
    """Whether a D-axis offset (index x D stride) of one of these (N, D) tensors can reach 2^31
    elements: the kernels' D64 (see _didx)."""
    return any(t is not None and t.stride(1) * (D - 1) >= 2**31 for t in tensors)
