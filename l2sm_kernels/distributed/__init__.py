"""Class-parallel training over torch.distributed: the class matrix sharded over the ranks
(class_parallel.py). `from l2sm_kernels.distributed import ClassParallelL2SoftmaxLoss`."""
from .class_parallel import (ClassParallelL2SoftmaxLoss, class_parallel_l2_softmax_loss, partial_fc_sample,
                             shard_sizes)

__all__ = ["class_parallel_l2_softmax_loss", "partial_fc_sample", "shard_sizes", "ClassParallelL2SoftmaxLoss"]
