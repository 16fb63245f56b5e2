"""The one place where the benchmark tools (benchmark_l2_softmax_gpu.py, compile_report.py) call the
triton backend below the public API: its launchers (loss_forward.forward, loss_backward.backward), its
ops (l2sm::triton_forward / l2sm::triton_backward) and its tile choice. When the op's schema or the
launchers' signatures change (new options), these four functions are the one place to fix.

Everything else in those tools goes through the public API (l2sm_kernels.l2_softmax_loss).

`needs` is the op's (need_x, need_weight, need_bias, need_alpha); `options` an L2SMOptions.
"""
from __future__ import annotations

import contextlib

from l2sm_kernels.options import L2SMOptions

# The tiles the GPU benchmark times next to the default (l2sm_kernels/backends/triton/config.py:
# GPU_CONFIGS; on a GPU the default is the GEMM path, "gemm", and "fused" the fused kernels' default for bf16
# at D <= 512), and compile_report.py --variants compiles. "fused_tma_wide" is a pair of configurations
# (config.VARIANT_PAIRS: the forward's and the dW pass's).
TIMED_VARIANTS = ("fused", "fused_prefetch", "fused_tma", "fused_tma_wide", "fused_chained", "split_d")
# The GEMM path at three logits budgets (max_logits_bytes as a share of B x C x the logits' element size):
# keep nothing (4 GEMMs), a quarter, everything (3 GEMMs). Timed as core rows, beside the fused variants
GEMM_DIALS = {"0": 0.0, "quarter": 0.25, "all": 1.0}
GEMM_ROWS = tuple(f"gemm@{d}" for d in GEMM_DIALS)

PLAIN = L2SMOptions()
# every option on: what compile_report.py --options all and the GPU checks of the option paths use
ALL_OPTIONS = L2SMOptions(normalize_weight=True, margin_type="arcface", margin=0.5, label_smoothing=0.1)


def launch_forward(K, x, weight, target, alpha, bias, options: L2SMOptions, needs, **kw):
    """loss_forward.forward (K: kernel_namespace()); kw: launch=, config=, splits=."""
    return K.forward(x, weight, target, alpha, bias, *options.op_arguments(x.shape[0], x.device), *needs, **kw)


def launch_backward(K, grad_loss, grad_lse, x, weight, target, alpha, bias, lse, aux, options: L2SMOptions, needs,
                    **kw):
    """loss_backward.backward (K: kernel_namespace()); kw: launch=, config=."""
    return K.backward(grad_loss, grad_lse, x, weight, target, alpha, bias, *options.op_tensors(x.shape[0], x.device),
                      lse, aux, *options.op_args(), *needs, **kw)


def op_forward(x, weight, target, alpha, bias, options: L2SMOptions, needs):
    """The triton forward op: -> (loss, lse, aux)."""
    from l2sm_kernels.backends import ops_for
    return ops_for("triton")[0](x, weight, target, alpha, bias, *options.op_arguments(x.shape[0], x.device), *needs)


def op_backward(grad_loss, grad_lse, x, weight, target, alpha, bias, lse, aux, options: L2SMOptions, needs):
    """The triton backward op: -> (dx, dW, db, dalpha)."""
    from l2sm_kernels.backends import ops_for
    return ops_for("triton")[1](grad_loss, grad_lse, x, weight, target, alpha, bias,
                                *options.op_tensors(x.shape[0], x.device), lse, aux, *options.op_args(), *needs)


@contextlib.contextmanager
def forced_tiles(name: str | None):
    """Within the block, both main kernels (_fwd_split_kernel, whatever the forward accumulates, and
    _bwd_dw_kernel) take GPU_CONFIGS[name] instead of their default tiles, through whatever API runs
    them (l2_softmax_loss(backend="triton") included). Yields a dict whose "calls" counts how often
    the override was asked, so a caller can tell that it took effect. name None: the defaults.

    It replaces the tile functions where the launchers look them up (the modules loss_forward and
    loss_backward), not in a kernel_namespace() copy, which the launchers never read."""
    from l2sm_kernels.backends.triton import config as cfg_mod
    from l2sm_kernels.backends.triton import loss_backward, loss_forward

    used = {"calls": 0}
    if name is None:
        yield used
        return
    fwd_name, dw_name = cfg_mod.VARIANT_PAIRS.get(name, (name, name))
    for n in (fwd_name, dw_name):
        if n not in cfg_mod.GPU_CONFIGS:
            raise KeyError(f"no GPU_CONFIGS entry {n!r}; there are {sorted(cfg_mod.GPU_CONFIGS)}")
    saved = loss_forward.forward_config, loss_backward.dw_config

    def tiles_of(n):
        def tiles(D, *args, **kwargs):
            used["calls"] += 1
            return cfg_mod.GPU_CONFIGS[n](cfg_mod._pow2(D))
        return tiles

    loss_forward.forward_config = tiles_of(fwd_name)
    loss_backward.dw_config = tiles_of(dw_name)
    try:
        yield used
    finally:
        loss_forward.forward_config, loss_backward.dw_config = saved


def gemm_budget(B: int, C: int, dial: str, elem_bytes: int = 2) -> int:
    """max_logits_bytes for a GEMM_DIALS entry at B x C (bf16 logits: 2 bytes each)."""
    return int(GEMM_DIALS[dial] * B * C * elem_bytes)


@contextlib.contextmanager
def gemm_path(max_logits_bytes: int | None):
    """Within the block, the triton backend runs its GEMM path (whatever the device's default) and keeps at most
    max_logits_bytes of logits for calls that leave the budget at its default (max_logits_bytes=None), such
    as the benchmark's l2_softmax_loss calls."""
    from l2sm_kernels.backends.triton import gemm_path as gp

    saved = gp.DEFAULT_MAX_LOGITS_BYTES
    gp.DEFAULT_MAX_LOGITS_BYTES = max_logits_bytes
    try:
        with forced_tiles("gemm") as used:
            yield used
    finally:
        gp.DEFAULT_MAX_LOGITS_BYTES = saved
