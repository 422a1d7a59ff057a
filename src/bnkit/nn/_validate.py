"""Validation: what a BatchNorm call accepts, checked before anything changes.

:func:`validate` is the one check of a call (the modules, the functional forms, frozen,
the variants and sync all run it); the helpers word each error as torch does, naming
the layer (``where``), what was expected and what was got. The order is torch's: the
module's rank check, then the batch size and ``eps`` (torch checks those in Python), then
the dtype, the per-channel tensors and ``momentum``.
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

__all__ = [
    "FLOATS",
    "LOW_PRECISION",
    "UnsupportedDtypeError",
    "check_batch_size",
    "check_eps",
    "check_momentum",
    "validate",
]

LOW_PRECISION = (torch.float16, torch.bfloat16)  # computed in float32, as torch does
FLOATS = (torch.float32, torch.float64, *LOW_PRECISION)
_LOW_PRECISION, _FLOATS = LOW_PRECISION, FLOATS


def check_eps(eps: float, training: bool, where: str = "batch_norm") -> None:
    """Raise ``ValueError`` unless eps > 0 (training) or eps >= 0 (eval), as torch does."""
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or math.isnan(eps):
        raise ValueError(f"{where}: eps must be a number, got {eps!r}")
    if training and eps <= 0.0:
        raise ValueError(f"{where}: eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"{where}: eps must be non-negative, but got {eps}")


def check_momentum(momentum: float | None, where: str = "batch_norm") -> None:
    """Raise ``ValueError`` unless momentum is None or a number in [0, 1]."""
    if momentum is None:
        return
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise ValueError(f"{where}: momentum must be a float in [0, 1] or None, got {momentum!r}")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(
            f"{where}: momentum must be in [0, 1] (torch convention: weight of the new "
            f"batch), got {momentum}; a Keras momentum m corresponds to 1 - m here"
        )


def check_batch_size(size: torch.Size, where: str = "") -> None:
    """torch's ``_verify_batch_size``: training needs more than one value per channel."""
    if where == "batch_norm":
        where = ""
    if _one_value_per_channel(size):
        prefix = f"{where}: " if where else ""
        raise ValueError(
            f"{prefix}Expected more than 1 value per channel when training, got input size {size}"
        )


class UnsupportedDtypeError(TypeError, NotImplementedError):
    """A non-floating input. torch raises NotImplementedError ("batch_norm" not implemented
    for 'Long'); this is both that and a TypeError, so either ``except`` catches it."""


def check_input(x: Tensor, where: str, ranks: tuple[int, ...] = ()) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor input, got {type(x).__name__}")
    if ranks and x.dim() not in ranks:
        want = " or ".join(f"{r}D" for r in ranks)
        raise ValueError(
            f"{where}: expected {want} input (got {x.dim()}D input of shape {tuple(x.shape)})"
        )
    if x.dim() < 2:
        raise ValueError(
            f"{where}: expected an input of shape (N, C, *) with at least 2 dims, "
            f"got {x.dim()}D input of shape {tuple(x.shape)}"
        )


def check_floating(x: Tensor, where: str) -> None:
    if not x.is_floating_point():
        raise UnsupportedDtypeError(
            f"{where}: expected a floating-point input (float16/bfloat16/float32/float64), "
            f"got {x.dtype}"
        )


def _check_per_channel(t: Tensor | None, name: str, x: Tensor, where: str) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    c = x.shape[1]
    if t.dim() != 1 or t.shape[0] != c:
        # torch's wording ("bias should contain 64 elements not 2"), with the input's shape
        raise RuntimeError(
            f"{where}: {name} should contain {c} elements not {t.numel()} (one per channel "
            f"of the input {tuple(x.shape)}; got shape {tuple(t.shape)})"
        )
    if t.device != x.device:
        raise RuntimeError(
            f"{where}: {name} is on {t.device} but the input is on {x.device}; expected all "
            f"tensors on the same device (move the module with .to({str(x.device)!r}))"
        )
    ok = t.dtype == x.dtype or (x.dtype in _LOW_PRECISION and t.dtype == torch.float32)
    if not ok and x.numel() > 0:  # torch returns an empty batch whatever the dtypes
        raise RuntimeError(
            f"{where}: {name} has dtype {t.dtype} but the input is {x.dtype}; expected "
            f"{x.dtype} (or float32 for half/bfloat16 input): convert the module with "
            f".to({x.dtype}) or the input with .to({t.dtype})"
        )


def validate(
    input: Tensor,
    *,
    where: str,
    batch_stats: bool,
    eps: float,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    ranks: tuple[int, ...] = (),
    num_features: int | None = None,
    momentum: float | None = None,
) -> None:
    """The one validation of a BatchNorm call, run before anything changes.

    Every layer kind (the modules, the functional forms, frozen, the variants, sync) calls
    it with every tensor the computation will touch: the input (a floating tensor of one of
    ``ranks``, with ``num_features`` channels), and the per-channel ``running_mean``,
    ``running_var``, ``weight`` and ``bias`` (one value per channel, on the input's device,
    of the input's dtype or float32 for half/bfloat16 input). ``batch_stats``: the call
    normalizes with batch statistics, so it needs more than one value per channel and
    ``eps > 0``. Raises ``TypeError``/``ValueError``/``RuntimeError`` naming ``where``.
    """
    # The common case (everything right) in a few cheap comparisons; anything off goes to
    # the detailed checks below, which name what is wrong. (A layer call's overhead is
    # mostly this and the C++ call: it is what small layers pay per call.)
    if (
        type(input) is Tensor
        and input.dtype in _FLOATS
        and (input.dim() in ranks if ranks else input.dim() >= 2)
        and (num_features is None or input.shape[1] == num_features)
        and type(eps) is float
        and (eps > 0.0 if batch_stats else eps >= 0.0)
        and (momentum is None or (type(momentum) is float and 0.0 <= momentum <= 1.0))
    ):
        c, dev, dt = input.shape[1], input.device, input.dtype
        low = dt in _LOW_PRECISION
        ok = True
        for t in (running_mean, running_var, weight, bias):
            if t is not None and not (
                isinstance(t, Tensor)
                and t.dim() == 1
                and t.shape[0] == c
                and t.device == dev
                and (t.dtype == dt or (low and t.dtype == torch.float32))
            ):
                ok = False
                break
        if ok and not (batch_stats and _one_value_per_channel(input.shape)):
            return
    # torch's order: the module's rank check, the functional's batch-size and eps checks
    # (Python), then the op's dtype, size and device checks (C++)
    check_input(input, where, ranks)
    if batch_stats:
        check_batch_size(input.size(), where)
    check_eps(eps, batch_stats, where)
    check_floating(input, where)
    if num_features is not None and input.shape[1] != num_features:
        raise ValueError(
            f"{where}: expected {num_features} channels in dim 1, got {input.shape[1]} "
            f"(input shape {tuple(input.shape)})"
        )
    for name, t in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        _check_per_channel(t, name, input, where)
    check_momentum(momentum, where)


def _one_value_per_channel(size: torch.Size) -> bool:
    n = size[0]
    for s in size[2:]:
        n *= s
    return n == 1


def refuse_stat_tangents(
    x: Tensor, running_mean: Tensor, running_var: Tensor, *params: Tensor | None
) -> None:
    """torch's rule under forward-mode AD: an eval call whose input or parameters carry a
    tangent may not be given running statistics that carry one (the output is not
    differentiable in them)."""

    def dual(t: Tensor | None) -> bool:
        return t is not None and fwAD.unpack_dual(t).tangent is not None

    if (dual(running_mean) or dual(running_var)) and (dual(x) or any(map(dual, params))):
        raise RuntimeError(
            "batch_norm is not differentiable wrt running_mean and running_var, they cannot "
            "have forward grad defined"
        )
