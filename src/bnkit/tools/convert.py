"""Swap the BatchNorm kind of every layer in a model, keeping its state.

``convert(model, to="bnkit")`` replaces each ``torch.nn.BatchNorm1d/2d/3d`` by bnkit's;
``to="torch"`` goes back. Parameters, buffers (running statistics and counter), the
hyper-parameters, the training flag, device and dtype are carried over, so the converted
model computes the same function.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

import bnkit.nn.batchnorm as bnb
from bnkit.nn import frozen as bnf

__all__ = ["convert", "batchnorm_rank", "is_batchnorm", "TARGETS"]

_TORCH_BN: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_BNKIT_BN: tuple[type[nn.Module], ...] = (bnb.BatchNorm1d, bnb.BatchNorm2d, bnb.BatchNorm3d)
_RANK = {cls: i + 1 for family in (_TORCH_BN, _BNKIT_BN) for i, cls in enumerate(family)}


def is_batchnorm(module: nn.Module) -> bool:
    """True for torch's and bnkit's BatchNorm modules (any subclass), SyncBatchNorm included."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, bnb._BatchNorm))


def batchnorm_rank(module: nn.Module) -> int:
    """1, 2 or 3 for a BatchNorm1d/2d/3d (torch's or bnkit's); raises otherwise."""
    for cls, rank in _RANK.items():
        if type(module) is cls:
            return rank
    raise TypeError(f"not a plain BatchNorm1d/2d/3d: {type(module).__name__}")


def _copy_bn(src: nn.Module, target_cls: type[nn.Module]) -> nn.Module:
    ref = next(iter([*src.parameters(), *src.buffers()]), None)
    weight = getattr(src, "weight", None)
    new = target_cls(
        src.num_features,  # type: ignore[arg-type]
        eps=src.eps,  # type: ignore[arg-type]
        momentum=src.momentum,  # type: ignore[arg-type]
        affine=src.affine,  # type: ignore[arg-type]
        track_running_stats=src.running_mean is not None,
        bias=getattr(src, "bias", None) is not None,
        device=ref.device if ref is not None else None,
        dtype=weight.dtype
        if weight is not None
        else (
            src.running_mean.dtype if src.running_mean is not None else None  # type: ignore[union-attr]
        ),
    )
    # A flag toggled after construction is carried over as it is.
    new.track_running_stats = src.track_running_stats
    with torch.no_grad():
        for name, p in src.named_parameters(recurse=False):
            getattr(new, name).copy_(p)
            getattr(new, name).requires_grad_(p.requires_grad)
        for name, b in src.named_buffers(recurse=False):
            if getattr(new, name, None) is not None:
                getattr(new, name).copy_(b)
    new.train(src.training)
    return new


def _to_bnkit(m: nn.Module) -> nn.Module | None:
    if type(m) in _TORCH_BN:
        return _copy_bn(m, _BNKIT_BN[batchnorm_rank(m) - 1])
    return None


def _to_torch(m: nn.Module) -> nn.Module | None:
    if type(m) in _BNKIT_BN:
        return _copy_bn(m, _TORCH_BN[batchnorm_rank(m) - 1])
    return None


_FROZEN = (bnf.FrozenBatchNorm1d, bnf.FrozenBatchNorm2d, bnf.FrozenBatchNorm3d)


def _to_frozen(m: nn.Module) -> nn.Module | None:
    if type(m) in _TORCH_BN or type(m) in _BNKIT_BN:
        if m.running_mean is None:
            warnings.warn(
                f"convert(to='frozen'): {m} has no running statistics "
                "(track_running_stats=False); left as it is",
                UserWarning,
                stacklevel=4,
            )
            return None
        frozen = _FROZEN[batchnorm_rank(m) - 1].from_batchnorm(m)
        frozen.train(m.training)
        return frozen
    return None


TARGETS: dict[str, Callable[[nn.Module], nn.Module | None]] = {
    "bnkit": _to_bnkit,
    "torch": _to_torch,
    "frozen": _to_frozen,
}


def _swap(module: nn.Module, fn: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    new = fn(module)
    if new is not None:
        return new
    for name, child in module.named_children():
        replaced = _swap(child, fn)
        if replaced is not child:
            module.add_module(name, replaced)
    return module


def convert(model: nn.Module, to: str = "bnkit") -> nn.Module:
    """Swap every BatchNorm in ``model`` for the kind ``to`` names, keeping its state.

    Args:
        model: any module; children are replaced in place, and the (possibly new) root
            is returned, so use ``model = bnkit.convert(model, ...)``.
        to: ``"bnkit"`` (torch's BatchNorm -> bnkit's), ``"torch"`` (back), or
            ``"frozen"`` (either -> :class:`~bnkit.FrozenBatchNorm2d` etc.; a layer
            without running statistics is left as it is, with a warning).

    Returns:
        The converted model. Its outputs equal the original's up to float rounding.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected a torch.nn.Module, got {type(model).__name__}")
    if to not in TARGETS:
        raise ValueError(f"convert: unknown target to={to!r}; expected one of {sorted(TARGETS)}")
    return _swap(model, TARGETS[to])
