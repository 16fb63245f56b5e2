"""nn.Module wrapper: owns the class weights (and optional bias and learnable alpha)."""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .backends.registry import check_backend
from .loss import alpha_lower_bound, l2_softmax_loss
from .options import (L2SMOptions, check_alpha, check_alpha_fits, check_int, check_reduction,
                      check_sample_rate)

_STATE_VERSION = 1

# What a checkpoint's record (the module's "_extra_state") must match to load (docs/class_parallel.md,
# "Model options and schedule options"): the model's identity. Everything else it records (the margin's
# value, label smoothing, sample_rate, margin_grad, ignore_index, eps, the heads' hyperparameters) is
# the training schedule and may differ: the module keeps its own.
# The non-target transform's kind (negatives) is a model option as margin_type is (a CurricularFace head is
# not a plain one); its t (negatives_t, CurricularFace's running average) is schedule, as the margin's value.
MODEL_RECORD = ("class", "in_features", "num_classes")
MODEL_OPTIONS = ("subcenters", "normalize_weight", "margin_type", "negatives")
# what a record from before an option existed stands for
_OPTION_DEFAULTS = {"negatives": "none"}


def checkpoint_record_diffs(state: dict, mine: dict) -> list[str]:
    """The model fields in which a checkpoint's record differs from a module's (empty: it loads)."""
    diffs = [f"{k}: checkpoint {state.get(k)!r}, module {mine[k]!r}" for k in MODEL_RECORD if state.get(k) != mine[k]]
    theirs = state.get("options") or {}
    for k in MODEL_OPTIONS:
        w, v = theirs.get(k, _OPTION_DEFAULTS.get(k)), mine["options"].get(k, _OPTION_DEFAULTS.get(k))
        if w != v:
            diffs.append(f"{k}: checkpoint {w!r}, module {v!r}")
    return diffs


def initial_alpha(alpha) -> float:
    """The value a module starts alpha at: a number > 0, or a 0-d tensor's value (read once, here)."""
    if isinstance(alpha, torch.Tensor):
        if alpha.dim() != 0 or not alpha.is_floating_point():
            raise ValueError(f"alpha must be a number > 0 or a 0-d floating tensor, got {alpha!r}")
        alpha = float(alpha.detach())
    alpha = check_alpha(alpha)
    check_alpha_fits(alpha, torch.float32)  # the module keeps alpha in a float32 buffer / parameter
    return alpha


class L2SoftmaxLoss(nn.Module):
    """L2-constrained softmax loss with its own class-weight matrix (see l2_softmax_loss for the
    options: margins, sub-centers, label smoothing, Partial FC sampling).

    weight (num_classes * subcenters, in_features) is initialized like nn.Linear's (uniform in
    +-1/sqrt(in_features)); bias (when bias=True, one per class) starts at zero.

    alpha: a buffer, or with learn_alpha=True learned as alpha = alpha_min + exp(alpha_raw) (the
    parameter `alpha_raw`; `module.alpha` is that sum): the radius stays above alpha_min > 0 by
    construction, whatever the optimizer does. A plain alpha parameter is pushed down by the margin
    early in training (the target logit alpha (c_y - m) is the smallest while features are random):
    through 0 it flips every logit's sign and the loss keeps falling with 0 % accuracy; held only
    positive it collapses towards 0 (loss log C, nothing learned). alpha_min defaults to the paper's
    lower bound alpha_lower_bound(num_classes) (p = 0.9; 0.5 for num_classes < 3), the smallest radius at
    which a class can reach probability 0.9 at all. The state_dict stores "alpha" (the radius) either
    way, so checkpoints move between learned and fixed alpha and older checkpoints load.

    The options are stored in the state_dict too (its "_extra_state"). Loading a checkpoint of another
    model (another class, in_features, num_classes, sub-centers, normalize_weight or margin_type) is a
    clear error raised before anything is written; the training schedule (the margin's value,
    label smoothing, sample_rate, margin_grad, ignore_index, eps, the heads' hyperparameters) may
    differ, and the module keeps its own (docs/class_parallel.md, "Model options and schedule options").
    To reuse the tensors across a model mismatch on purpose, load them without the record:
    ``m.load_state_dict({k: v for k, v in sd.items() if not k.endswith("_extra_state")}, strict=False)``.

    reset_parameters() sets every parameter and buffer (weight, bias, alpha), so the meta-device /
    FSDP path (to_empty + reset_parameters) gives a fully initialized module.

    max_logits_bytes: the memory dial of l2_softmax_loss (bytes of logits kept between the passes; None:
    the backend's default); set_max_logits_bytes changes it. Not part of the checkpoint's options.

    forward(features (B, in_features), target (B,)) -> loss, see l2_softmax_loss. With sample_rate < 1,
    `last_sampled` holds the classes of the last call's Partial FC sample.

    Random draws (Partial FC's sample, ElasticFace's margins) come from `module.generator`, torch's default
    generator when it is None (the default: an exact resume then restores torch.get_rng_state() as for the
    rest of training). Give the module its own, ``module.generator = torch.Generator(device).manual_seed(s)``,
    and its state travels with the state_dict ("generator_state", a uint8 tensor): loading it restores the
    draws exactly where they were (a module without a generator gets one on its weight's device).
    """

    def __init__(self, in_features: int, num_classes: int, alpha: float = 16.0, learn_alpha: bool = False,
                 bias: bool = False, normalize_weight: bool = False, margin=0.0, margin_type: str = "none",
                 reduction: str = "mean", ignore_index: int = -100, label_smoothing=0.0, subcenters: int = 1,
                 margin_grad: str = "exact", sample_rate: float = 1.0, eps: float = 1e-12, backend: str = "auto",
                 alpha_min: float | None = None, max_logits_bytes: int | None = None, device=None, dtype=None,
                 negatives: str = "none", negatives_t=None):
        super().__init__()
        in_features = check_int("in_features", in_features, 1)
        num_classes = check_int("num_classes", num_classes, 1)
        self._alpha0 = initial_alpha(alpha)
        self.alpha_min = default_alpha_min(num_classes) if alpha_min is None else check_alpha(alpha_min)
        if learn_alpha and not self._alpha0 > self.alpha_min:
            raise ValueError(f"alpha = {self._alpha0:g} must be > alpha_min = {self.alpha_min:g} for a learned alpha "
                             "(alpha_min defaults to the paper's lower bound alpha_lower_bound(num_classes); pass a "
                             "smaller alpha_min to allow it)")
        check_reduction(reduction)
        check_backend(backend)
        self.options = L2SMOptions(normalize_weight=normalize_weight, margin_type=margin_type, margin=margin,
                                   ignore_index=ignore_index, label_smoothing=label_smoothing, eps=eps,
                                   subcenters=subcenters, margin_grad=margin_grad, negatives=negatives,
                                   negatives_t=negatives_t, max_logits_bytes=max_logits_bytes)
        self.in_features, self.num_classes = in_features, num_classes
        self.reduction, self.backend = reduction, backend
        self.sample_rate = check_sample_rate(sample_rate)
        self.generator = None  # Partial FC's (and ElasticFace's) torch.Generator (None: torch's default)
        self.last_sampled = None
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_classes * self.options.subcenters, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_classes, **factory)) if bias else None
        if learn_alpha:
            self.alpha_raw = nn.Parameter(torch.empty((), dtype=torch.float32, device=device))
        else:
            self.register_buffer("alpha", torch.empty((), dtype=torch.float32, device=device))
        self._register_state_hooks()
        self.reset_parameters()

    # --------------------------------------------------------------------------------- alpha
    @property
    def learn_alpha(self) -> bool:
        return "alpha_raw" in self._parameters

    def __getattr__(self, name):
        return getattr_with_alpha(self, name)

    @torch.no_grad()
    def set_alpha(self, value) -> None:
        """Set the radius (a number > 0, > alpha_min when learned, or a 0-d tensor's value)."""
        v = initial_alpha(value)
        if self.learn_alpha:
            if not v > self.alpha_min:
                raise ValueError(f"alpha = {v:g} must be > alpha_min = {self.alpha_min:g} for a learned alpha")
            self.alpha_raw.fill_(math.log(v - self.alpha_min))
        else:
            self.alpha.fill_(v)

    # --------------------------------------------------------------------------------- init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.set_alpha(self._alpha0)

    # --------------------------------------------------------------------------------- options
    def set_margin(self, margin) -> None:
        """A new margin (a margin warm-up schedule). Under torch.compile pass a 0-d tensor: a new tensor
        value every step costs no recompilation (a Python float is specialized once, then traced)."""
        self.options = dataclasses.replace(self.options, margin=margin)

    def set_label_smoothing(self, label_smoothing) -> None:
        """A new label smoothing (a number in [0, 1] or a 0-d tensor; see set_margin)."""
        self.options = dataclasses.replace(self.options, label_smoothing=label_smoothing)

    def set_max_logits_bytes(self, max_logits_bytes) -> None:
        """A new memory dial (None, or an int >= 0: bytes of logits kept between the passes;
        docs/memory_dial.md). Not stored in checkpoints."""
        self.options = dataclasses.replace(self.options, max_logits_bytes=max_logits_bytes)

    def batch_margin(self, features: torch.Tensor, target: torch.Tensor):
        """The margin of this batch (heads that compute per-row margins override it)."""
        return self.options.margin

    def batch_negatives_t(self):
        """The non-target transform's t of this step (CurricularFace passes its running average)."""
        return self.options.negatives_t

    def head_config(self) -> dict:
        """Hyperparameters of a head beyond the loss options (stored with the checkpoint)."""
        return {}

    # --------------------------------------------------------------------------------- forward
    def forward(self, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._loss(features, target, self.batch_margin(features, target), self.reduction)

    def _loss(self, features, target, margin, reduction):
        o = self.options
        sampled = [] if self.sample_rate < 1 else None
        loss = l2_softmax_loss(features, self.weight, target, self.alpha, self.bias,
                               normalize_weight=o.normalize_weight, margin=margin, margin_type=o.margin_type,
                               reduction=reduction, ignore_index=o.ignore_index, label_smoothing=o.label_smoothing,
                               eps=o.eps, subcenters=o.subcenters, margin_grad=o.margin_grad,
                               negatives=o.negatives, negatives_t=self.batch_negatives_t(),
                               sample_rate=self.sample_rate, generator=self.generator, backend=self.backend,
                               max_logits_bytes=o.max_logits_bytes, _sampled=sampled)
        if sampled is not None:
            self.last_sampled = sampled[0]
        return loss

    @torch.no_grad()
    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each feature to each class (B, C), the maximum over a class's
        sub-centers: the natural score of an L2-softmax-trained embedding (verification, open-set and
        anomaly scoring). Builds the (B, C) matrix; see l2sm_kernels.scoring for the fused top-k."""
        x = torch.nn.functional.normalize(features.float(), dim=1)
        w = torch.nn.functional.normalize(self.weight.float(), dim=1)
        cos = x @ w.T
        K = self.options.subcenters
        return cos if K == 1 else cos.view(cos.shape[0], -1, K).amax(dim=2)

    def extra_repr(self) -> str:
        o = self.options
        s = (f"in_features={self.in_features}, num_classes={self.num_classes}, alpha={float(self.alpha.detach()):g}, "
             f"learn_alpha={self.learn_alpha}, bias={self.bias is not None}, "
             f"normalize_weight={o.normalize_weight}{o.repr_extras()}")
        if self.sample_rate < 1:
            s += f", sample_rate={self.sample_rate:g}"
        return s + f", reduction={self.reduction!r}, backend={self.backend!r}"

    # --------------------------------------------------------------------------------- checkpoints
    def get_extra_state(self) -> dict:
        return {"version": _STATE_VERSION, "class": type(self).__name__, "in_features": self.in_features,
                "num_classes": self.num_classes, "options": self.options.to_dict(),
                "sample_rate": self.sample_rate, "head": self.head_config()}

    def check_checkpoint(self, state) -> None:
        """Refuse (RuntimeError) a checkpoint record of another model (MODEL_RECORD, MODEL_OPTIONS);
        called by the load_state_dict pre-hook, before any tensor is written."""
        if not isinstance(state, dict) or "options" not in state:
            raise RuntimeError(f"{type(self).__name__}: the checkpoint's _extra_state is not an l2sm_kernels "
                               f"options record: {state!r}")
        diffs = checkpoint_record_diffs(state, self.get_extra_state())
        if diffs:
            raise RuntimeError(
                f"{type(self).__name__}: the checkpoint is of another model ({'; '.join(diffs)}). "
                "Construct the module with the checkpoint's model options, or load the tensors alone on purpose: "
                "module.load_state_dict({k: v for k, v in sd.items() if not k.endswith('_extra_state')}, "
                "strict=False)")

    def set_extra_state(self, state) -> None:
        self.check_checkpoint(state)

    def _register_state_hooks(self) -> None:
        register_alpha_state_hooks(self, with_options=True)
        register_generator_state_hooks(self)


def getattr_with_alpha(module: nn.Module, name: str):
    """nn.Module.__getattr__, plus `alpha` = alpha_min + exp(alpha_raw) for a learned alpha (> alpha_min
    by construction, differentiable)."""
    if name == "alpha" and "alpha_raw" in module.__dict__.get("_parameters", {}):
        return module._parameters["alpha_raw"].exp() + module.alpha_min
    return nn.Module.__getattr__(module, name)


def default_alpha_min(num_classes: int) -> float:
    """The floor of a learned alpha: the paper's lower bound for target probability 0.9
    (alpha_lower_bound), or 0.5 below 3 classes where the bound is not defined."""
    return alpha_lower_bound(num_classes) if num_classes >= 3 else 0.5


def register_alpha_state_hooks(module: nn.Module, with_options: bool = False) -> None:
    """state_dict hooks of a module with an alpha (buffer, or learned as alpha_min + exp(alpha_raw)):
    the state_dict stores the radius as "alpha" either way; with_options, a checkpoint without the
    module's "_extra_state" (older versions) loads as if it matched."""
    post = getattr(module, "register_state_dict_post_hook", None) or module._register_state_dict_hook
    post(_save_alpha_as_radius)
    hook = _load_alpha_and_options if with_options else _load_alpha
    pre = getattr(module, "register_load_state_dict_pre_hook", None)
    if pre is not None:
        pre(hook)
    else:  # older torch: the private form with the module as the first argument
        module._register_load_state_dict_pre_hook(hook, with_module=True)


def register_generator_state_hooks(module: nn.Module) -> None:
    """state_dict hooks that save `module.generator`'s state as "generator_state" (when the module has a
    generator) and restore it on load, so a run with the module's own generator resumes exactly."""
    post = getattr(module, "register_state_dict_post_hook", None) or module._register_state_dict_hook
    post(_save_generator_state)
    pre = getattr(module, "register_load_state_dict_pre_hook", None)
    if pre is not None:
        pre(_load_generator_state)
    else:  # older torch: the private form with the module as the first argument
        module._register_load_state_dict_pre_hook(_load_generator_state, with_module=True)


def _save_generator_state(module, state_dict, prefix, local_metadata):
    g = module.__dict__.get("generator")
    if g is not None:
        state_dict[prefix + "generator_state"] = g.get_state()


def _load_generator_state(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                          error_msgs):
    """load_state_dict pre-hook: "generator_state" (popped, so it is no unexpected key) sets the module's
    generator (created on the weight's device if the module has none)."""
    key = prefix + "generator_state"
    if key not in state_dict:
        return
    st = state_dict.pop(key)
    g = module.__dict__.get("generator")
    if g is None:
        g = torch.Generator(device=module.weight.device)
    try:
        g.set_state(st.detach().to("cpu", torch.uint8))
    except (RuntimeError, TypeError) as e:
        raise RuntimeError(f"{type(module).__name__}: the checkpoint's generator_state does not fit the module's "
                           f"generator on {g.device} ({e}); set module.generator to a generator of the device the "
                           "checkpoint was saved on") from None
    module.generator = g


def _save_alpha_as_radius(module, state_dict, prefix, local_metadata):
    """state_dict post-hook: a learned alpha is saved as the radius under "alpha" (not alpha_raw)."""
    key = prefix + "alpha_raw"
    if key in state_dict:
        state_dict[prefix + "alpha"] = state_dict.pop(key).detach().exp() + module.alpha_min


def _load_alpha_and_options(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                            error_msgs):
    """load_state_dict pre-hook: the checkpoint's record checked (module.check_checkpoint) before any
    tensor is written, then _load_alpha; a checkpoint from before the options were stored (no
    "_extra_state") loads as if it matched."""
    extra = prefix + "_extra_state"
    if extra in state_dict:
        module.check_checkpoint(state_dict[extra])
    _load_alpha(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
    if extra not in state_dict:
        state_dict[extra] = module.get_extra_state()


def _load_alpha(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """load_state_dict pre-hook: "alpha" (the radius) becomes alpha_raw for a learned alpha (a radius
    not above alpha_min, e.g. from a run whose plain alpha went negative, is refused)."""
    key = prefix + "alpha"
    if module.learn_alpha and key in state_dict:
        a = state_dict.pop(key)
        if not bool((a > module.alpha_min).all()):
            raise RuntimeError(f"{type(module).__name__}: the checkpoint's alpha = {float(a):g} is not above "
                               f"alpha_min = {module.alpha_min:g}; a learned alpha is alpha_min + exp(alpha_raw)")
        state_dict[prefix + "alpha_raw"] = torch.log(a.detach().double() - module.alpha_min).to(torch.float32)
