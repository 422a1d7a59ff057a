"""bnkit's layers: what a user puts into a model."""

from bnkit.nn import functional
from bnkit.nn._family import is_batchnorm
from bnkit.nn._kernels import available as fast_path_available
from bnkit.nn._kernels import backend, set_backend
from bnkit.nn.batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
)

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "backend",
    "fast_path_available",
    "functional",
    "is_batchnorm",
    "set_backend",
]
