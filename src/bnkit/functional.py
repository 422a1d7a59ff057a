"""``bnkit.functional``: the functional forms (an alias of :mod:`bnkit.nn.functional`)."""

from bnkit.nn.functional import (
    BatchNormState,
    batch_norm,
    batch_norm_stateless,
    batch_stats,
    merge_stats,
    update_running_stats,
)

__all__ = [
    "BatchNormState",
    "batch_norm",
    "batch_norm_stateless",
    "batch_stats",
    "merge_stats",
    "update_running_stats",
]
