"""The op's options as one small dataclass (docs/conventions.md, "Options as one dataclass"), and the dtype rules every backend shares."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

MARGIN_TYPES = ("none", "cosface", "arcface")
REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# arcface clamps the cosine away from +-1 before arccos so that both the value and the derivative
# (sin(theta + m) / sin(theta), with sin(theta) = sqrt(1 - c~^2)) stay finite.
ARCFACE_CLAMP = 1e-7


@dataclass(frozen=True)
class L2SMOptions:
    """Everything about the loss that is not a tensor. Backends receive these as op arguments."""

    normalize_weight: bool = False
    margin_type: str = "none"
    margin: float = 0.0
    ignore_index: int = -100
    label_smoothing: float = 0.0
    eps: float = 1e-12

    def __post_init__(self):
        if not isinstance(self.normalize_weight, bool):
            raise TypeError(f"normalize_weight must be a bool, got {self.normalize_weight!r}")
        if self.margin_type not in MARGIN_TYPES:
            raise ValueError(f"margin_type must be one of {MARGIN_TYPES}, got {self.margin_type!r}")
        if isinstance(self.margin, bool) or not isinstance(self.margin, (int, float)):
            raise TypeError(f"margin must be a float, got {self.margin!r}")
        if not math.isfinite(self.margin) or self.margin < 0:
            raise ValueError(f"margin must be finite and >= 0, got {self.margin!r}")
        if self.margin_type == "none" and self.margin != 0:
            raise ValueError(
                f"margin={self.margin!r} has no effect with margin_type='none'; "
                "pass margin_type='cosface' or 'arcface'"
            )
        if self.margin_type == "arcface" and not self.margin < math.pi:
            raise ValueError(f"arcface margin must be in [0, pi), got {self.margin!r}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {self.ignore_index!r}")
        if isinstance(self.label_smoothing, bool) or not isinstance(self.label_smoothing, (int, float)):
            raise TypeError(f"label_smoothing must be a float, got {self.label_smoothing!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)):
            raise TypeError(f"eps must be a float, got {self.eps!r}")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError(f"eps must be a positive finite float, got {self.eps!r}")
        # normalise numeric types so that op arguments are exactly float / int
        object.__setattr__(self, "margin", float(self.margin))
        object.__setattr__(self, "label_smoothing", float(self.label_smoothing))
        object.__setattr__(self, "eps", float(self.eps))

    def repr_extras(self) -> str:
        """The options that differ from the defaults, for a module's extra_repr (after normalize_weight)."""
        s = ""
        if self.margin_type != "none":
            s += f", margin_type={self.margin_type!r}, margin={self.margin:g}"
        if self.label_smoothing:
            s += f", label_smoothing={self.label_smoothing:g}"
        if self.ignore_index != -100:
            s += f", ignore_index={self.ignore_index}"
        return s

    def op_args(self) -> tuple:
        """The options in the order of the op schemas (ops.py)."""
        return (
            self.normalize_weight,
            self.margin_type,
            self.margin,
            self.ignore_index,
            self.label_smoothing,
            self.eps,
        )


# ---------------------------------------------------------------------------------------------
# the arguments that are not options, checked the same way by the functional API and the modules
# ---------------------------------------------------------------------------------------------
def check_int(name: str, v, minimum: int) -> int:
    """An int (not a bool) >= minimum, else a ValueError naming the argument."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return int(v)


def check_alpha(alpha) -> float:
    """alpha given as a Python number: a real > 0, not a bool (NaN passes: it propagates into the loss)."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a Python number or a 0-d tensor, got {type(alpha).__name__}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0 (the radius of the feature hypersphere), got {alpha!r}")
    return float(alpha)


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_sample_rate(sample_rate) -> float:
    """Partial FC's share of the classes: a real in (0, 1]."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real) or not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    return float(sample_rate)


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype of the loss, the row statistics and every accumulation: float64 if any input is
    float64 (so that gradcheck runs), else float32 (fp16 / bf16 inputs are accumulated in fp32)."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32
