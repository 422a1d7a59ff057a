"""bnkit: a Batch Normalization toolkit for PyTorch.

A from-scratch, drop-in BatchNorm (``BatchNorm1d/2d/3d``, ``functional``) and tools for
the ways BatchNorm goes wrong in practice.
"""

from bnkit import functional
from bnkit.nn import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
)
from bnkit.nn.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from bnkit.nn.sync import SyncBatchNorm, check_consistency, resync
from bnkit.nn.variants import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    StatsAccumulator,
    accumulate,
)
from bnkit.tools.conform import conform
from bnkit.tools.conventions import from_flax, from_keras, to_flax, to_keras
from bnkit.tools.convert import convert
from bnkit.tools.diagnose import diagnose
from bnkit.tools.fold import fold
from bnkit.tools.freeze import StatsGuard, freeze, frozen_layers, no_stats_update, unfreeze
from bnkit.tools.fuse import fuse_activations, fused_sites
from bnkit.tools.recalibrate import recalibrate
from bnkit.tools.watch import BatchNormWarning, watch

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormWarning",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "StatsAccumulator",
    "accumulate",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "__version__",
    "StatsGuard",
    "SyncBatchNorm",
    "check_consistency",
    "resync",
    "conform",
    "convert",
    "diagnose",
    "fold",
    "fuse_activations",
    "fused_sites",
    "from_flax",
    "from_keras",
    "freeze",
    "frozen_layers",
    "functional",
    "no_stats_update",
    "recalibrate",
    "to_flax",
    "to_keras",
    "unfreeze",
    "watch",
]
