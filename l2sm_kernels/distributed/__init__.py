"""Class-parallel training over torch.distributed: the class matrix sharded over the ranks.
class_parallel.py: the function (class_parallel_l2_softmax_loss); class_parallel_module.py: the module
(ClassParallelL2SoftmaxLoss); agreement.py: the ranks' agreement check; collectives.py: the
collectives and their gradients; rank_device.py: the rank's CUDA device under NCCL. `from l2sm_kernels.distributed import ClassParallelL2SoftmaxLoss`."""
from .class_parallel import class_parallel_l2_softmax_loss, partial_fc_sample, shard_sizes
from .class_parallel_module import ClassParallelCurricularFaceLoss, ClassParallelL2SoftmaxLoss

__all__ = ["class_parallel_l2_softmax_loss", "partial_fc_sample", "shard_sizes", "ClassParallelCurricularFaceLoss",
           "ClassParallelL2SoftmaxLoss"]

# the face-recognition heads class-parallel (class_parallel_heads.py)
from .class_parallel_heads import (ClassParallelAdaFaceLoss, ClassParallelArcFaceLoss,  # noqa: E402
                                   ClassParallelCombinedMarginLoss, ClassParallelCosFaceLoss,
                                   ClassParallelElasticFaceLoss, ClassParallelMagFaceLoss,
                                   ClassParallelMVSoftmaxLoss)

__all__ += ["ClassParallelAdaFaceLoss", "ClassParallelArcFaceLoss", "ClassParallelCombinedMarginLoss",
            "ClassParallelCosFaceLoss", "ClassParallelElasticFaceLoss", "ClassParallelMagFaceLoss",
            "ClassParallelMVSoftmaxLoss"]
