"""One fixed random state for forwards that are compared with each other."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def seeded(seed: int = 0) -> Iterator[None]:
    """Run with the random state ``manual_seed(seed)`` gives, the caller's state restored
    afterwards (CPU, and the CUDA devices when CUDA is in use). Two forwards of a model that
    draws random numbers (dropout in train mode, sampled attention in eval) under it draw the
    same numbers, so a comparison of their outputs sees only what else differs."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
