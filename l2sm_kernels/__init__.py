"""l2sm_kernels: the L2-constrained softmax loss, fused (normalize, class product and softmax
cross-entropy in one pass over the classes, hand-written backward, no B x C logits)."""
from .backends import available_backends
from .loss import alpha_lower_bound, l2_softmax_loss
from .module import L2SoftmaxLoss
from .options import L2SMOptions
from .reference import l2_softmax_loss_ref

__version__ = "0.1.0"

__all__ = [
    "L2SMOptions",
    "L2SoftmaxLoss",
    "alpha_lower_bound",
    "available_backends",
    "l2_softmax_loss",
    "l2_softmax_loss_ref",
]
