"""The triton backend's GEMM path: library GEMMs (torch.mm: cuBLAS on CUDA, the CPU BLAS under the
interpreter) per chunk of classes, with Triton row kernels (row_kernels.py) between them, behind the same
op boundary and per-row statistics as the fused kernels (loss_forward.py, loss_backward.py).

  forward   x_hat = x / max(|x|, eps) in the products' dtype (one launch). Per chunk of n classes (n K rows
            of W): W_hat_c, the chunk's rows normalized and cast (one launch into a chunk-sized buffer; none
            when W is used as stored), S_c = x_hat W_hat_c^T into the chunk buffer (one GEMM), then
            _chunk_stats_kernel: the non-target logits' running (max, sum of exp, PC, SC) per row and column
            split, merged online over the chunks (S x B x 4 floats in all, whatever C is). A chunk's S_c is
            written straight into aux (kept) while max_logits_bytes allows, else into the one reused chunk
            buffer (dropped). Then _fwd_combine_kernel (the fused forward's): the target column in fp64, its
            margin, loss, lse and the per-row statistics in aux. Launches: 2 + 3 per chunk (2 when W needs
            neither normalizing nor a cast; + 1, the bias sum, with bias and smoothing).
  backward  _bwd_rows_kernel (the fused backward's, without its dX): the per-row values and d alpha. Then,
            when dX, dW or db is asked for, per chunk: W_hat_c (1 launch), S_c from aux (kept) or the same
            GEMM again (1), _chunk_dz_kernel: dloss/dc in place, or beside a kept chunk (it never writes
            into aux: a second backward reads the same), and db (1); dX_hat += G_c W_hat_c (1 GEMM, + 1 add
            for bf16 operands), dW_hat_c = G_c^T x_hat (1 GEMM) written into dW's rows, W's normalization
            backward in place (1, when normalizing or casting). Then x's normalization backward (1).
            Launches: 4 (the rows kernel, x_hat, dX_hat's zeros, x's normalization backward; + 1, d alpha's
            sum) + 6 per kept chunk, 7 per dropped one (bf16, normalize_weight). A training step: 6 + 9 per
            kept chunk, 10 per dropped one. The GEMMs per step: 3 per chunk kept (the 3-GEMM floor's
            6 B C D flops), 4 per chunk dropped (8 B C D).
No host synchronization: every size is a function of the shapes and of max_logits_bytes (Python ints), no
value is read back; CUDA-graph capture of a training step is tested where CUDA exists
(tests/test_triton_gemm_path.py) and unmeasured here.

Precision: the products' operands are bf16 when x and W are both bf16 (the chunk buffer, the kept logits and
dloss/dc in bf16, as eager bf16 torch rounds its logits and their gradient), else fp32 (fp16, mixed and fp32
inputs: tf32 or IEEE per torch's float32 matmul precision, as torch.mm). dX_hat accumulates over the chunks in
fp32 (bf16 operands: torch.mm(..., out_dtype=float32), cuBLAS's fp32 output, where torch has it); dW_hat is
rounded once, into dW's dtype when that is the operands' (else through an fp32 chunk). Norms in fp64, the
target column in fp64 (the combine), every per-row quantity as in the fused path. Under the interpreter, bf16
products are computed in fp32 from the bf16 operands (exact products, fp32 accumulation, as cuBLAS) and
rounded once to bf16 where cuBLAS writes bf16.

Memory beyond inputs, outputs and O(B + C + D) vectors: the kept logits (at most max_logits_bytes, in aux
until the backward), one chunk buffer (B x n K) of the operand dtype per pass (the forward's only when a
chunk is dropped; the backward's holds dloss/dc, beside a kept chunk or in place of a recomputed one),
W_hat_c (n K x D, when W needs normalizing or a cast), x_hat (B x D), the (S, B, 4) partials, dX_hat and one
chunk's fp32 dX_hat term (B x D fp32 each), and for dW in another dtype than the operands' an fp32
(n K x D) chunk. At B = 1024, D = 512, bf16 and 64 MiB chunks: about 100 MiB besides the kept logits.
"""
from __future__ import annotations

import torch
import triton

from .aux_layout import NPART, NSTAT
from .common import _identity
from .config import Config, gemm_chunk_classes, gemm_splits, num_sms
from .loss_backward import row_values
from .loss_forward import combine
from .margin import NEGATIVES_CODES, negative_rows
from .row_kernels import chunk_dz, chunk_stats, normalize_backward, normalize_rows

# aten::mm.dtype (bf16 / fp16 operands, fp32 output: cuBLAS's fp32 epilogue) where this torch has it (CUDA);
# whether it runs is probed once per device type on 1 x 1 operands (a dispatch error, no synchronization)
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")
_MM_OUT_DTYPE_RUNS: dict = {}


def _mm_out_dtype_runs(a: torch.Tensor) -> bool:
    key = (a.device.type, a.dtype)
    if key not in _MM_OUT_DTYPE_RUNS:
        ok = _MM_OUT_DTYPE
        if ok:
            try:
                one = torch.ones((1, 1), device=a.device, dtype=a.dtype)
                torch.mm(one, one, out_dtype=torch.float32)
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _MM_OUT_DTYPE_RUNS[key] = ok
    return _MM_OUT_DTYPE_RUNS[key]


# max_logits_bytes=None on the GEMM path: keep at most as many bytes of logits as W's gradient takes (C K x D x
# W's element size), so that the step's peak stays about twice the gradients plus the chunk workspace. With
# bf16 x and W that keeps every chunk (3 GEMMs) while B <= D (B <= 512 at D = 512), half of them at B = 1024,
# D = 512 (3.5 GEMM-equivalents). Chosen without a GPU measurement (none has run this path): the GPU benchmark
# times 0, a quarter of B x C and all (benchmarks/gpu_run.sh). Tests and the benchmark may set an int here
# (the budget calls with max_logits_bytes=None get).
DEFAULT_MAX_LOGITS_BYTES = None


def default_budget(weight) -> int:
    """The bytes of logits kept when max_logits_bytes is None: DEFAULT_MAX_LOGITS_BYTES, else W's gradient's size."""
    if DEFAULT_MAX_LOGITS_BYTES is not None:
        return DEFAULT_MAX_LOGITS_BYTES
    return weight.shape[0] * weight.shape[1] * weight.element_size()


def operand_dtype(xdt: torch.dtype, wdt: torch.dtype) -> torch.dtype:
    """The products' operand dtype (and the chunk buffer's): bf16 when x and W are both bf16, else fp32."""
    return torch.bfloat16 if xdt == wdt == torch.bfloat16 else torch.float32


def _region(B: int, n: int, K: int, esize: int) -> int:
    """fp32 elements of aux that hold one kept chunk's (B, n K) cosines (rounded up to 8)."""
    return 8 * triton.cdiv(triton.cdiv(B * n * K * esize, 4), 8)


def chunk_plan(cfg: Config, B: int, C: int, K: int, cdt: torch.dtype):
    """-> (classes per chunk, [(first class, classes)] per chunk, [aux elements of each chunk when kept])."""
    es = cdt.itemsize
    n = gemm_chunk_classes(cfg, B, C, K, es)
    bounds = [(c0, min(n, C - c0)) for c0 in range(0, C, n)]
    return n, bounds, [_region(B, m, K, es) for _, m in bounds]


def kept_chunks(bounds, B: int, K: int, cdt: torch.dtype, budget: int, needs_pass2: bool) -> int:
    """How many chunks, from the first, the forward keeps: as many whole chunks as fit in the budget (their
    logits' bytes, B x n K x element size each); none when no backward pass over the classes will read them
    (only d alpha, or no gradient at all)."""
    if not needs_pass2:
        return 0
    es = cdt.itemsize
    kept, used = 0, 0
    for _, m in bounds:
        used += B * m * K * es
        if used > budget:
            break
        kept += 1
    return kept


def _budget(max_logits_bytes, weight) -> int:
    return default_budget(weight) if max_logits_bytes is None else max_logits_bytes


def stats_numel(B: int) -> int:
    return 8 * triton.cdiv(B * NSTAT, 8)


def aux_numel(x, weight, subcenters, need_x, need_weight, need_bias, cfg: Config, max_logits_bytes) -> int:
    """The numel of the GEMM path's aux: the per-row statistics (B x NSTAT, as the fused path's) and the kept
    chunks' cosines (aux_meta of the op, and the forward)."""
    B = x.shape[0]
    C = weight.shape[0] // subcenters
    cdt = operand_dtype(x.dtype, weight.dtype)
    _, bounds, regions = chunk_plan(cfg, B, C, subcenters, cdt)
    kept = kept_chunks(bounds, B, subcenters, cdt, _budget(max_logits_bytes, weight),
                       need_x or need_weight or need_bias)
    return stats_numel(B) + sum(regions[:kept])


def _kept_from_aux(aux: torch.Tensor, B: int, regions) -> int:
    extra = aux.numel() - stats_numel(B)
    total = 0
    for i in range(len(regions) + 1):
        if extra == total:
            return i
        if i < len(regions):
            total += regions[i]
    raise ValueError(f"aux of {aux.numel()} elements was not produced by the triton backend's GEMM path for B={B} "
                     "with this chunk plan (was the path or its configuration changed between forward and backward?)")


def _chunk_view(aux: torch.Tensor, off: int, B: int, cols: int, cdt: torch.dtype) -> torch.Tensor:
    """The (B, cols) cosines of a kept chunk, stored in aux's fp32 elements from off on, as cdt."""
    flat = aux[off:].view(cdt) if cdt != torch.float32 else aux[off:]
    return flat[:B * cols].view(B, cols)


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b in the operands' dtype (cuBLAS, or the CPU BLAS). Under the interpreter (CPU tensors),
    bf16 operands are multiplied in fp32, exactly as cuBLAS's fp32 accumulation of exact bf16 products, then
    rounded once into out (the CPU's own bf16 GEMM would be slow and round differently)."""
    if a.dtype == torch.bfloat16 and a.device.type == "cpu":
        out.copy_(torch.mm(a.float(), b.float()))
    else:
        torch.mm(a, b, out=out)


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result (bf16 operands: cuBLAS's fp32 output where torch has mm's out_dtype)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.device.type == "cpu":
        return torch.mm(a.float(), b.float())
    if _mm_out_dtype_runs(a):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).float()  # pragma: no cover - torch without mm's out_dtype: rounded per chunk


def _chunk_weights(w_c, buf, cdt, normalize_weight, eps, launch):
    """W_hat_c, the chunk's rows of W normalized (normalize_weight) and in the operand dtype: W's rows as
    stored when they need neither (no copy), else written into the chunk-sized buffer."""
    if not normalize_weight and w_c.dtype == cdt:
        return w_c
    out = buf[:w_c.shape[0]]
    return normalize_rows(w_c, out, eps, normalize_weight, launch)


def _negatives(x, weight, target, margins, negatives_table, normalize_weight, margin_kind, margin_detached, K,
               ignore_index, eps, negatives):
    """(code, (B, 2) fp32 [threshold, t] rows or None) of the non-target transform for the row kernels: the
    fused kernels' rows (margin.negative_rows: the row's margined target cosine from one fp64 dot where the
    table's threshold is NaN)."""
    neg = NEGATIVES_CODES[negatives]
    if not neg:
        return 0, None
    return neg, negative_rows(x, weight, target, margins, negatives_table, normalize_weight, margin_kind,
                              margin_detached, K, ignore_index, eps)


def forward(x, weight, target, alpha, bias, margins, label_smoothing, negatives_table, normalize_weight, margin_kind,
            margin_detached, subcenters, ignore_index, eps, negatives, max_logits_bytes, need_x, need_weight,
            need_bias, need_alpha, *, launch=_identity, config: Config):
    """-> (loss (B,), lse (B,), aux) fp32 (contract.py's argument order), aux = [statistics | kept chunks]
    (max_logits_bytes: checked by options.check_max_logits_bytes before the op)."""
    B, D = x.shape
    K = subcenters
    C = weight.shape[0] // K
    dev = x.device
    cdt = operand_dtype(x.dtype, weight.dtype)
    n, bounds, regions = chunk_plan(config, B, C, K, cdt)
    kept = kept_chunks(bounds, B, K, cdt, _budget(max_logits_bytes, weight), need_x or need_weight or need_bias)
    base = stats_numel(B)
    loss = torch.empty((B,), device=dev, dtype=torch.float32)
    lse = torch.empty((B,), device=dev, dtype=torch.float32)
    aux = torch.empty((base + sum(regions[:kept]),), device=dev, dtype=torch.float32)
    if B == 0:
        return loss, lse, aux

    neg, neg_rows = _negatives(x, weight, target, margins, negatives_table, normalize_weight, margin_kind,
                               margin_detached, K, ignore_index, eps, negatives)
    x_hat = normalize_rows(x, torch.empty((B, D), device=dev, dtype=cdt), eps, True, launch)
    ws = torch.empty((gemm_splits(B, config, num_sms(dev)), B, NPART), device=dev, dtype=torch.float32)
    scratch = torch.empty((B * n * K,), device=dev, dtype=cdt) if kept < len(bounds) else None
    w_buf = torch.empty((n * K, D), device=dev, dtype=cdt)
    off = base
    for i, (c0, m) in enumerate(bounds):
        w_hat = _chunk_weights(weight[c0 * K:(c0 + m) * K], w_buf, cdt, normalize_weight, eps, launch)
        if i < kept:
            s = _chunk_view(aux, off, B, m * K, cdt)
            off += regions[i]
        else:
            s = scratch[:B * m * K].view(B, m * K)
        _mm_into(s, x_hat, w_hat.T)
        chunk_stats(s, bias, alpha, target, ws, C=C, c0=c0, n_cols=m, ignore_index=ignore_index, subcenters=K,
                    first=i == 0, block_rows=config.block_rows, block_cols=config.block_cols,
                    num_warps=config.num_warps, launch=launch, neg_rows=neg_rows, neg=neg)
    combine(ws, ws.shape[0], x, weight, target, alpha, bias, margins, label_smoothing, normalize_weight, margin_kind,
            margin_detached, K, ignore_index, eps, loss, lse, aux, False, True, 0, ws, launch)
    return loss, lse, aux


def backward(grad_loss, grad_lse, x, weight, target, alpha, bias, margins, label_smoothing, negatives_table, lse, aux,
             normalize_weight, margin_kind, margin_detached, subcenters, ignore_index, eps, negatives, max_logits_bytes,
             need_x, need_weight, need_bias, need_alpha, *, launch=_identity, config: Config):
    """-> (dx, dW, db, dalpha), each in its input's dtype; empty tensors for what is not needed. What the
    forward kept is read from aux's size (max_logits_bytes is not needed here)."""
    B, D = x.shape
    K = subcenters
    C = weight.shape[0] // K
    dev = x.device
    need_bias = need_bias and bias is not None
    bdt = bias.dtype if bias is not None else x.dtype
    dx = torch.empty((B, D) if need_x else (0,), device=dev, dtype=x.dtype)
    dw = torch.empty(tuple(weight.shape) if need_weight else (0,), device=dev, dtype=weight.dtype)
    db = torch.empty((C,) if need_bias else (0,), device=dev, dtype=bdt)
    if B == 0 or not (need_x or need_weight or need_bias or need_alpha):
        if need_weight:
            dw.zero_()
        if need_bias:
            db.zero_()
        dalpha = torch.zeros((), device=dev, dtype=alpha.dtype) if need_alpha else alpha.new_empty((0,))
        return dx, dw, db, dalpha

    cdt = operand_dtype(x.dtype, weight.dtype)
    n, bounds, regions = chunk_plan(config, B, C, K, cdt)
    kept = _kept_from_aux(aux, B, regions)
    rowv, da = row_values(grad_loss, grad_lse, x, weight, target, alpha, margins, label_smoothing, aux,
                          normalize_weight, margin_kind, margin_detached, K, ignore_index, eps, False, need_alpha,
                          dx, aux, 0, launch)
    if need_x or need_weight or need_bias:
        neg, neg_rows = _negatives(x, weight, target, margins, negatives_table, normalize_weight, margin_kind,
                                   margin_detached, K, ignore_index, eps, negatives)
        x_hat = normalize_rows(x, torch.empty((B, D), device=dev, dtype=cdt), eps, True, launch)
        dxh = torch.zeros((B, D), device=dev, dtype=torch.float32) if need_x else None
        g_buf = torch.empty((B * n * K,), device=dev, dtype=cdt)
        w_buf = torch.empty((n * K, D), device=dev, dtype=cdt)
        dwh_buf = (torch.empty((n * K, D), device=dev, dtype=torch.float32)
                   if need_weight and cdt != weight.dtype else None)
        off = stats_numel(B)
        for i, (c0, m) in enumerate(bounds):
            rows = slice(c0 * K, (c0 + m) * K)
            w_c = weight[rows]
            w_hat = _chunk_weights(w_c, w_buf, cdt, normalize_weight, eps, launch)
            g = g_buf[:B * m * K].view(B, m * K)
            if i < kept:
                s = _chunk_view(aux, off, B, m * K, cdt)
                off += regions[i]
            else:
                _mm_into(g, x_hat, w_hat.T)  # recomputed: the forward's GEMM again, dz then written in place
                s = g
            chunk_dz(s, g, bias, alpha, target, rowv, db if need_bias else None, C=C, c0=c0, n_cols=m,
                     ignore_index=ignore_index, subcenters=K, block_rows=config.block_rows,
                     block_cols=config.block_cols, num_warps=config.num_warps, launch=launch, neg_rows=neg_rows,
                     neg=neg)
            if need_x:  # dX_hat += G_c W_hat_c, accumulated in fp32
                if cdt == torch.float32:
                    dxh.addmm_(g, w_hat)
                else:
                    dxh.add_(_mm_f32(g, w_hat))
            if need_weight:  # dW_hat_c = G_c^T x_hat, then W's normalization backward (or the cast) per row
                if dwh_buf is None:
                    dst = dw[rows]
                    _mm_into(dst, g.T, x_hat)
                    if normalize_weight:
                        normalize_backward(w_c, dst, dst, eps, True, launch)
                else:
                    dwh = dwh_buf[:m * K]
                    dwh.copy_(_mm_f32(g.T, x_hat))
                    normalize_backward(w_c, dwh, dw[rows], eps, normalize_weight, launch)
        if need_x:
            normalize_backward(x, dxh, dx, eps, True, launch)
    dalpha = da.sum().to(alpha.dtype) if need_alpha else alpha.new_empty((0,))
    return dx, dw, db, dalpha
