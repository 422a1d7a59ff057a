"""Shared test setup. The float64 references live in :mod:`bnkit.testing` (the checker,
the benchmarks and the tests use the same ones); they are re-exported here."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

from bnkit.testing import (  # noqa: F401 - re-exported for the tests
    random_input,
    reference_eval,
    reference_running,
    reference_train,
    reference_train_grads,
)

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("BNKIT_HYPOTHESIS_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.load_profile("ci")
torch.set_num_threads(min(2, torch.get_num_threads()))


def reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def cshape(x: torch.Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)
