"""nn.Module wrapper: owns the class weights (and optional bias and learnable alpha)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .backends import BACKEND_CHOICES
from .loss import l2_softmax_loss
from .options import REDUCTIONS, L2SMOptions


class L2SoftmaxLoss(nn.Module):
    """L2-constrained softmax loss with its own class-weight matrix.

    weight (num_classes, in_features) is initialized like nn.Linear's (uniform in
    +-1/sqrt(in_features)); bias (when bias=True) starts at zero. alpha is an nn.Parameter when
    learn_alpha, else a buffer; both are saved in the state_dict.

    forward(features (B, in_features), target (B,)) -> loss, see l2_softmax_loss.
    """

    def __init__(self, in_features: int, num_classes: int, alpha: float = 16.0, learn_alpha: bool = False,
                 bias: bool = False, normalize_weight: bool = False, margin: float = 0.0,
                 margin_type: str = "none", reduction: str = "mean", ignore_index: int = -100,
                 label_smoothing: float = 0.0, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        if in_features < 1 or num_classes < 1:
            raise ValueError(f"in_features and num_classes must be >= 1, got {in_features}, {num_classes}")
        if not (isinstance(alpha, (int, float)) and alpha > 0):
            raise ValueError(f"alpha must be a number > 0, got {alpha!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if backend not in BACKEND_CHOICES:
            raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
        self.options = L2SMOptions(normalize_weight=normalize_weight, margin_type=margin_type, margin=margin,
                                   ignore_index=ignore_index, label_smoothing=label_smoothing)
        self.in_features, self.num_classes = in_features, num_classes
        self.reduction, self.backend = reduction, backend
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_classes, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_classes, **factory)) if bias else None
        alpha_t = torch.tensor(float(alpha), dtype=torch.float32, device=device)
        if learn_alpha:
            self.alpha = nn.Parameter(alpha_t)
        else:
            self.register_buffer("alpha", alpha_t)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        o = self.options
        return l2_softmax_loss(features, self.weight, target, self.alpha, self.bias,
                               normalize_weight=o.normalize_weight, margin=o.margin, margin_type=o.margin_type,
                               reduction=self.reduction, ignore_index=o.ignore_index,
                               label_smoothing=o.label_smoothing, eps=o.eps, backend=self.backend)

    @torch.no_grad()
    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each feature to each class weight (B, C): the natural score of an
        L2-softmax-trained embedding (verification, open-set and anomaly scoring)."""
        x = torch.nn.functional.normalize(features.float(), dim=1)
        w = torch.nn.functional.normalize(self.weight.float(), dim=1)
        return x @ w.T

    def extra_repr(self) -> str:
        o = self.options
        s = (f"in_features={self.in_features}, num_classes={self.num_classes}, alpha={float(self.alpha.detach()):g}, "
             f"learn_alpha={isinstance(self.alpha, nn.Parameter)}, bias={self.bias is not None}, "
             f"normalize_weight={o.normalize_weight}{o.repr_extras()}")
        return s + f", reduction={self.reduction!r}, backend={self.backend!r}"
