"""BatchNorm conventions of torch, Keras/TensorFlow and Flax, and weight import/export.

| framework | update rule | variance stored | default momentum | default eps |
|---|---|---|---|---|
| torch | ``(1-m)*old + m*new`` | unbiased | 0.1 | 1e-5 |
| Keras / TF | ``m*old + (1-m)*new`` | biased | 0.99 | 1e-3 |
| Flax linen | ``m*old + (1-m)*new`` | biased | 0.99 | 1e-5 |

So ``m_torch = 1 - m_keras``. What cannot be recovered exactly: torch's running variance
averages *unbiased* batch variances (``n / (n - 1)`` times the biased ones) while Keras and
Flax average biased ones. Converting a stored variance needs the per-batch count ``n``
(batch size times spatial size) used in training; with it, the factor ``(n - 1) / n`` is
exact for a constant ``n``; without it the variance is copied as it is, and the note says so
(the difference is ``1 / n`` relative: 0.4% for ``n = 256``, negligible for conv layers).
No TensorFlow or JAX is needed: weights move as plain numpy arrays in dicts.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from bnkit.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnkit.tools.convert import is_batchnorm

__all__ = [
    "DEFAULTS",
    "Converted",
    "from_flax",
    "from_keras",
    "momentum_from_torch",
    "momentum_to_torch",
    "suspicious_momenta",
    "to_flax",
    "to_keras",
]

DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {"momentum": 0.1, "eps": 1e-5, "variance": "unbiased", "momentum_weights": "new"},
    "keras": {"momentum": 0.99, "eps": 1e-3, "variance": "biased", "momentum_weights": "old"},
    "flax": {"momentum": 0.99, "eps": 1e-5, "variance": "biased", "momentum_weights": "old"},
}
_FRAMEWORKS = ("keras", "flax")


def _check_framework(framework: str) -> None:
    if framework not in DEFAULTS:
        raise ValueError(f"unknown framework {framework!r}; expected one of {sorted(DEFAULTS)}")


def momentum_to_torch(momentum: float, framework: str = "keras") -> float:
    """torch's momentum for another framework's (``1 - m`` for Keras/TF and Flax)."""
    _check_framework(framework)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    return momentum if framework == "torch" else 1.0 - momentum


def momentum_from_torch(momentum: float, framework: str = "keras") -> float:
    """Another framework's momentum for torch's (the map is its own inverse)."""
    return momentum_to_torch(momentum, framework)


@dataclass
class Converted:
    """Converted weights (numpy arrays by the target's names), config, and what was lossy."""

    weights: dict[str, np.ndarray]
    config: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().double().numpy().copy()


def _variance_factor(n: int | None, to_biased: bool, notes: list[str]) -> float:
    if n is None:
        notes.append(
            "running variance copied as it is: torch stores an average of unbiased batch "
            "variances, Keras/Flax of biased ones; pass n (values per channel in a training "
            "batch) to rescale by (n-1)/n, otherwise it is off by a factor 1 + O(1/n)"
        )
        return 1.0
    if n < 2:
        raise ValueError(f"n (values per channel per batch) must be at least 2, got {n}")
    return (n - 1) / n if to_biased else n / (n - 1)


def _export(bn: Any, framework: str, n: int | None) -> Converted:
    if not is_batchnorm(bn):
        raise TypeError(f"expected a BatchNorm module, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{bn}: no running statistics (track_running_stats=False) to export")
    notes: list[str] = []
    factor = _variance_factor(n, to_biased=True, notes=notes)
    c = bn.num_features
    w = _np(getattr(bn, "weight", None))
    b = _np(getattr(bn, "bias", None))
    scale = w if w is not None else np.ones(c)
    shift = b if b is not None else np.zeros(c)
    if w is None or b is None:
        notes.append("affine=False or bias=False: exported as weight 1 / bias 0")
    mean = _np(bn.running_mean)
    var = _np(bn.running_var) * factor  # type: ignore[operator]
    momentum = None if bn.momentum is None else momentum_from_torch(bn.momentum, framework)  # type: ignore[arg-type]
    if bn.momentum is None:
        notes.append("momentum=None (cumulative average) has no Keras/Flax equivalent")
    config = {
        "momentum": momentum,
        "epsilon": bn.eps,
        "center": b is not None,
        "scale": w is not None,
    }
    if framework == "keras":
        names = {"gamma": scale, "beta": shift, "moving_mean": mean, "moving_variance": var}
    else:
        names = {"scale": scale, "bias": shift, "mean": mean, "var": var}
    return Converted({k: np.asarray(v) for k, v in names.items()}, config, notes)


def to_keras(bn: nn.Module, *, n: int | None = None) -> Converted:
    """Keras/TF weights (gamma, beta, moving_mean, moving_variance) and config of ``bn``.

    ``n`` is the number of values per channel in a training batch (batch size times the
    spatial size), needed to turn torch's unbiased running variance into Keras's biased one.
    """
    return _export(bn, "keras", n)


def to_flax(bn: nn.Module, *, n: int | None = None) -> Converted:
    """Flax linen weights as ``{"params": {scale, bias}, "batch_stats": {mean, var}}``
    flattened into one dict (``scale``, ``bias``, ``mean``, ``var``) and config."""
    return _export(bn, "flax", n)


_CLS = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}


def _import(
    weights: dict[str, Any],
    names: tuple[str, str, str, str],
    framework: str,
    *,
    dims: int,
    momentum: float | None,
    eps: float | None,
    n: int | None,
) -> tuple[nn.Module, list[str]]:
    missing = [k for k in names[2:] if k not in weights]
    if missing:
        raise ValueError(
            f"{framework} weights: missing {missing}; got keys {sorted(weights)} "
            f"(expected {list(names)})"
        )
    if dims not in _CLS:
        raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
    notes: list[str] = []
    factor = _variance_factor(n, to_biased=False, notes=notes)
    mean = np.asarray(weights[names[2]], dtype=np.float64).reshape(-1)
    var = np.asarray(weights[names[3]], dtype=np.float64).reshape(-1) * factor
    c = mean.size
    if var.size != c:
        raise ValueError(f"{framework} weights: {names[2]} has {c} values, {names[3]} {var.size}")
    d = DEFAULTS[framework]
    fw_m = d["momentum"] if momentum is None else momentum
    bn = _CLS[dims](
        c,
        eps=d["eps"] if eps is None else eps,
        momentum=momentum_to_torch(fw_m, framework),
        affine=names[0] in weights or names[1] in weights,
        bias=names[1] in weights,
    )
    with torch.no_grad():
        bn.running_mean.copy_(torch.from_numpy(mean))  # type: ignore[union-attr]
        bn.running_var.copy_(torch.from_numpy(var))  # type: ignore[union-attr]
        if bn.weight is not None:
            g = weights.get(names[0])
            bn.weight.copy_(
                torch.from_numpy(np.asarray(g, dtype=np.float64).reshape(-1))
                if g is not None
                else torch.ones(c)
            )
        if bn.bias is not None:
            bn.bias.copy_(
                torch.from_numpy(np.asarray(weights[names[1]], dtype=np.float64).reshape(-1))
            )
    return bn, notes


def from_keras(
    weights: dict[str, Any],
    *,
    dims: int = 2,
    momentum: float | None = None,
    epsilon: float | None = None,
    n: int | None = None,
) -> tuple[nn.Module, list[str]]:
    """A bnkit BatchNorm{dims}d from Keras/TF weights; returns ``(module, notes)``.

    ``momentum`` and ``epsilon`` are Keras's (defaults 0.99 and 1e-3, Keras's own defaults:
    torch's 1e-5 would change the outputs). ``n`` as in :func:`to_keras`.
    """
    return _import(
        weights,
        ("gamma", "beta", "moving_mean", "moving_variance"),
        "keras",
        dims=dims,
        momentum=momentum,
        eps=epsilon,
        n=n,
    )


def from_flax(
    weights: dict[str, Any],
    *,
    dims: int = 2,
    momentum: float | None = None,
    epsilon: float | None = None,
    n: int | None = None,
) -> tuple[nn.Module, list[str]]:
    """A bnkit BatchNorm{dims}d from Flax weights (``scale``, ``bias``, ``mean``, ``var``, or
    the nested ``{"params": ..., "batch_stats": ...}``); returns ``(module, notes)``."""
    flat = dict(weights)
    for key in ("params", "batch_stats"):
        if isinstance(flat.get(key), dict):
            flat.update(flat.pop(key))
    return _import(
        flat,
        ("scale", "bias", "mean", "var"),
        "flax",
        dims=dims,
        momentum=momentum,
        eps=epsilon,
        n=n,
    )


def suspicious_momenta(model: nn.Module, *, warn: bool = True) -> list[str]:
    """Names of BatchNorm layers whose momentum is above 0.5: almost always a Keras value
    pasted into torch (torch's momentum weights the *new* batch). Warns unless ``warn=False``."""
    found = [
        name
        for name, m in model.named_modules()
        if is_batchnorm(m) and m.momentum is not None and float(m.momentum) > 0.5  # type: ignore[arg-type]
    ]
    if found and warn:
        warnings.warn(
            f"BatchNorm momentum > 0.5 in {found}: torch's momentum is the weight of the new "
            "batch; a Keras/Flax momentum m is 1 - m in torch (0.99 -> 0.01)",
            UserWarning,
            stacklevel=2,
        )
    return found
