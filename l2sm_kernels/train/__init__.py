"""The training recipe (`python -m l2sm_kernels.train`, docs/training.md): an arcface_torch-style loop with
a DDP backbone and the class-parallel head. loop.py: the command and the loop; backbone.py: iresnet-style
backbones (or any torchvision-style model); data.py: synthetic and ImageFolder data, a synthetic
verification set; checkpoint.py: per-rank checkpoints that resume at any world size."""
from .loop import lr_at, main, parse_args

__all__ = ["main", "parse_args", "lr_at"]
