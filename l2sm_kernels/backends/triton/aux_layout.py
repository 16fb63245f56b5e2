"""What the triton forward saves for its backward (aux) and the per-row buffers the kernels share:
the column layout of the per-row statistics, of the forward's split partials and of the backward's
per-row values, as Python ints (launchers) and constexprs (kernels)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# per-row statistics in aux (columns of the (B, NSTAT) block): c_iy, p_iy, q_i = 1 - p_iy, PC_i, SC_i,
# the target class's winning sub-center k (a small integer held exactly as fp32; 0 when K = 1), and
# log2(e) lse_i (the dW pass's exp2, rounded once from the combine's fp64 lse)
NSTAT = 7
# per-split partials of the forward workspace: running max, sum of exp, PC, SC, then O' (D)
NPART = 4
# per-row values the backward's dW kernel reads (columns of a (B, NROWV) buffer):
# 1/|x_i|, w_p, w_t s / C, dz_iy, dloss/dc_iy, the target's winning sub-center, and for its exp2 (logits in
# log2 units) alpha log2(e) / |x_i| rounded once from fp64 and log2(e) lse_i (aux's)
NROWV = 8
# the same, as the kernels see them (triton kernels may read only constexpr globals)
_NSTAT = tl.constexpr(NSTAT)
_NPART = tl.constexpr(NPART)
_NROWV = tl.constexpr(NROWV)
ST_CY, ST_PY, ST_Q, ST_PC, ST_SC, ST_WIN, ST_LSE2 = (tl.constexpr(i) for i in range(NSTAT))
RV_INVNX, RV_WP, RV_WTS, RV_DZY, RV_DCY, RV_WIN, RV_RS, RV_LSE2 = (tl.constexpr(i) for i in range(NROWV))

# aux flag bits (aux.numel() % 8, see aux_layout)
AUX_O, AUX_PC, AUX_WSUM = 1, 2, 4


def wsum_numel(B: int, D: int, subcenters: int) -> int:
    """Label smoothing's dX term: sum_j W_hat_j, one (D,) column sum for K = 1; with sub-centers the
    sum runs over each row's winners, sum_{j != y_i} W_hat_{j, win(i, j)}, one (D,) vector per row."""
    return D if subcenters == 1 else B * D


def layout_k(subcenters: int, negatives: str) -> int:
    """The K that aux's layout is keyed on (wsum_numel: D for 1, B x D above). A non-target transform
    makes label smoothing's dX term per row too, sum_{j != y_i} N'(c_ij) W_hat_j (its weights depend on
    the row's hard columns), so it counts as K = 2 there."""
    return subcenters if negatives == "none" else max(subcenters, 2)


def aux_layout(B: int, D: int, has_o: bool, has_pc: bool, has_wsum: bool, subcenters: int = 1):
    """aux is one fp32 vector: [B x NSTAT statistics | B x D O' (has_o) | the smoothing term (has_wsum):
    D (K = 1) or B x D (K > 1), see wsum_numel], zero-padded to a multiple of 8, plus `code` (0..7) more
    elements that record what it holds (its numel % 8), so that the backward reads the layout from the
    shape and K alone. Returns (numel, offset of O', offset of the smoothing term)."""
    o_off = B * NSTAT
    ws_off = o_off + (B * D if has_o else 0)
    payload = ws_off + (wsum_numel(B, D, subcenters) if has_wsum else 0)
    code = (AUX_O if has_o else 0) | (AUX_PC if has_pc else 0) | (AUX_WSUM if has_wsum else 0)
    return 8 * triton.cdiv(payload, 8) + code, o_off, ws_off


def aux_flags(B: int, D: int, aux: torch.Tensor, subcenters: int = 1):
    code = aux.numel() % 8
    flags = bool(code & AUX_O), bool(code & AUX_PC), bool(code & AUX_WSUM)
    if aux.dim() != 1 or aux.dtype != torch.float32 or aux.numel() != aux_layout(B, D, *flags, subcenters)[0]:
        raise ValueError(
            f"aux of shape {tuple(aux.shape)} ({aux.dtype}) was not produced by the triton forward for B={B}, "
            f"D={D}, subcenters={subcenters}"
        )
    return flags


def forward_plan(smoothing: bool, need_x: bool, need_alpha: bool):
    """(has_o, has_pc, has_wsum): what the forward prepares for the backward's hints (smoothing: a
    label smoothing tensor is given)."""
    return need_x, need_alpha, need_x and smoothing


def aux_meta(x, weight, target, alpha, bias, margins, label_smoothing, negatives_table, normalize_weight, margin_kind,
             margin_detached, subcenters, ignore_index, eps, negatives, max_logits_bytes, need_x, need_weight,
             need_bias, need_alpha):
    """An empty tensor shaped like the aux forward() returns (the fake kernel's aux)."""
    B, D = x.shape
    numel = aux_layout(B, D, *forward_plan(label_smoothing is not None, need_x, need_alpha),
                       layout_k(subcenters, negatives))[0]
    return x.new_empty((numel,), dtype=torch.float32)
