"""cuda_bn: BatchNorm in Triton — forward, backward, running statistics, channels_last, fused
activation and cross-process sync (``kernels`` → ``ops`` → ``module``; ``reference`` is the spec)."""

from normlab.ops.batchnorm.module import BACKENDS, CudaBatchNorm
from normlab.ops.batchnorm.ops import batch_norm, sync_batch_norm
from normlab.ops.batchnorm.reference import batch_norm_reference

__all__ = ["BACKENDS", "CudaBatchNorm", "batch_norm", "batch_norm_reference", "sync_batch_norm"]
