"""Small models for the experiments, each with a choice of normalization layer."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

import bnkit

__all__ = ["BN_KINDS", "mlp", "lenet", "bn_factory"]

BN_KINDS = ("bnkit", "torch", "none", "renorm", "groupnorm")


def bn_factory(kind: str, dims: int, **kwargs: object) -> Callable[[int], nn.Module]:
    """A constructor ``f(channels)`` for BatchNorm{dims}d of the given kind.

    ``kind`` is ``"bnkit"``, ``"torch"`` or ``"none"`` (identity).
    """
    if kind == "none":
        return lambda c: nn.Identity()
    if kind == "groupnorm":  # per-sample statistics: independent of the batch size
        return lambda c: nn.GroupNorm(math.gcd(c, 4), c)
    if kind == "renorm":
        cls_r = getattr(bnkit, f"BatchRenorm{dims}d")
        return lambda c: cls_r(c, **kwargs)
    mod = bnkit if kind == "bnkit" else nn
    if kind not in ("bnkit", "torch"):
        raise ValueError(f"unknown BatchNorm kind {kind!r}; expected one of {BN_KINDS}")
    cls = getattr(mod, f"BatchNorm{dims}d")
    return lambda c: cls(c, **kwargs)


def mlp(kind: str = "bnkit", **bn_kwargs: object) -> nn.Sequential:
    """784-256-256-10 MLP with BatchNorm after each hidden linear layer (or none)."""
    bn = bn_factory(kind, 1, **bn_kwargs)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 256), bn(256), nn.ReLU(),
        nn.Linear(256, 256), bn(256), nn.ReLU(),
        nn.Linear(256, 10),
    )  # fmt: skip


def lenet(kind: str = "bnkit", **bn_kwargs: object) -> nn.Sequential:
    """The classic LeNet with BatchNorm: conv-BN-sigmoid-pool x2, linear-BN-sigmoid x2.

    ``trunk`` is everything up to the last linear layer (the head), as used by the
    freezing experiment.
    """
    bn2, bn1 = bn_factory(kind, 2, **bn_kwargs), bn_factory(kind, 1, **bn_kwargs)
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), bn2(6), nn.Sigmoid(), nn.AvgPool2d(2, 2),
        nn.Conv2d(6, 16, 5), bn2(16), nn.Sigmoid(), nn.AvgPool2d(2, 2),
        nn.Flatten(),
        nn.Linear(256, 120), bn1(120), nn.Sigmoid(),
        nn.Linear(120, 84), bn1(84), nn.Sigmoid(),
        nn.Linear(84, 10),
    )  # fmt: skip
