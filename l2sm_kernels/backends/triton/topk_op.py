"""Registration of the triton backend's cosine top-k: l2sm::triton_cosine_topk, a torch.library.triton_op
(torch.compile traces into its kernel), with the shared fake kernel (backends/topk.py). Kernel and
launcher: cosine_topk.py."""
import torch

from .. import topk

_LOADED = None


def load():
    """Define and register the op; -> the op."""
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    from .op import DTYPES, triton_library

    triton_op, wrap_triton = triton_library()
    from .common import INTERPRETED
    from .cosine_topk import cosine_topk

    def triton_cosine_topk(queries: torch.Tensor, gallery: torch.Tensor, k: int, normalize_gallery: bool,
                           largest: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        for name, t in (("queries", queries), ("gallery", gallery)):
            if t.dtype not in DTYPES:
                raise TypeError(f"the triton backend takes float16, bfloat16 or float32 {name}, got {t.dtype}")
            if t.device.type != "cuda" and not (INTERPRETED and t.device.type == "cpu"):
                raise ValueError(f"the triton backend takes CUDA tensors (CPU tensors only under "
                                 f"TRITON_INTERPRET=1), got {name} on {t.device}")
        return cosine_topk(queries, gallery, k, normalize_gallery, largest, eps, launch=wrap_triton)

    op = triton_op(topk.topk_name("triton"), triton_cosine_topk, mutates_args=(), schema=topk.TOPK_SCHEMA)
    got = str(op._opoverload._schema).replace("SymInt ", "int ")
    want = str(torch._C.parse_schema(topk.topk_name("triton") + topk.TOPK_SCHEMA))
    if got != want:
        raise RuntimeError(f"triton top-k op schema drifted from topk.py: {got} != {want}")
    topk.register_topk_op(op)
    _LOADED = op
    return op
