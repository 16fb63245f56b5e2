"""The public functional API: validate, pick a backend, run its op, reduce."""
from __future__ import annotations

import dataclasses
import math
import numbers
import warnings

import torch

from .backends import ops_for, resolve
from .options import (FLOAT_DTYPES, L2SMOptions, check_alpha, check_alpha_fits, check_reduction, check_sample_rate,
                      compute_dtype)


def alpha_lower_bound(num_classes: int, p: float = 0.9) -> float:
    """The paper's lower bound on alpha (Ranjan et al. 2017, eq. 5): log(p (C - 2) / (1 - p)), the
    smallest radius at which a feature can reach target-class probability p among C classes.
    16.0 for C = 1M and p = 0.9."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 3:
        raise ValueError(f"num_classes must be an int >= 3, got {num_classes!r}")
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    return math.log(p * (num_classes - 2) / (1 - p))


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; convert it with "
                        f"{'.to_dense()' if t.layout != torch._mkldnn else '.to_dense()'} first")


def _check_matrix(name: str, t, ndim: int, what: str) -> None:
    _check_tensor(name, t)
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {what}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_inputs(features, weight, target, bias, *, weight_name="weight", bias_name="bias",
                 classes="num_classes", allow_no_classes=False, subcenters=1) -> int:
    """Ranks, shapes, dtypes, layouts and devices of the tensor arguments (features (B, D), weight
    (C K, D), target (B,), bias (C,) or None); a TypeError / ValueError naming the argument
    otherwise. Returns C, the number of classes."""
    _check_matrix("features", features, 2, "(batch, in_features)")
    rows = f"{classes} x {subcenters}" if subcenters > 1 else classes
    _check_matrix(weight_name, weight, 2, f"({rows}, in_features)")
    B, D = features.shape
    if weight.shape[1] != D:
        hint = ""
        if weight.shape[0] == D:
            hint = f"; it looks transposed (in_features first): pass {weight_name}.T"
        raise ValueError(
            f"{weight_name} must have shape ({rows}, {D}) to match features of shape {tuple(features.shape)}, "
            f"got {tuple(weight.shape)}{hint}"
        )
    if weight.shape[0] % subcenters:
        raise ValueError(f"{weight_name} has {weight.shape[0]} rows, not a multiple of subcenters={subcenters} "
                         f"(rows [j K, (j + 1) K) are class j's sub-centers)")
    C = weight.shape[0] // subcenters
    if C == 0 and not allow_no_classes:
        raise ValueError(f"{weight_name} must hold at least one class, got shape (0, D)")
    if D == 0:
        raise ValueError("features must have at least one feature dimension, got D = 0")
    _check_tensor("target", target)
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be an int64 (or int32) tensor of class indices, got {target.dtype}")
    if target.dim() != 1 or target.shape[0] != B:
        raise ValueError(f"target must have shape ({B},) to match features, got {tuple(target.shape)}")
    if bias is not None:
        _check_matrix(bias_name, bias, 1, f"({classes},)")
        if bias.shape[0] != C:
            raise ValueError(f"{bias_name} must have shape ({C},) to match {weight_name} (one bias per class), "
                             f"got {tuple(bias.shape)}")
    for name, t in ((weight_name, weight), ("target", target), (bias_name, bias)):
        if t is not None and t.device != features.device:
            raise ValueError(f"{name} is on {t.device} but features are on {features.device}")
    return C


def check_option_tensors(opts: L2SMOptions, batch: int, device) -> L2SMOptions:
    """Per-row margins must be (batch,) on the features' device; 0-d margins and a 0-d label
    smoothing on the CPU move along (as alpha does). Returns the options with moved tensors."""
    def fix(name, v):
        if not isinstance(v, torch.Tensor):
            return v
        if v.dim() == 1 and v.shape[0] != batch:
            raise ValueError(f"{name} as a per-row tensor must have shape ({batch},) to match features, "
                             f"got {tuple(v.shape)}")
        if v.device != device:
            if v.dim() == 0 and v.device.type == "cpu":
                return v.to(device)
            raise ValueError(f"{name} is on {v.device} but features are on {device}")
        return v

    if not opts.has_tensors():
        return opts
    m = opts.margin
    if isinstance(m, tuple):
        m = (m[0], fix("margin m2", m[1]), fix("margin m3", m[2]))
    else:
        m = fix("margin", m)
    s = fix("label_smoothing", opts.label_smoothing)
    t = fix("negatives_t", opts.negatives_t)
    return dataclasses.replace(opts, margin=m, label_smoothing=s, negatives_t=t)


_WARNED_UNNORMALIZED = set()


def warn_angular_unnormalized(opts: L2SMOptions) -> None:
    """An angular margin takes arccos of x_hat . W_j: with normalize_weight=False those are not
    cosines unless every |W_j| <= 1 (nothing checks it: that would read W). Said once per process."""
    if opts.margin_kind != "angular" or opts.normalize_weight or torch.compiler.is_compiling():
        return
    if "angular" in _WARNED_UNNORMALIZED:
        return
    _WARNED_UNNORMALIZED.add("angular")
    warnings.warn(
        f"l2sm_kernels: margin_type={opts.margin_type!r} with an angular margin (m2 > 0) and "
        "normalize_weight=False takes arccos of x_hat . W_j, which is a cosine only when |W_j| <= 1 "
        "(beyond that it is clamped to 1 - 1e-7); pass normalize_weight=True (ArcFace's setting). "
        "This warning is shown once.", UserWarning, stacklevel=3)


def _check_targets(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """A target outside [0, C) that is not ignore_index is an error, never a read out of bounds;
    ignore_index itself may be any int (255 and C included, as torch's cross_entropy accepts).
    CPU tensors: a ValueError naming the first offending row. CUDA tensors and torch.compile:
    an asynchronous device assert (no host synchronization, as torch's own cross_entropy does);
    the kernels also give such rows a NaN loss, so no plausible number comes out."""
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if target.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"target[{i}] = {int(target[i])} is outside [0, {num_classes}) "
                f"and is not ignore_index={ignore_index}"
            )
    else:
        torch._assert_async(
            ~bad.any(), "l2sm_kernels: a target is outside [0, num_classes) and is not ignore_index"
        )


def _alpha_tensor(alpha, device, dtype) -> torch.Tensor:
    if isinstance(alpha, torch.Tensor):
        _check_tensor("alpha", alpha)
        if alpha.dim() != 0:
            raise ValueError(f"alpha must be a Python number or a 0-d tensor, got shape {tuple(alpha.shape)}")
        if alpha.dtype not in FLOAT_DTYPES:
            raise TypeError(f"alpha must be a floating-point tensor, got {alpha.dtype}")
        if alpha.device != device:
            if alpha.device.type != "cpu":
                raise ValueError(f"alpha is on {alpha.device} but features are on {device}")
            alpha = alpha.to(device)  # a 0-d CPU scalar moves along (differentiably)
        return alpha
    alpha = check_alpha(alpha)
    check_alpha_fits(alpha, dtype)
    return torch.full((), alpha, dtype=dtype, device=device)


def reduce_rows(loss: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """Per-row losses to the requested reduction ("mean" over rows whose target is not ignored:
    NaN when there are none, as torch)."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (target != ignore_index).sum()


def l2_softmax_loss(features, weight, target, alpha=16.0, bias=None, *, normalize_weight=False,
                    margin=0.0, margin_type="none", reduction="mean", ignore_index=-100,
                    label_smoothing=0.0, eps=1e-12, subcenters=1, margin_grad="exact", negatives="none",
                    negatives_t=None, sample_rate=1.0, generator=None, backend="auto", max_logits_bytes=None,
                    margin_fallback=True, _sampled=None):
    """L2-constrained softmax cross-entropy, fused: never builds the B x C logits (except backend
    "eager", the verification fallback) beyond the max_logits_bytes of them it may keep between the
    passes (the cpu backend's default keeps up to 256 MiB for fp32 products; 0 keeps none).

    z_ij = alpha * g_ij + b_j, g_ij = c_ij = x_hat_i . W_hat_j off the target column and f(c_iy) on it,
    with x_hat = x / max(|x|, eps), W_hat = W normalized when normalize_weight (else W), then
    cross_entropy(z, target) with label_smoothing, ignore_index and reduction as
    torch.nn.functional.cross_entropy. The target-column margin f (docs/design.md, "The margins"):
    "none" c; "cosface" c - m; "arcface" cos(arccos c + m) (with the monotonic fallback
    c - m sin m past pi - m); "combined" margin=(1, m2, m3): cos(arccos c + m2) - m3 (InsightFace's
    margin_list; m1 != 1 is not supported).

    Args:
        features: (B, D) float16 / bfloat16 / float32 / float64.
        weight: (C K, D) class weights (K = subcenters), any float dtype (may differ from features').
        target: (B,) int64 (int32 accepted) class indices in [0, C), or ignore_index (any int).
        alpha: the hypersphere radius: a number > 0, or a 0-d tensor (may require grad; its value
            is used as is, without a host sync, so alpha <= 0 is then the formula applied as written).
        bias: optional (C,) class bias.
        margin: a number; or a floating tensor, 0-d (a schedule: no recompiles under torch.compile) or
            (B,) (per-row margins: ElasticFace, AdaFace, MagFace), no gradient flows to it; for
            "combined" a tuple (1.0, m2, m3) whose m2 and m3 may each be such a tensor.
        label_smoothing: a number in [0, 1], or a 0-d tensor (a schedule).
        subcenters: K >= 1 sub-centers per class (sub-center ArcFace): class j's cosine is the maximum
            over rows [jK, (j+1)K) of W, each normalized on its own when normalize_weight; the margin
            applies to the target class's maximum; the gradient goes to the winning sub-center (ties:
            the lowest row).
        margin_grad: "exact" (the derivative of f) or "detached" (InsightFace's CombinedMarginLoss
            applies the margin under no_grad: the gradient w.r.t. the target cosine as if f were the
            identity; the value still has the margin).
        margin_fallback: False drops the angular margin's monotonic fallback past pi (f = cos(arccos c~
            + m2) - m3 on every target cosine), as InsightFace's CombinedMarginLoss.
        negatives: the non-target transform (docs/design.md, "The non-target transforms"): "none";
            "mv" (MV-Softmax: t c + t - 1 on the hard negatives, c_ij > f(c_iy)); "curricular"
            (CurricularFace: c (t + c) on the hard negatives); "filter" (InsightFace's inter-class
            filtering: c_ij > t -> 0). The mask is a constant, t has no gradient.
        negatives_t: its t: a finite number (mv: >= 1) or a 0-d tensor (a schedule, e.g.
            CurricularFace's running average); None: mv 1.2, curricular 0.0 ("filter" needs one).
        sample_rate: Partial FC in one process (An et al. 2022): every class that is a target in the
            batch plus random others, max(int(q C), positives) classes in all; the loss is the loss over
            exactly those classes and the others get exactly zero gradient. q = 1: all classes. When
            int(q C) >= B the size is int(q C), known from the shapes (no host read; compiles without a
            graph break); otherwise drawing the sample reads the number of positives on the host (a
            synchronization). The sample holds at least one class: with int(q C) = 0 and every target
            ignored it is one random class, and the result is the all-ignored one (0 per row, NaN for
            "mean", zero gradients) on every backend, never an op over zero classes.
        generator: the torch.Generator of Partial FC's draw (on the features' device; None: the default).
            torch.compile cannot trace a generator: under it pass None (a clear error otherwise).
        backend: "auto", "eager", "cpu" or "triton" (see l2sm_kernels.available_backends()).
        max_logits_bytes: the memory dial (docs/memory_dial.md): the most bytes of logits the forward
            may keep for the backward, an int >= 0, or None for the backend's default. 0: keep none
            (4 GEMM-equivalents per step, constant memory); B x C K x 4 (8 for float64) or more: keep
            all (3). The cpu backend honours it; the fused triton kernels keep nothing (any budget
            bounds them); eager builds the B x C logits whatever it says.

    Returns: the loss in float32 (float64 if features, weight or bias is float64); shape () for
        reduction "mean" / "sum", (B,) for "none" (0 on ignored rows). "mean" averages over rows
        whose target is not ignore_index and is NaN when there are none, as torch does.
    """
    opts = L2SMOptions(normalize_weight=normalize_weight, margin_type=margin_type, margin=margin,
                       ignore_index=ignore_index, label_smoothing=label_smoothing, eps=eps,
                       subcenters=subcenters, margin_grad=margin_grad, negatives=negatives, negatives_t=negatives_t,
                       max_logits_bytes=max_logits_bytes, margin_fallback=margin_fallback)
    check_reduction(reduction)
    q = check_sample_rate(sample_rate)
    C = check_inputs(features, weight, target, bias, subcenters=opts.subcenters)
    device = features.device
    B = features.shape[0]
    opts = check_option_tensors(opts, B, device)
    warn_angular_unnormalized(opts)
    target = target.long()
    cdt = compute_dtype(features, weight, bias)
    alpha_t = _alpha_tensor(alpha, device, cdt)
    dtypes = {features.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    name = resolve(backend, device.type, dtypes)
    _check_targets(target, C, opts.ignore_index)

    op_target, op_opts = target, opts
    if q < 1.0:
        weight, bias, op_target, sampled = partial_fc_select(weight, bias, target, C, q, opts, generator)
        if _sampled is not None:  # L2SoftmaxLoss.last_sampled
            _sampled.append(sampled)
        op_opts = dataclasses.replace(opts, ignore_index=-1)  # the sample's indices are 0 .. n-1
    forward_op, _ = ops_for(name)
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and features.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad, grad_on and alpha_t.requires_grad)
    margins, smoothing, negatives_table = opts.op_tensors(B, device)
    loss, _lse, _aux = forward_op(features, weight, op_target, alpha_t, bias, margins, smoothing, negatives_table,
                                  *op_opts.op_args(), *needs)
    return reduce_rows(loss, target, opts.ignore_index, reduction)


def partial_fc_select(weight, bias, target, num_classes: int, sample_rate: float, opts: L2SMOptions, generator):
    """Partial FC's subset: (the sampled classes' weight rows (all K sub-centers of each), their bias,
    the targets as indices into the sample, -1 on ignored rows, the sampled classes). Differentiable: index_select's
    backward gives the unsampled rows exactly zero gradient."""
    from .sampling import partial_fc_sample

    K = opts.subcenters
    sampled = partial_fc_sample(target, 0, num_classes, sample_rate, ignore_index=opts.ignore_index,
                                generator=generator, min_size=1)
    rows = (sampled[:, None] * K + torch.arange(K, device=sampled.device)).reshape(-1) if K > 1 else sampled
    w = weight.index_select(0, rows)
    b = bias.index_select(0, sampled) if bias is not None else None
    valid = target != opts.ignore_index
    # every target is sampled, so searchsorted finds its exact position
    local = torch.searchsorted(sampled, torch.where(valid, target, torch.zeros_like(target)))
    return w, b, torch.where(valid, local, torch.full_like(local, -1)), sampled
