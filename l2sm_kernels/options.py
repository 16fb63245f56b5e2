"""The op's options as one small dataclass (docs/conventions.md, "Options as one dataclass"), the
argument checks the functional API and the modules share, and the dtype rules every backend shares.

The margin family (docs/design.md, "The margins"). Every margin is reduced to InsightFace's combined
form on the target column, f(c) = cos(arccos(c) + m2) - m3 (m1 = 1), before it reaches a backend:
    "none"      m2 = m3 = 0
    "cosface"   margin = m3            (c - m3)
    "arcface"   margin = m2            (cos(arccos c + m2), with the monotonic fallback)
    "combined"  margin = (m1, m2, m3)  m1 must be 1.0
m2 and m3 are each a Python number or a floating tensor, 0-d (one value; a schedule under
torch.compile) or (B,) (one value per row: ElasticFace, AdaFace, MagFace). A number equal to 0 drops
out, so (1, m, 0) is "arcface" and (1, 0, m) is "cosface" exactly. The op sees the margin kind
("none", "additive" when m2 is absent, "angular") and a per-row table (margins.margin_table).

Floats may be symbolic under torch.compile(dynamic=True): the checks below compare rather than call
math.isfinite or float(), so they trace (as guards) instead of breaking the graph.

The non-target transform (docs/design.md, "The non-target transforms"; docs/non_target_heads.md):
`negatives` reshapes the non-target cosines c_ij (j != y_i) of row i, before the scale alpha, using
the row's margined target cosine f_i = f(c_iy) as the "hard" threshold:
    "none"        c
    "mv"          t c + t - 1   where c > f_i   (MV-Softmax, fixed t >= 1, e.g. 1.2)
    "curricular"  c (t + c)     where c > f_i   (CurricularFace, t the head's running average)
    "filter"      0             where c > t     (InsightFace's inter-class filtering)
The mask is a constant and t is detached (as the papers' code); negatives_t is a number or a 0-d
tensor. The op sees the kind and a (R, 2) table (margins.negatives_table).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch

MARGIN_TYPES = ("none", "cosface", "arcface", "combined")
MARGIN_GRADS = ("exact", "detached")
MARGIN_KINDS = ("none", "additive", "angular")
NEGATIVES = ("none", "mv", "curricular", "filter")
# negatives_t when not given: MV-Softmax's fixed t = 1.2 (Wang et al. 2020, its face experiments);
# CurricularFace's t starts at 0 (Huang et al. 2020). "filter" has no default: its threshold is a choice.
NEGATIVES_T_DEFAULT = {"mv": 1.2, "curricular": 0.0}
REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# the angular margin clamps the cosine away from +-1 before arccos so that both the value and the
# derivative (sin(theta + m2) / sin(theta), with sin(theta) = sqrt(1 - c~^2)) stay finite.
ARCFACE_CLAMP = 1e-7


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _as_float(v):
    """A Python float from a real number (numpy scalars included); a float (also a symbolic one under
    torch.compile, which must not be specialized by float()) is returned as it is."""
    return v if isinstance(v, float) else float(v)


def _finite(v) -> bool:
    return -math.inf < v < math.inf  # comparisons, not math.isfinite: they trace under torch.compile


def _check_margin_value(name: str, v, upper: bool = False):
    """A margin given as a number (finite, >= 0, < upper) or as a floating tensor (0-d or 1-d; its
    values are not checked: that would synchronize with the device)."""
    if isinstance(v, torch.Tensor):
        if not v.is_floating_point():
            raise TypeError(f"{name} must be a number or a floating-point tensor, got a {v.dtype} tensor")
        if v.dim() > 1:
            raise ValueError(f"{name} as a tensor must be 0-d or (batch,), got shape {tuple(v.shape)}")
        return v
    if not _is_number(v):
        raise TypeError(f"{name} must be a number or a floating-point tensor, got {v!r}")
    if not (_finite(v) and v >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {v!r}")
    if upper and not v < math.pi:
        raise ValueError(f"{name} must be in [0, pi), got {v!r}")
    return _as_float(v)


def _is_zero(v) -> bool:
    return not isinstance(v, torch.Tensor) and v == 0


@dataclass(frozen=True, eq=False)
class L2SMOptions:
    """Everything about the loss that is not an input tensor. Backends receive op_args() as op
    arguments and op_tensors() (the margin table, the label smoothing) as op inputs.

    margin: a number, or a floating tensor (0-d or (B,)) for "cosface" / "arcface"; (m1, m2, m3) for
        "combined" (m1 = 1.0; m2, m3 numbers or tensors). Numbers: >= 0, m2 < pi.
    label_smoothing: a number in [0, 1] or a 0-d floating tensor (a schedule).
    subcenters: K >= 1 sub-centers per class (the weight has num_classes * K rows).
    margin_grad: "exact" (the margin function's derivative) or "detached" (as InsightFace: the
        gradient w.r.t. the target cosine as if the margin were the identity).
    margin_fallback: True (the default): past arccos(c) + m2 >= pi the angular margin switches to
        the monotonic fallback c - m2 sin(m2) - m3; False: cos(arccos(c~) + m2) - m3 on every target
        cosine, as InsightFace's CombinedMarginLoss (l2sm_kernels.compat.arcface_torch). Only the
        margin table's threshold differs (margins.margin_table), so every backend serves both.
    negatives: the non-target transform, "none" | "mv" | "curricular" | "filter" (module docstring).
    negatives_t: its t, a finite number (>= 1 for "mv") or a 0-d floating tensor (not checked: no
        host sync); None: the kind's default (mv 1.2, curricular 0.0; "filter" needs one).
    max_logits_bytes: the memory dial (docs/memory_dial.md): the most bytes of logits the op may keep
        between its forward and backward passes; an int >= 0, or None for the backend's default.
        0 recomputes every logit in the backward (constant memory); B x C K x element size or more
        keeps them all (3 GEMMs instead of 4). It changes memory and time, never the loss's value
        beyond rounding, so it is not part of a checkpoint's options record (to_dict).
    """

    normalize_weight: bool = False
    margin_type: str = "none"
    margin: object = 0.0
    ignore_index: int = -100
    label_smoothing: object = 0.0
    eps: float = 1e-12
    subcenters: int = 1
    margin_grad: str = "exact"
    margin_fallback: bool = True
    negatives: str = "none"
    negatives_t: object = None
    max_logits_bytes: int | None = None

    def __post_init__(self):
        set_ = object.__setattr__
        if not isinstance(self.normalize_weight, bool):
            raise TypeError(f"normalize_weight must be a bool, got {self.normalize_weight!r}")
        if self.margin_type not in MARGIN_TYPES:
            raise ValueError(f"margin_type must be one of {MARGIN_TYPES}, got {self.margin_type!r}")
        set_(self, "margin", self._checked_margin(self.margin_type, self.margin))
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an int, got {self.ignore_index!r}")
        set_(self, "ignore_index", int(self.ignore_index))
        s = self.label_smoothing
        if isinstance(s, torch.Tensor):
            if not s.is_floating_point() or s.dim() != 0:
                raise ValueError(f"label_smoothing as a tensor must be a 0-d floating tensor, got {s.dtype} "
                                 f"of shape {tuple(s.shape)}")
        else:
            if not _is_number(s):
                raise TypeError(f"label_smoothing must be a number in [0, 1] or a 0-d tensor, got {s!r}")
            if not 0.0 <= s <= 1.0:
                raise ValueError(f"label_smoothing must be in [0, 1], got {s!r}")
            set_(self, "label_smoothing", _as_float(s))
        if not _is_number(self.eps):
            raise TypeError(f"eps must be a float, got {self.eps!r}")
        if not (self.eps > 0 and _finite(self.eps)):
            raise ValueError(f"eps must be a positive finite float, got {self.eps!r}")
        set_(self, "eps", _as_float(self.eps))
        set_(self, "subcenters", check_int("subcenters", self.subcenters, 1))
        if self.margin_grad not in MARGIN_GRADS:
            raise ValueError(f"margin_grad must be one of {MARGIN_GRADS}, got {self.margin_grad!r}")
        if not isinstance(self.margin_fallback, bool):
            raise TypeError(f"margin_fallback must be a bool, got {self.margin_fallback!r}")
        set_(self, "negatives_t", self._checked_negatives(self.negatives, self.negatives_t))
        set_(self, "max_logits_bytes", check_max_logits_bytes(self.max_logits_bytes))

    @staticmethod
    def _checked_negatives(kind, t):
        if kind not in NEGATIVES:
            raise ValueError(f"negatives must be one of {NEGATIVES}, got {kind!r}")
        if kind == "none":
            if t is not None:
                raise ValueError(f"negatives_t={t!r} has no effect with negatives='none'; "
                                 "pass negatives='mv', 'curricular' or 'filter'")
            return None
        if t is None:
            if kind not in NEGATIVES_T_DEFAULT:
                raise ValueError(f"negatives={kind!r} needs negatives_t (the threshold above which a "
                                 "non-target cosine is set to 0)")
            return NEGATIVES_T_DEFAULT[kind]
        if isinstance(t, torch.Tensor):
            if not t.is_floating_point() or t.dim() != 0:
                raise ValueError(f"negatives_t as a tensor must be a 0-d floating tensor, got {t.dtype} "
                                 f"of shape {tuple(t.shape)}")
            return t
        if not _is_number(t):
            raise TypeError(f"negatives_t must be a number or a 0-d floating tensor, got {t!r}")
        if not _finite(t):
            raise ValueError(f"negatives_t must be finite, got {t!r}")
        if kind == "mv" and not t >= 1:
            raise ValueError(f"negatives_t must be >= 1 for negatives='mv' (t c + t - 1 >= c on the hard "
                             f"negatives), got {t!r}")
        return _as_float(t)

    @staticmethod
    def _checked_margin(margin_type: str, margin):
        if margin_type == "none":
            if isinstance(margin, torch.Tensor) or not _is_number(margin) or margin != 0:
                raise ValueError(
                    f"margin={margin!r} has no effect with margin_type='none'; "
                    "pass margin_type='cosface', 'arcface' or 'combined'"
                )
            return 0.0
        if margin_type == "cosface":
            return _check_margin_value("margin", margin)
        if margin_type == "arcface":
            return _check_margin_value("arcface margin", margin, upper=True)
        # combined: InsightFace's margin_list (m1, m2, m3)
        if isinstance(margin, torch.Tensor) or not isinstance(margin, (tuple, list)) or len(margin) != 3:
            raise TypeError(f"margin_type='combined' takes margin=(m1, m2, m3), got {margin!r}")
        m1, m2, m3 = margin
        if isinstance(m1, torch.Tensor) or not _is_number(m1):
            raise TypeError(f"margin m1 must be the number 1.0, got {m1!r}")
        if m1 != 1:
            raise ValueError(
                f"margin m1 = {m1!r}: multiplicative angular margins (SphereFace, m1 != 1) are not supported; "
                "use m1 = 1.0 with m2 (additive angular) and m3 (additive cosine)"
            )
        return (1.0, _check_margin_value("margin m2", m2, upper=True), _check_margin_value("margin m3", m3))

    def _key(self) -> tuple:
        """The fields, tensors by identity (their values are per call and may live on a device)."""
        def k(v):
            if isinstance(v, tuple):
                return tuple(k(u) for u in v)
            return ("tensor", id(v)) if isinstance(v, torch.Tensor) else v
        return tuple(k(getattr(self, f.name)) for f in dataclasses.fields(self))

    def __eq__(self, other):
        if not isinstance(other, L2SMOptions):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    # ------------------------------------------------------------------------------- derived
    def margin_parts(self):
        """(m2, m3): each a float, a tensor, or None where the margin has no such part (a number 0
        counts as absent, so that equal margins take the same code path in every backend)."""
        t, m = self.margin_type, self.margin
        if t == "none":
            m2, m3 = None, None
        elif t == "cosface":
            m2, m3 = None, m
        elif t == "arcface":
            m2, m3 = m, None
        else:
            m2, m3 = m[1], m[2]
        return (None if m2 is None or _is_zero(m2) else m2), (None if m3 is None or _is_zero(m3) else m3)

    @property
    def margin_kind(self) -> str:
        """What the op computes on the target column: "none" (c), "additive" (c - m3), "angular"."""
        m2, m3 = self.margin_parts()
        if m2 is not None:
            return "angular"
        return "none" if m3 is None else "additive"

    @property
    def smoothing_on(self) -> bool:
        s = self.label_smoothing
        return isinstance(s, torch.Tensor) or s != 0

    def has_tensors(self) -> bool:
        m = self.margin if isinstance(self.margin, tuple) else (self.margin,)
        return any(isinstance(v, torch.Tensor) for v in m + (self.label_smoothing, self.negatives_t))

    def repr_extras(self) -> str:
        """The options that differ from the defaults, for a module's extra_repr (after normalize_weight)."""
        s = ""
        if self.margin_type != "none":
            m = self.margin
            shown = tuple(_short(v) for v in m) if isinstance(m, tuple) else _short(m)
            s += f", margin_type={self.margin_type!r}, margin={shown}"
        if self.subcenters != 1:
            s += f", subcenters={self.subcenters}"
        if self.margin_grad != "exact":
            s += f", margin_grad={self.margin_grad!r}"
        if not self.margin_fallback:
            s += ", margin_fallback=False"
        if isinstance(self.label_smoothing, torch.Tensor) or self.label_smoothing:
            s += f", label_smoothing={_short(self.label_smoothing)}"
        if self.ignore_index != -100:
            s += f", ignore_index={self.ignore_index}"
        if self.negatives != "none":
            s += f", negatives={self.negatives!r}, negatives_t={_short(self.negatives_t)}"
        if self.max_logits_bytes is not None:
            s += f", max_logits_bytes={self.max_logits_bytes}"
        return s

    def to_dict(self) -> dict:
        """The options as plain Python values (a checkpoint's record): a 0-d tensor as its value (read
        on the host: a checkpoint is not a training step), a per-row (B,) tensor as "per-row".
        max_logits_bytes is left out: a memory setting, not a property of the loss, so a checkpoint
        loads whatever budget either side runs with."""
        def plain(v):
            if isinstance(v, tuple):
                return [plain(u) for u in v]
            if isinstance(v, torch.Tensor):
                return float(v.detach()) if v.dim() == 0 else "per-row"
            return v

        d = {"normalize_weight": self.normalize_weight, "margin_type": self.margin_type,
             "margin": plain(self.margin), "ignore_index": self.ignore_index,
             "label_smoothing": plain(self.label_smoothing), "eps": self.eps, "subcenters": self.subcenters,
             "margin_grad": self.margin_grad, "negatives": self.negatives, "negatives_t": plain(self.negatives_t)}
        if not self.margin_fallback:  # recorded only when set, so that older checkpoints still compare equal
            d["margin_fallback"] = False
        return d

    def op_args(self) -> tuple:
        """The static options in the order of the op schemas (backends/contract.py): normalize_weight,
        margin_kind, margin_detached, subcenters, ignore_index, eps, negatives, max_logits_bytes."""
        return (self.normalize_weight, self.margin_kind, self.margin_grad == "detached", self.subcenters,
                self.ignore_index, self.eps, self.negatives, self.max_logits_bytes)

    def op_arguments(self, batch: int, device, thresholds=None) -> tuple:
        """Everything an op call takes after (x, weight, target, alpha, bias) and before the need flags:
        op_tensors() then op_args()."""
        return self.op_tensors(batch, device, thresholds) + self.op_args()

    def op_tensors(self, batch: int, device, thresholds=None) -> tuple:
        """The per-call op inputs: (margin table (R, 5) float64 or None, label smoothing 0-d float64 or
        None, negatives table (R, 2) float64 or None); see margins.margin_table / negatives_table
        (thresholds: per-row hard thresholds given from outside, the class-parallel loss's). No host
        synchronization; traces under torch.compile."""
        from .margins import margin_table, negatives_table, smoothing_tensor

        m2, m3 = self.margin_parts()
        table = None if (m2 is None and m3 is None) else margin_table(m2, m3, batch, device,
                                                                       fallback=self.margin_fallback)
        neg = negatives_table(self.negatives, self.negatives_t, device, thresholds)
        return table, smoothing_tensor(self.label_smoothing, device), neg


def _short(v):
    if isinstance(v, torch.Tensor):
        return f"<tensor {tuple(v.shape)}>"
    return float(f"{v:.6g}") if isinstance(v, float) else v


# ---------------------------------------------------------------------------------------------
# the arguments that are not options, checked the same way by the functional API and the modules
# ---------------------------------------------------------------------------------------------
def check_int(name: str, v, minimum: int) -> int:
    """An int (not a bool; numpy integers too) >= minimum, else a ValueError naming the argument."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return int(v)


# The largest budget passed to the op (its schema's int is int64): any value from B x C K x element
# size up means "keep everything", so larger ones are clamped to this, which no tensor reaches.
MAX_LOGITS_BYTES = 1 << 62


def check_max_logits_bytes(v):
    """The memory dial: None (the backend's default) or an int >= 0 (numpy integers too; not a bool, not
    a float, not NaN), clamped to MAX_LOGITS_BYTES; a TypeError / ValueError naming the argument otherwise."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"max_logits_bytes must be None or an int >= 0 (bytes of logits kept between the passes), "
                        f"got {v!r}")
    if v < 0:
        raise ValueError(f"max_logits_bytes must be None or an int >= 0 (0: keep nothing, recompute), got {v!r}")
    return min(int(v), MAX_LOGITS_BYTES)


def check_alpha(alpha) -> float:
    """alpha given as a Python number: a real > 0, not a bool (NaN passes: it propagates into the loss)."""
    if not _is_number(alpha):
        raise TypeError(f"alpha must be a Python number or a 0-d tensor, got {type(alpha).__name__}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0 (the radius of the feature hypersphere), got {alpha!r}")
    if alpha == math.inf:  # every logit infinite: the loss would be inf - inf = NaN, silently
        raise ValueError(f"alpha must be finite (the radius of the feature hypersphere), got {alpha!r}")
    return _as_float(alpha)


def check_alpha_fits(alpha, dtype: torch.dtype) -> None:
    """alpha given as a Python number must be representable in the dtype it is computed in (float32 for
    float32 / float16 / bfloat16 inputs): 1e39 would overflow to inf there (the loss NaN), so it is an
    error naming alpha. (A NaN alpha passes: it propagates into the loss.)"""
    big = torch.finfo(dtype).max
    if alpha > big:
        raise ValueError(f"alpha = {alpha!r} overflows {dtype} (largest {big:.4g}), the dtype the loss is computed "
                         "in for these inputs; pass a smaller alpha (the paper's radii are 10-100) or float64 inputs")


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_sample_rate(sample_rate) -> float:
    """Partial FC's share of the classes: a real in (0, 1]."""
    if not _is_number(sample_rate) or not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    return _as_float(sample_rate)


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype of the loss, the row statistics and every accumulation: float64 if any input is
    float64 (so that gradcheck runs), else float32 (fp16 / bf16 inputs are accumulated in fp32)."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32
