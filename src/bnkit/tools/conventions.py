"""BatchNorm conventions of torch, Keras/TensorFlow and Flax, and weight import/export.

| framework | update rule | variance stored | default momentum | default eps |
|---|---|---|---|---|
| torch | ``(1-m)*old + m*new`` | unbiased | 0.1 | 1e-5 |
| Keras / TF | ``m*old + (1-m)*new`` | biased | 0.99 | 1e-3 |
| Flax linen | ``m*old + (1-m)*new`` | biased | 0.99 | 1e-5 |

So ``m_torch = 1 - m_keras``. At inference every framework computes
``(x - mean) / sqrt(var + eps) * gamma + beta`` from the stored numbers, so a port copies the
stored statistics unchanged and the outputs stay identical: that is the default of every
function here. torch's running variance averages *unbiased* batch variances, Keras's and
Flax's biased ones; that only changes how the estimate moves if training continues (an
O(1/n) difference per update). ``rescale_variance_for_training=n`` (values per channel in a
training batch) rescales the stored variance by ``(n - 1) / n`` (or ``n / (n - 1)`` on the
way back) to continue the target's own estimate; it changes the inference outputs, and the
notes say so. (Legacy tf.keras's fused kernel is reported to store the Bessel-corrected
variance, like torch; not verified here, where TensorFlow is not installed.)

Weights move as plain numpy arrays in dicts; Flax's nested ``{"params", "batch_stats"}``,
``flax.core.FrozenDict`` and ``nnx.state(...)`` are accepted as they are.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from bnkit.nn import is_batchnorm
from bnkit.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnkit.nn.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d

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

    def flax_variables(self) -> dict[str, dict[str, np.ndarray]]:
        """The weights as Flax linen's ``{"params": ..., "batch_stats": ...}``."""
        w = self.weights
        return {
            "params": {"scale": w["scale"], "bias": w["bias"]},
            "batch_stats": {"mean": w["mean"], "var": w["var"]},
        }


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().double().numpy().copy()


def _rescale_option(
    rescale: int | None, n: int | None, where: str, to_biased: bool, notes: list[str]
) -> float:
    """The factor on the stored variance: 1 (identical outputs) unless asked for."""
    if n is not None:
        warnings.warn(
            f"{where}: n= is deprecated; it rescales the variance and changes the outputs. "
            "Leave it out for an identical port, or say rescale_variance_for_training=n",
            DeprecationWarning,
            stacklevel=4,
        )
        if rescale is None:
            rescale = n
    if rescale is None:
        return 1.0
    if isinstance(rescale, bool) or not isinstance(rescale, int) or rescale < 2:
        raise ValueError(
            f"{where}: rescale_variance_for_training must be an int >= 2 (values per "
            f"channel in a training batch), got {rescale!r}"
        )
    factor = (rescale - 1) / rescale if to_biased else rescale / (rescale - 1)
    notes.append(
        f"running variance rescaled by {factor:.6g} (n={rescale}) to continue the "
        "target's own estimate in training: inference outputs differ from the source's by "
        f"up to {abs(1 - factor**-0.5):.2g} relative"
    )
    return factor


def _export(bn: Any, framework: str, rescale: int | None, n: int | None) -> Converted:
    if not is_batchnorm(bn) and not isinstance(
        bn, (FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d)
    ):
        raise TypeError(f"expected a BatchNorm module, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{bn}: no running statistics (track_running_stats=False) to export")
    notes: list[str] = []
    factor = _rescale_option(rescale, n, f"to_{framework}", to_biased=True, notes=notes)
    c = bn.num_features
    w = _np(getattr(bn, "weight", None))
    b = _np(getattr(bn, "bias", None))
    scale = w if w is not None else np.ones(c)
    shift = b if b is not None else np.zeros(c)
    if w is None or b is None:
        notes.append("affine=False or bias=False: exported as weight 1 / bias 0")
    mean = _np(bn.running_mean)
    var = _np(bn.running_var) * factor  # type: ignore[operator]
    bn_momentum = getattr(bn, "momentum", 0.1)
    momentum = None if bn_momentum is None else momentum_from_torch(bn_momentum, framework)
    if bn_momentum is None:
        notes.append("momentum=None (cumulative average) has no Keras/Flax equivalent")
    config: dict[str, Any] = {
        "momentum": momentum,
        "epsilon": bn.eps,
        "center": b is not None,
        "scale": w is not None,
        # torch's layout: channels in dim 1 (set -1 for a channels-last model)
        "axis": 1,
    }
    if framework == "keras":
        names = {"gamma": scale, "beta": shift, "moving_mean": mean, "moving_variance": var}
    else:
        names = {"scale": scale, "bias": shift, "mean": mean, "var": var}
    return Converted({k: np.asarray(v) for k, v in names.items()}, config, notes)


def to_keras(
    bn: nn.Module, *, rescale_variance_for_training: int | None = None, n: int | None = None
) -> Converted:
    """Keras weights (``gamma``, ``beta``, ``moving_mean``, ``moving_variance``) and the
    ``keras.layers.BatchNormalization`` config of ``bn`` (``axis=1``: torch's layout).

    The layer built from them gives the same inference output as ``bn`` on the same input.
    ``rescale_variance_for_training=n`` (values per channel in a training batch) rescales
    the stored variance to continue Keras's biased estimate; it changes the outputs (see the
    module docstring). ``n`` is its deprecated old name.
    """
    return _export(bn, "keras", rescale_variance_for_training, n)


def to_flax(
    bn: nn.Module, *, rescale_variance_for_training: int | None = None, n: int | None = None
) -> Converted:
    """Flax weights (``scale``, ``bias``, ``mean``, ``var``: ``params`` and ``batch_stats``
    of ``linen.BatchNorm``, the state of ``nnx.BatchNorm``) and config, as :func:`to_keras`.
    Use :meth:`Converted.flax_variables` for linen's nested dict."""
    return _export(bn, "flax", rescale_variance_for_training, n)


_CLS = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}
_FROZEN = (FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d)


def _array(weights: Mapping[str, Any], key: str, framework: str) -> np.ndarray:
    v = weights[key]
    v = v.get_value() if hasattr(v, "get_value") else getattr(v, "value", v)  # nnx Variable
    try:
        arr = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"{framework} weights: {key} must be an array of numbers, got {type(v).__name__}"
        ) from exc
    if arr.ndim != 1:
        raise ValueError(
            f"{framework} weights: {key} must be one value per channel (1-D), got shape {arr.shape}"
        )
    return arr


def _import(
    weights: Mapping[str, Any],
    names: tuple[str, str, str, str],
    framework: str,
    *,
    dims: int,
    momentum: float | None,
    eps: float | None,
    rescale: int | None,
    n: int | None,
) -> tuple[nn.Module, list[str]]:
    if not isinstance(weights, Mapping):
        raise TypeError(
            f"{framework} weights: expected a dict of arrays, got {type(weights).__name__}"
        )
    missing = [k for k in names[2:] if k not in weights]
    if missing:
        raise ValueError(
            f"{framework} weights: missing {missing}; got keys {sorted(weights)} "
            f"(expected {list(names)})"
        )
    if dims not in _CLS:
        raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
    notes: list[str] = []
    factor = _rescale_option(rescale, n, f"from_{framework}", to_biased=False, notes=notes)
    mean = _array(weights, names[2], framework)
    var = _array(weights, names[3], framework) * factor
    c = mean.size
    given = {k: _array(weights, k, framework) for k in names[:2] if k in weights}
    for k, arr in {names[3]: var, **given}.items():
        if arr.size != c:
            raise ValueError(
                f"{framework} weights: {names[2]} has {c} values but {k} has {arr.size}"
            )
    d = DEFAULTS[framework]
    fw_m = d["momentum"] if momentum is None else momentum
    bn = _CLS[dims](
        c,
        eps=d["eps"] if eps is None else eps,
        momentum=momentum_to_torch(fw_m, framework),
        affine=bool(given),
        bias=names[1] in given,
    )
    with torch.no_grad():
        bn.running_mean.copy_(torch.from_numpy(mean))  # type: ignore[union-attr]
        bn.running_var.copy_(torch.from_numpy(var))  # type: ignore[union-attr]
        if bn.weight is not None:
            g = given.get(names[0])
            bn.weight.copy_(torch.from_numpy(g) if g is not None else torch.ones(c))
        if bn.bias is not None:
            bn.bias.copy_(torch.from_numpy(given[names[1]]))
    return bn, notes


def from_keras(
    weights: Mapping[str, Any],
    *,
    dims: int = 2,
    momentum: float | None = None,
    epsilon: float | None = None,
    rescale_variance_for_training: int | None = None,
    n: int | None = None,
) -> tuple[nn.Module, list[str]]:
    """A bnkit BatchNorm{dims}d from Keras weights; returns ``(module, notes)``.

    ``momentum`` and ``epsilon`` are Keras's (defaults 0.99 and 1e-3, Keras's own defaults:
    torch's 1e-5 would change the outputs). The module's inference output equals the Keras
    layer's; ``rescale_variance_for_training`` as in :func:`to_keras` (changes the outputs).
    """
    return _import(
        weights,
        ("gamma", "beta", "moving_mean", "moving_variance"),
        "keras",
        dims=dims,
        momentum=momentum,
        eps=epsilon,
        rescale=rescale_variance_for_training,
        n=n,
    )


def from_flax(
    weights: Mapping[str, Any],
    *,
    dims: int = 2,
    momentum: float | None = None,
    epsilon: float | None = None,
    rescale_variance_for_training: int | None = None,
    n: int | None = None,
) -> tuple[nn.Module, list[str]]:
    """A bnkit BatchNorm{dims}d from Flax weights: ``scale``, ``bias``, ``mean``, ``var`` flat,
    linen's nested ``{"params": ..., "batch_stats": ...}`` (a dict or ``FrozenDict``), or
    ``nnx.state(bn)``; returns ``(module, notes)``. Inference output equals Flax's."""
    if not isinstance(weights, Mapping):
        raise TypeError(f"flax weights: expected a dict of arrays, got {type(weights).__name__}")
    flat = dict(weights)
    for key in ("params", "batch_stats"):
        if isinstance(flat.get(key), Mapping):
            flat.update(flat.pop(key))
    return _import(
        flat,
        ("scale", "bias", "mean", "var"),
        "flax",
        dims=dims,
        momentum=momentum,
        eps=epsilon,
        rescale=rescale_variance_for_training,
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
