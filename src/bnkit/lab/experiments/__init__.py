"""One module per experiment. Each exposes ``NAME``, ``TITLE`` and ``run(ctx) -> Section``."""

from __future__ import annotations

from bnkit.lab.experiments import (
    batch_size,
    conformance,
    cost,
    freezing,
    layer_stats,
    running_stats,
    scratch_vs_builtin,
    small_batch,
    throughput,
    with_without,
)

ALL = [
    with_without,
    scratch_vs_builtin,
    throughput,
    running_stats,
    layer_stats,
    freezing,
    batch_size,
    small_batch,
    conformance,
    cost,
]
NAMES = [m.NAME for m in ALL]

__all__ = ["ALL", "NAMES"]
