"""CPU unit tests of the triton backend's GPU-only choices, which no interpreter run exercises: the
precision plan of the matrix products for every dtype pair and every torch.get_float32_matmul_precision()
setting, and the validity of every GPU tile configuration (structure, and shared memory and
accumulator registers within an H100 / H200 multiprocessor). The compiled-code checks (sm_90 builds,
64-bit offsets) are in test_triton_backend.py; these need no compiler."""
import itertools

import pytest
import torch

triton = pytest.importorskip("triton")

from l2sm_kernels.backends.triton import config as TC  # noqa: E402


@pytest.fixture(autouse=True)
def fused_path(monkeypatch):
    """The defaults tested here are the fused kernels' tiles (a GPU's default path is the GEMM path, whose
    choice test_default_path_is_the_gemm_path_on_a_gpu checks)."""
    monkeypatch.setattr(TC, "_PATH", "fused")

FP32, FP16, BF16 = 0, 1, 2  # dot_plan's operand codes
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _expected_plan(xdt, wdt, precision):
    """The documented plan (l2sm_kernels/backends/triton/__init__.py, "Precision"), written out:
    (S operand, S in tf32, derived operand (p for O', dz for dW), derived in tf32)."""
    if xdt == wdt == torch.bfloat16:
        return BF16, False, BF16, False  # bf16 tensor cores for both products
    if xdt == wdt == torch.float16:
        return FP16, False, FP32, True  # p ~ 1/C would underflow fp16: the derived operand in tf32
    if xdt == wdt == torch.float32:
        tf32 = precision != "highest"  # torch's own fp32 matmul rule
        return FP32, tf32, FP32, tf32
    return FP32, True, FP32, True  # mixed: the 16-bit operand is exact in tf32, W is read as stored


@pytest.mark.parametrize("precision", ["highest", "high", "medium"])
def test_matmul_precision_plan_for_every_dtype_pair(precision):
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(precision)
        for xdt, wdt in itertools.product(DTYPES, DTYPES):
            assert TC.dot_plan(xdt, wdt) == _expected_plan(xdt, wdt, precision), (xdt, wdt, precision)
    finally:
        torch.set_float32_matmul_precision(saved)


def _is_pow2(n):
    return n >= 1 and n & (n - 1) == 0


SMEM_PER_SM = 228 * 1024  # H100 / H200: 228 KiB per multiprocessor, 227 KiB usable by one block
REGISTER_FILE = 256 * 1024  # 64K 32-bit registers per multiprocessor


def assert_valid(cfg, D, fp32_tiles, where, dw=False):
    d_pad = TC._pow2(D)
    for field in ("block_rows", "block_cols", "block_k", "block_do"):
        v = getattr(cfg, field)
        assert _is_pow2(v) and v >= 16, (where, field, v)  # tl.dot needs power-of-two tiles of at least 16
    assert cfg.block_k <= d_pad and cfg.block_do <= d_pad, (where, cfg)
    assert cfg.num_warps in (4, 8) and cfg.num_stages >= 1 and cfg.ctas_per_sm >= 1, where
    if cfg.prefetch:
        assert cfg.block_k >= 64, where  # _prefetch_l1 walks 64-element lines
    if cfg.gemm:  # the GEMM path's row kernels: one fp32 tile of block_rows x block_cols, no products
        assert cfg.block_rows * cfg.block_cols * 4 <= REGISTER_FILE // 8, (where, cfg)
        return
    # operand tiles in flight: 2-byte elements (bf16 / fp16), 4 for tf32 / IEEE fp32 operands
    elem = 4 if fp32_tiles else 2
    single_k = cfg.block_k >= d_pad
    k_tile = d_pad if single_k else cfg.block_k
    stages = 1 if single_k else cfg.num_stages
    smem = stages * (cfg.block_rows + cfg.block_cols) * k_tile * elem
    assert smem * cfg.ctas_per_sm <= SMEM_PER_SM, (where, smem)
    # the fp32 accumulator (O' or dW: block_rows x block_do) lives in registers: at most half the file
    # per multiprocessor, so the rest of the kernel has room
    acc = (cfg.block_cols if dw else cfg.block_rows) * cfg.block_do * 4  # dW's: classes x D chunk
    assert acc * cfg.ctas_per_sm <= REGISTER_FILE // 2, (where, acc)


@pytest.mark.parametrize("xdt,wdt", list(itertools.product(DTYPES, DTYPES)))
@pytest.mark.parametrize("D", [64, 128, 256, 512, 1024, 2048])
def test_default_gpu_configs_are_valid(xdt, wdt, D):
    """The tiles forward_config / dw_config choose for every dtype pair and D (the O' accumulator on
    and off)."""
    fp32_tiles = TC.dot_plan(xdt, wdt)[0] == FP32
    for acc_o in (True, False):
        cfg = TC.forward_config(D, xdt, wdt, acc_o, gpu=True)
        assert_valid(cfg, D, fp32_tiles, ("forward", xdt, wdt, D, acc_o))
    assert_valid(TC.dw_config(D, xdt, wdt, gpu=True), D, fp32_tiles, ("dW", xdt, wdt, D), dw=True)


@pytest.mark.parametrize("name", sorted(TC.GPU_CONFIGS))
def test_benchmarked_variants_are_valid_at_d512(name):
    """Every GPU_CONFIGS entry at the GPU benchmark's D = 512 (the variants it times and checks)."""
    assert_valid(TC.GPU_CONFIGS[name](512), 512, name in ("tf32", "ieee_fwd", "ieee_dw"), name, dw=name.endswith("_dw"))


@pytest.mark.parametrize("xdt,wdt", list(itertools.product(DTYPES, DTYPES)))
@pytest.mark.parametrize("D", [64, 512, 1024])
def test_default_configs_come_from_the_table(xdt, wdt, D):
    """forward_config / dw_config pick an entry of GPU_CONFIGS (the ones the GPU benchmark times and
    checks) for every dtype pair, with and without the forward's O' accumulator."""
    d_pad = TC._pow2(D)
    table = {name: make(d_pad) for name, make in TC.GPU_CONFIGS.items()}
    for acc_o in (True, False):
        assert TC.forward_config(D, xdt, wdt, acc_o, gpu=True) in table.values()
    assert TC.dw_config(D, xdt, wdt, gpu=True) in table.values()


def test_default_path_is_the_gemm_path_on_a_gpu(monkeypatch):
    """Until a GPU has timed both, a GPU's default is the GEMM path for every dtype pair (its GEMMs are
    cuBLAS's), the interpreter's the fused kernels; set_path / L2SM_TRITON_PATH choose."""
    monkeypatch.setattr(TC, "_PATH", None)
    for xdt, wdt in itertools.product(DTYPES, DTYPES):
        assert TC.forward_config(512, xdt, wdt, True, gpu=True) == TC.GPU_CONFIGS["gemm"](512)
        assert TC.dw_config(512, xdt, wdt, gpu=True).gemm
        assert not TC.forward_config(512, xdt, wdt, True, gpu=False).gemm
    TC.set_path("gemm")
    assert TC.forward_config(64, torch.float32, torch.float32, False, gpu=False).gemm
    TC.set_path(None)
