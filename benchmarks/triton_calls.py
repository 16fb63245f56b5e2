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
# GPU_CONFIGS; "fused" is the default for bf16 at D <= 512), and compile_report.py --variants compiles.
TIMED_VARIANTS = ("fused_prefetch", "fused_tma", "fused_chained", "split_d")

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
    if name not in cfg_mod.GPU_CONFIGS:
        raise KeyError(f"no GPU_CONFIGS entry {name!r}; there are {sorted(cfg_mod.GPU_CONFIGS)}")
    saved = loss_forward.forward_config, loss_backward.dw_config

    def tiles(D, *args, **kwargs):
        used["calls"] += 1
        return cfg_mod.GPU_CONFIGS[name](cfg_mod._pow2(D))

    loss_forward.forward_config = loss_backward.dw_config = tiles
    try:
        yield used
    finally:
        loss_forward.forward_config, loss_backward.dw_config = saved
