"""The catalogue of classic from-scratch BatchNorm mistakes, each recognised by its
numerical signature: the float64 closed form of the mistake (:mod:`bnkit.testing`)
reproduces the implementation's output."""

from __future__ import annotations

import itertools
import math
from typing import Any

from torch import Tensor

from bnkit.testing import reference_train

__all__ = ["MISTAKES", "deviation", "explain"]


def deviation(a: Tensor, b: Tensor) -> float:
    """Max absolute difference (inf for another shape or a non-finite difference)."""
    if a.shape != b.shape:
        return math.inf
    d = (a.double() - b.double()).abs().max().item()
    return d if math.isfinite(d) else math.inf


MISTAKES = {
    "unbiased": "normalizes with the unbiased variance (output off by sqrt(n/(n-1))); torch "
    "normalizes with the biased one",
    "eps_outside": "eps added outside the square root: (x-mean)/(sqrt(var)+eps) instead of "
    "(x-mean)/sqrt(var+eps)",
    "per_element": "wrong reduction axes: statistics per element over the batch only (dim 0) "
    "instead of per channel over (N, *spatial)",
}


def explain(
    y: Tensor, x: Tensor, w: Tensor | None, b: Tensor | None, eps: float, tol: float
) -> tuple[dict[str, Any], str] | None:
    """The smallest combination of classic mistakes whose closed form reproduces ``y``."""
    keys = list(MISTAKES)
    for k in range(1, len(keys) + 1):
        for combo in itertools.combinations(keys, k):
            flags: dict[str, Any] = {
                "unbiased": "unbiased" in combo,
                "eps_outside": "eps_outside" in combo,
                "dims": (0,) if "per_element" in combo else None,
            }
            if deviation(y, reference_train(x, w, b, eps, **flags)[0]) <= tol:
                return flags, "; ".join(MISTAKES[c] for c in combo)
    if deviation(y, reference_train(x, None, None, eps)[0]) <= tol:
        return {}, "the affine parameters (weight/bias) are not applied"
    return None
