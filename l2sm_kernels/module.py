"""nn.Module wrapper: owns the class weights (and optional bias and learnable alpha)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .backends.registry import check_backend
from .loss import l2_softmax_loss
from .options import L2SMOptions, check_alpha, check_int, check_reduction


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
        in_features = check_int("in_features", in_features, 1)
        num_classes = check_int("num_classes", num_classes, 1)
        alpha = check_alpha(alpha)
        check_reduction(reduction)
        check_backend(backend)
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
