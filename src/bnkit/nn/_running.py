"""Running statistics: the update rule, the counter, and merges of batch summaries.

``running = (1 - f) * running + f * batch`` per channel, with the *unbiased* batch
variance ``var * n / (n - 1)``, computed in float64 and stored in the buffers' dtype;
``f = momentum``, or for ``momentum=None`` (the cumulative average) ``f = 1 / count``
where ``count`` is ``num_batches_tracked`` after this batch was counted. Batch summaries
(count, mean, biased variance) merge exactly with Chan et al.'s pairwise rule.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["count_batch", "merge_stats", "running_factor", "track_batch", "update_running_stats"]


def merge_stats(
    count_a: int | Tensor,
    mean_a: Tensor,
    var_a: Tensor,
    count_b: int | Tensor,
    mean_b: Tensor,
    var_b: Tensor,
) -> tuple[int | Tensor, Tensor, Tensor]:
    """Chan et al.'s pairwise merge of (count, mean, biased variance) summaries.

    The result is exactly the count, mean and biased variance of the union of the two
    sets of values, whatever their sizes (an empty side is a no-op), without forming
    ``E[x^2] - E[x]^2`` from raw sums.
    """
    count = count_a + count_b
    if isinstance(count, int) and count == 0:
        return count, mean_a, var_a
    wa = count_a / count if not isinstance(count, Tensor) else count_a / count.clamp_min(1)
    wb = count_b / count if not isinstance(count, Tensor) else count_b / count.clamp_min(1)
    delta = mean_b - mean_a
    mean = mean_a + delta * wb
    var = var_a * wa + var_b * wb + delta * delta * wa * wb
    return count, mean, var


def running_factor(momentum: float | None, count: int | Tensor) -> float | Tensor:
    """The weight of the new batch in the running statistics: ``momentum``, or, for
    ``momentum=None`` (the cumulative average), ``1 / count`` where ``count`` is
    ``num_batches_tracked`` after this batch was counted."""
    if momentum is not None:
        return float(momentum)
    if isinstance(count, Tensor):  # float64 except where there is none (MPS)
        return 1.0 / count.to(torch.float32 if count.device.type == "mps" else torch.float64)
    return 1.0 / float(count)


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    n: int,
    factor: float | Tensor,
) -> tuple[Tensor, Tensor]:
    """New running statistics: ``(1 - f) * old + f * batch``, with unbiased batch variance.

    ``var`` is the biased batch variance over ``n`` values per channel; the running
    variance receives ``var * n / (n - 1)``. Computed in float64 (as torch's CPU kernel
    does) and returned in the dtype of the running buffers. Pure: nothing is mutated.
    """
    acc = mean.dtype
    unbiased = var * (n / (n - 1)) if n > 1 else var
    f = factor.to(acc) if isinstance(factor, Tensor) else factor
    new_mean = running_mean.to(acc) * (1 - f) + mean * f
    new_var = running_var.to(acc) * (1 - f) + unbiased * f
    return new_mean.to(running_mean.dtype), new_var.to(running_var.dtype)


def count_batch(m: Any) -> float | Tensor:
    """Count one training batch in ``m.num_batches_tracked`` and return the weight of its
    statistics in the running average: ``momentum``, or ``1 / count`` for
    ``momentum=None`` (the cumulative average). Works on torch's BatchNorm too. Under
    ``torch.compile`` the cumulative weight stays a tensor (reading the counter into a
    Python number would break the graph)."""
    m.num_batches_tracked.add_(1)
    if m.momentum is not None:  # reading the counter is a tensor read: only when needed
        return float(m.momentum)
    if torch.compiler.is_compiling():
        return running_factor(None, m.num_batches_tracked)
    return float(running_factor(None, int(m.num_batches_tracked)))


def track_batch(m: Any, mean: Tensor, var: Tensor, n: int) -> None:
    """The running-statistic update of BatchNorm-like ``m`` (torch's rule, counter
    included) from statistics computed elsewhere: the mean and biased variance of ``n``
    values per channel (SyncBatchNorm's global batch, Ghost/Renorm, accumulate)."""
    if not (m.track_running_stats and m.num_batches_tracked is not None):
        return
    factor = count_batch(m)
    if n == 0 or m.running_mean is None or m.running_var is None:
        return
    with torch.no_grad():
        new_m, new_v = update_running_stats(m.running_mean, m.running_var, mean, var, n, factor)
        m.running_mean.copy_(new_m)
        m.running_var.copy_(new_v)
