"""Launch configuration of the main kernels: tile sizes (Config, GPU_CONFIGS, the interpreter's
small tiles), the precision plan of the matrix products (dot_plan), the forward's class splits and
the dW pass's program count, and the constexpr arguments both main kernels share (tile_meta); which
path runs (the fused kernels or the GEMM path, default_path) and the GEMM path's chunks."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import triton

from .aux_layout import NPART
from .common import INTERPRETED


@dataclass(frozen=True)
class Config:
    """Tile sizes of one main kernel. block_k >= D (padded) means one tile spans all of D
    (SINGLE_K); block_do is the D chunk of the O' / dW accumulator (grid dimension when < D)."""

    block_rows: int  # BLOCK_B of the forward, BLOCK_B (rows per step) of the dW pass
    block_cols: int  # BLOCK_C
    block_k: int
    block_do: int
    num_warps: int = 4
    num_stages: int = 2
    chain_break: bool = False  # p / dz through scratch (see _through_scratch)
    prefetch: bool = False  # L1 prefetch of the next tile (GPU, one tile over D, bf16/fp16 rows)
    tma: bool = False  # the streamed tile through a tensor descriptor (TMA on sm_90; see _tma_ok)
    # programs of this kernel one multiprocessor holds at once (sm_90, from the registers and shared
    # memory benchmarks/compile_report.py reports): sizes the forward grid to whole waves
    ctas_per_sm: int = 1
    # the GEMM path (gemm_path.py) instead of the fused kernels: block_rows x block_cols are then the tiles
    # of its row kernels, chunk_classes the classes of one chunk (0: from GEMM_CHUNK_BYTES)
    gemm: bool = False
    chunk_classes: int = 0


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def dot_plan(xdt: torch.dtype, wdt: torch.dtype):
    """(S operand dtype code, S in tf32, derived operand dtype code, derived in tf32); see the
    module docstring's "Precision"."""
    if xdt == wdt == torch.bfloat16:
        return 2, False, 2, False
    if xdt == wdt == torch.float16:
        return 1, False, 0, True
    if xdt == wdt == torch.float32:
        tf32 = torch.get_float32_matmul_precision() != "highest"
        return 0, tf32, 0, tf32
    return 0, True, 0, True


def on_gpu(device) -> bool:
    """Compiled kernels on a CUDA device (else the interpreter's small tiles)."""
    return torch.device(device).type == "cuda" and not INTERPRETED


def num_sms(device) -> int | None:
    """Multiprocessors of a CUDA device (host-side, cached by torch: no synchronization)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if on_gpu(device) else None


def _interpreter_config(D: int, C: int) -> Config:
    # small tiles; D > 64 takes the K-loop and D-chunk paths, so the CPU tests cover them. Large C
    # gets wide class tiles: the interpreter's cost is per operation, not per element.
    d_pad = _pow2(D)
    cols = 16 if C <= 1024 else min(2048, _pow2(C // 64))
    return Config(16, cols, d_pad if d_pad <= 64 else 32, d_pad if d_pad <= 64 else 64, chain_break=True)


# GPU tiles, chosen from what the compiler reports for sm_90 (benchmarks/compile_report.py: registers,
# spills, shared memory, HGMMA count) at B=1024, D=512; their speed is unmeasured. A D-wide fp32
# accumulator (64 x 512 = 128 KiB) takes half the register file, which fixes 64-row (or 64-class)
# tiles and 8 warps; see _through_scratch for why chain_break is on.
GPU_CONFIGS = {
    # bf16: S and the accumulator's product both on bf16 tensor cores, one tile spans all of D
    "fused": lambda d: Config(64, 64, d, d, num_warps=8, num_stages=2, chain_break=True),
    # the same with an L1 prefetch of the next tile (the scratch barrier stops software pipelining)
    "fused_prefetch": lambda d: Config(64, 64, d, d, num_warps=8, num_stages=2, chain_break=True, prefetch=True),
    # the same with the streamed tile (W in the forward, x in the dW pass) loaded by TMA through a tensor
    # descriptor: global -> shared memory without registers. Compiles for sm_90 (compile_report: UTMALDG in
    # the main loop); its speed and its numerics on a GPU are unmeasured (the interpreter runs the same code)
    "fused_tma": lambda d: Config(64, 64, d, d, num_warps=8, num_stages=2, chain_break=True, tma=True),
    # the same without the scratch: pipelined loads, but both warpgroups compute S
    "fused_chained": lambda d: Config(64, 64, d, d, num_warps=8, num_stages=2, chain_break=False),
    # one warpgroup (no redundant S, no scratch), a K loop of 64 and a 256-wide accumulator chunk per
    # program (S computed once per chunk: 3 GEMM-equivalents per pass), two programs per multiprocessor
    "split_d": lambda d: Config(64, 64, 64, min(d, 256), num_warps=4, num_stages=2, ctas_per_sm=2),
    # logsumexp only (no accumulator): the split kernel measured on an H200 at 1.02x cuBLAS's logits (docs/design.md, "The roofline")
    "lse": lambda d: Config(128, 256, 64, 16, num_warps=8, num_stages=3),
    "lse_fp16": lambda d: Config(128, 128, 64, 16, num_warps=8, num_stages=3),
    # logsumexp only with sub-centers: the running maximum over the K products is one more fp32 tile, so
    # 64 rows (128 x 256 spills 736 bytes at K = 3, this none; compile_report numbers, speed unmeasured)
    "lse_subcenters": lambda d: Config(64, 256, 64, 16, num_warps=8, num_stages=3),
    # fp32 operands: tf32 takes twice the shared memory of bf16; IEEE runs on the FMA units
    "tf32": lambda d: Config(64, 64, min(d, 64), min(d, 256), num_warps=8, num_stages=2),
    "ieee_fwd": lambda d: Config(32, 32, min(d, 32), min(d, 128), num_warps=4, num_stages=2, ctas_per_sm=3),
    "ieee_dw": lambda d: Config(32, 32, min(d, 32), min(d, 128), num_warps=8, num_stages=2),
    # the wide TMA tiles (a static review of the sm_90 build estimated 15-20 % over "fused"; unmeasured): the
    # forward 64 rows x 128 classes, the dW pass 128 rows x 64 classes (a 64 x D accumulator either way). A pair:
    # forced on both kernels through VARIANT_PAIRS (benchmarks/triton_calls.py, forced_tiles)
    "fused_tma_wide_fwd": lambda d: Config(64, 128, d, d, num_warps=8, num_stages=2, chain_break=True, tma=True),
    "fused_tma_wide_dw": lambda d: Config(128, 64, d, d, num_warps=8, num_stages=2, chain_break=True, tma=True),
    # the GEMM path (gemm_path.py): library GEMMs (cuBLAS) per class chunk plus Triton row kernels; the tiles
    # are the row kernels' (rows x classes per step; memory-bound passes over the chunk). Every dtype.
    # The default CUDA path until a GPU has timed both (docs/triton_notes.md, "The GEMM path")
    "gemm": lambda d: Config(16, 256, d, d, num_warps=4, num_stages=2, gemm=True),
}
# variants that force a different configuration on each main kernel: name -> (forward's, dW pass's)
VARIANT_PAIRS = {"fused_tma_wide": ("fused_tma_wide_fwd", "fused_tma_wide_dw")}

PATHS = ("fused", "gemm")


def _env_path():
    """L2SM_TRITON_PATH (fused | gemm): the path both launchers take by default, on the GPU and under the
    interpreter. Any other value is ignored with a warning (the package still imports)."""
    v = os.environ.get("L2SM_TRITON_PATH", "").strip().lower()
    if v in PATHS:
        return v
    if v:
        warnings.warn(f"l2sm_kernels: L2SM_TRITON_PATH={v!r} ignored (one of {PATHS}); the triton backend "
                      "keeps its default path", RuntimeWarning, stacklevel=2)
    return None


_PATH = _env_path()


def set_path(name: str | None) -> None:
    """Choose the triton backend's path for later calls: "fused" (the fused kernels), "gemm" (library GEMMs
    plus row kernels, gemm_path.py) or None (the default: "gemm" on a GPU, "fused" under the interpreter).
    Read when the op runs, so choose it before torch.compile traces a step."""
    global _PATH
    if name is not None and name not in PATHS:
        raise ValueError(f"path must be one of {PATHS} or None, got {name!r}")
    _PATH = name


def default_path(gpu: bool) -> str:
    """The path the launchers take without an explicit config: set_path's / L2SM_TRITON_PATH's choice, else
    the GEMM path on a GPU (its GEMMs are cuBLAS's, measured at the 3-GEMM floor; the fused kernels are
    unmeasured: until a GPU times both, docs/triton_notes.md) and the fused kernels under the interpreter
    (CI's option matrix covers them through the public API; tests/test_triton_gemm_path.py the GEMM path)."""
    if _PATH is not None:
        return _PATH
    return "gemm" if gpu else "fused"


# the GEMM path's chunk: classes whose (B, n K) cosines take about this many bytes (the chunk buffer; a kept
# chunk's logits take as much). 64 MiB: 32768 classes at B = 1024 in bf16, 4 chunks at C = 131072 and 32 at
# C = 1048576. A chunk costs about 9 launches per step, ~0.13 ms of host time in Python (estimate), under the
# GPU time of its GEMMs at these sizes; smaller chunks save memory (the workspace is a chunk buffer and
# W_hat_c, ~100 MiB here, see gemm_path.py) but can leave the GPU waiting on the host (not inside a CUDA
# graph). Unmeasured
GEMM_CHUNK_BYTES = 64 << 20


def _gemm_interpreter_config() -> Config:
    # tiny chunks, so that the tests' C = 37 .. 300 take several chunks, a ragged last one and two column splits
    return Config(16, 16, 16, 16, gemm=True, chunk_classes=16)


def gemm_chunk_classes(cfg: Config, B: int, C: int, K: int, esize: int) -> int:
    """Classes per chunk of the GEMM path (a multiple of 16 unless it is all of C)."""
    n = cfg.chunk_classes or max(16, (GEMM_CHUNK_BYTES // max(1, B * K * esize)) // 16 * 16)
    return max(1, min(n, C))


def gemm_splits(B: int, cfg: Config, sms: int | None) -> int:
    """Column splits of pass 1's statistics kernel (its grid: row blocks x splits, each split's running
    partials merged over the chunks): about 4 programs per multiprocessor, 2 under the interpreter."""
    if sms is None:
        return 2
    return max(1, min(64, (4 * sms) // max(1, triton.cdiv(B, cfg.block_rows))))


def forward_config(D: int, xdt, wdt, acc_o: bool, gpu: bool, variant: str | None = None, C: int = 0,
                   subcenters: int = 1) -> Config:
    """Tiles of _fwd_split_kernel (variant: a GPU_CONFIGS key, to time the alternatives)."""
    if not gpu:
        return _gemm_interpreter_config() if default_path(gpu) == "gemm" else _interpreter_config(D, C)
    d_pad = _pow2(D)
    if variant is not None:
        return GPU_CONFIGS[variant](d_pad)
    if default_path(gpu) == "gemm":
        return GPU_CONFIGS["gemm"](d_pad)
    s_dt, _, p_dt, p_tf32 = dot_plan(xdt, wdt)
    if s_dt != 0 and not acc_o:
        if subcenters > 1:
            return GPU_CONFIGS["lse_subcenters"](d_pad)
        return GPU_CONFIGS["lse" if s_dt == 2 else "lse_fp16"](d_pad)
    if s_dt == 2:
        return GPU_CONFIGS["fused" if d_pad <= 512 else "split_d"](d_pad)
    if p_dt == 0 and not p_tf32:
        return GPU_CONFIGS["ieee_fwd"](d_pad)
    return GPU_CONFIGS["tf32"](d_pad)


def dw_config(D: int, xdt, wdt, gpu: bool, variant: str | None = None, C: int = 0) -> Config:
    """Tiles of _bwd_dw_kernel (block_rows: rows per step of its walk, block_cols: its classes)."""
    if not gpu:
        return _gemm_interpreter_config() if default_path(gpu) == "gemm" else _interpreter_config(D, C)
    d_pad = _pow2(D)
    if variant is not None:
        return GPU_CONFIGS[variant](d_pad)
    if default_path(gpu) == "gemm":
        return GPU_CONFIGS["gemm"](d_pad)
    s_dt, _, p_dt, p_tf32 = dot_plan(xdt, wdt)
    if s_dt == 2:
        return GPU_CONFIGS["fused" if d_pad <= 512 else "split_d"](d_pad)
    if p_dt == 0 and not p_tf32:
        return GPU_CONFIGS["ieee_dw"](d_pad)
    return GPU_CONFIGS["tf32"](d_pad)


WAVES = 2  # the forward grid: at most this many full waves of resident programs


def num_splits(B: int, C: int, cfg: Config, sms: int | None, n_d: int = 1) -> int:
    """Class splits of the forward grid (row blocks x splits x n_d D chunks): as many as fit in WAVES
    full waves of resident programs (sms x cfg.ctas_per_sm slots), rounded down, so that the grid never
    ends in a partial wave (every program does the same work: a partial wave costs a whole one); at
    least 1, never more than there are class tiles, none empty; 2 under the interpreter (sms None).
    E.g. B = 1024 with the 64-row bf16 tiles on 132 SMs: 16 splits, 256 programs for 264 slots.
    The workspace bound of the module docstring follows: n_splits <= max(1, 2 slots / row_blocks)."""
    row_blocks = triton.cdiv(B, cfg.block_rows)
    tiles = triton.cdiv(C, cfg.block_cols)
    want = 2 if sms is None else (WAVES * sms * cfg.ctas_per_sm) // (row_blocks * n_d)
    want = max(1, min(want, tiles))
    return triton.cdiv(tiles, triton.cdiv(tiles, want))


def d_chunks(D: int, cfg: Config, acc_o: bool) -> int:
    """D chunks of the forward's O' accumulator (its grid's third dimension)."""
    return triton.cdiv(D, min(cfg.block_do, _pow2(D))) if acc_o else 1


def forward_splits(B: int, C: int, D: int, acc_o: bool, cfg: Config, sms: int | None) -> int:
    """num_splits as the forward launcher computes it."""
    return num_splits(B, C, cfg, sms, d_chunks(D, cfg, acc_o))


def dw_programs(sms: int | None) -> int:
    """Programs of the persistent dW pass: one per multiprocessor (its tiles leave room for one),
    3 under the interpreter (so the tests walk several class blocks per program)."""
    return 3 if sms is None else sms


# torch dtype of a product operand by dot_plan's code (the scratch buffers of the derived operand)
P_TORCH = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}


def forward_workspace_bytes(B: int, C: int, D: int, acc_o: bool, cfg: Config, sms: int | None) -> int:
    """Bytes of the forward's split partials (the only workspace that grows with B x D)."""
    return forward_splits(B, C, D, acc_o, cfg, sms) * B * (NPART + (D if acc_o else 0)) * 4


def _prefetch_ok(cfg: Config, single_k: bool, block_k: int, t: torch.Tensor) -> bool:
    """PREFETCH of the tensor t's rows (W in the forward, x in the dW pass): _prefetch_l1's lines are 64
    elements of 2 bytes along a unit D stride; compiled kernels only."""
    return (cfg.prefetch and single_k and block_k >= 64 and not INTERPRETED and t.stride(1) == 1
            and t.element_size() == 2)


def _tma_ok(cfg: Config, single_k: bool, t: torch.Tensor, rows_strided: bool = False) -> bool:
    """TMA of the tensor t's tiles (W in the forward, x in the dW pass): a descriptor needs a unit D stride,
    16-byte aligned rows and base, and one tile spanning all of D (SINGLE_K, the path it replaces); not W's
    rows of one sub-center (rows_strided: row stride K). Also under the interpreter, which runs descriptors."""
    return (cfg.tma and single_k and not rows_strided and t.dim() == 2 and t.stride(1) == 1
            and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0)


def tile_meta(cfg: Config, D: int, xdt: torch.dtype, wdt: torch.dtype, streamed: torch.Tensor,
              chain_break: bool, rows_strided: bool = False) -> dict:
    """The constexpr launch arguments both main kernels (_fwd_split_kernel, _bwd_dw_kernel) share: the
    precision of the two products (dot_plan), the tiles (one K tile spans all of D when block_k covers
    it, SINGLE_K; the accumulator's D chunk BLOCK_DO; REUSE_TILE when that chunk is the K tile itself),
    the scratch round trip, the L1 prefetch of the streamed tensor's rows (W in the forward, x in the
    dW pass) or its TMA (TMA: the launcher passes a tensor descriptor, tma_descriptor), warps and stages."""
    s_dt, s_tf32, p_dt, p_tf32 = dot_plan(xdt, wdt)
    d_pad = _pow2(D)
    single_k = cfg.block_k >= d_pad
    block_k = d_pad if single_k else cfg.block_k
    block_do = min(cfg.block_do, d_pad)
    return dict(S_DT=s_dt, S_TF32=s_tf32, P_DT=p_dt, P_TF32=p_tf32, EMU=INTERPRETED,
                BLOCK_B=cfg.block_rows, BLOCK_C=cfg.block_cols, BLOCK_K=block_k, BLOCK_DO=block_do,
                SINGLE_K=single_k, REUSE_TILE=single_k and block_do == block_k, CHAIN_BREAK=chain_break,
                PREFETCH=_prefetch_ok(cfg, single_k, block_k, streamed),
                TMA=_tma_ok(cfg, single_k, streamed, rows_strided),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def row_tiles(D: int) -> tuple[int, int]:
    """(rows per program, D tile) of the per-row kernels (_fwd_combine_kernel, _bwd_rows_kernel)."""
    return 16, min(_pow2(D), 64 if INTERPRETED else 128)


def tma_descriptor(t: torch.Tensor, meta: dict, rows_key: str):
    """The streamed tensor's descriptor when meta["TMA"] (blocks of meta[rows_key] rows x BLOCK_K), else t itself
    (the kernel then takes its pointer path and never reads this argument)."""
    if not meta["TMA"]:
        return t
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor.from_tensor(t, [meta[rows_key], meta["BLOCK_K"]])
