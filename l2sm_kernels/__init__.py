"""l2sm_kernels: the L2-constrained softmax loss, fused (normalize, class product and softmax
cross-entropy in one pass over the classes, hand-written backward, no B x C logits beyond what the
memory dial max_logits_bytes lets it keep; docs/memory_dial.md).

What a user imports lives here: l2_softmax_loss (loss.py), L2SoftmaxLoss (loss_module.py), the
face-recognition heads (heads.py: ArcFace, CosFace, combined, AdaFace, MagFace, ElasticFace,
CurricularFace, MV-Softmax), L2SMOptions (options.py), the float64 reference (reference.py), available_backends.
The backends are in
l2sm_kernels.backends, class-parallel training in l2sm_kernels.distributed, the helpers tests and
benchmarks share in l2sm_kernels.testing. l2sm_kernels.cpu is the cpu backend's module
(l2sm_kernels.backends.cpu: its workspace knobs).
"""
import sys as _sys

from .backends import available_backends
from .backends import cpu as _cpu_backend
from .heads import (AdaFaceLoss, ArcFaceLoss, CombinedMarginLoss, CosFaceLoss, CurricularFaceLoss, ElasticFaceLoss,
                    MagFaceLoss, MVSoftmaxLoss)
from .loss import alpha_lower_bound, l2_softmax_loss
from .loss_module import L2SoftmaxLoss
from .options import L2SMOptions
from .reference import l2_softmax_loss_ref

# `import l2sm_kernels.cpu` (the workspace knobs, set_chunk_classes & co.) keeps working: the module
# lives in backends/ now
_sys.modules.setdefault(__name__ + ".cpu", _cpu_backend)

__version__ = "0.1.0"

__all__ = [
    "AdaFaceLoss",
    "ArcFaceLoss",
    "CombinedMarginLoss",
    "CosFaceLoss",
    "CurricularFaceLoss",
    "ElasticFaceLoss",
    "MVSoftmaxLoss",
    "MagFaceLoss",
    "L2SMOptions",
    "L2SoftmaxLoss",
    "alpha_lower_bound",
    "available_backends",
    "l2_softmax_loss",
    "l2_softmax_loss_ref",
]

# Scoring with the trained embeddings (scoring.py; docs/design.md, "Scoring"): the fused cosine top-k, the
# scores built on it, and the verification metrics (l2sm_kernels.metrics)
from . import metrics  # noqa: E402
from .scoring import (cosine_topk, knn_anomaly_score, knn_cosine, max_cosine, verification_histogram,  # noqa: E402
                      verification_pair_chunks, verification_scores, weight_anomaly_score)

__all__ += ["cosine_topk", "knn_anomaly_score", "knn_cosine", "max_cosine", "metrics", "verification_histogram",
            "verification_pair_chunks", "verification_scores", "weight_anomaly_score"]
