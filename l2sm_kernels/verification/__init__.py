"""Face-verification evaluation with InsightFace's sets and protocols (docs/verification.md).

bin_files.py: read_bin / write_bin (their .bin files, a restricted unpickler, Pillow decoding) and
to_model_input (their input transform, an optional BGR switch); protocols.py: evaluate_pairs (their 10-fold
accuracy and VAL@FAR, to the last digit) and embed_pairs (flip test, XNorm); ijb.py: IJB-style templates,
TAR@FAR in their convention and the library's, 1:N identification on the fused cosine top-k; callback.py:
VerificationCallback for a training loop (rank 0, every N steps).
"""
from .bin_files import VerificationSet, read_bin, to_model_input, write_bin
from .callback import VerificationCallback
from .ijb import identification, pair_scores, tar_at_far, template_features
from .protocols import PairEmbeddings, embed_pairs, evaluate_pairs, normalize_rows

__all__ = ["VerificationSet", "read_bin", "write_bin", "to_model_input", "VerificationCallback", "identification",
           "pair_scores", "tar_at_far", "template_features", "PairEmbeddings", "embed_pairs", "evaluate_pairs",
           "normalize_rows"]
