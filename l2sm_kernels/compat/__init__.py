"""Drop-in layers and checkpoint tools for code written against other face-recognition libraries.

arcface_torch: InsightFace's recognition/arcface_torch (PartialFC_V2, CombinedMarginLoss) on this
library's fused op and class-parallel loss (docs/arcface_torch.md). checkpoints: their per-rank
head checkpoints into this library's modules at any world size; `python -m l2sm_kernels.compat.reshard`
re-splits them from N files to M.
"""
from .arcface_torch import CombinedMarginLoss, PartialFC_V2

__all__ = ["CombinedMarginLoss", "PartialFC_V2"]
