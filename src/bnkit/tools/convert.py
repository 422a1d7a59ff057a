"""Swap the BatchNorm kind of every layer in a model, keeping its state.

``convert(model, to="bnkit")`` replaces each ``torch.nn.BatchNorm1d/2d/3d`` by bnkit's;
``to="torch"`` goes back. Parameters, buffers (running statistics and counter), the
hyper-parameters, the training flag, device and dtype are carried over, and the hooks
registered on a layer (forward, backward, state_dict; ``torch.nn.utils.prune``'s pruning
with its ``weight_orig``/``weight_mask``), so the converted model computes the same
function.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.utils.parametrize import is_parametrized

import bnkit.nn.frozen
import bnkit.nn.variants  # noqa: F401
from bnkit.nn import _family as family
from bnkit.nn._family import is_batchnorm
from bnkit.nn.sync import SyncBatchNorm

__all__ = ["convert", "batchnorm_rank", "is_batchnorm", "TARGETS"]

_RANKED = ("torch", "bnkit", "renorm", "ghost")  # the kinds convert maps rank for rank
_TORCH_BN = family.classes("torch")
_BNKIT_BN = family.classes("bnkit")


def batchnorm_rank(module: nn.Module, default: int | None = None) -> int:
    """1, 2 or 3 for a BatchNorm1d/2d/3d (torch's or bnkit's, a Renorm or Ghost); for a
    SyncBatchNorm the rank of the module it was converted from, else ``default``; raises
    otherwise."""
    rank = family.rank_of(module)
    if rank is not None and family.kind_of(module) in _RANKED:
        return rank
    origin = getattr(module, "_bnkit_origin_rank", None)
    if origin is not None:
        return int(origin)
    if default is not None and _is_sync(module):
        return default
    raise TypeError(f"not a plain BatchNorm1d/2d/3d: {type(module).__name__}")


def _is_sync(m: nn.Module) -> bool:
    return isinstance(m, (SyncBatchNorm, nn.SyncBatchNorm))


def _copy_bn(src: Any, target_cls: Any, **extra: Any) -> nn.Module:
    ref = next(iter([*src.parameters(), *src.buffers()]), None)
    weight = getattr(src, "weight", None)
    rm = src.running_mean
    new = target_cls(
        src.num_features,
        eps=src.eps,
        momentum=src.momentum,
        affine=src.affine,
        track_running_stats=rm is not None,
        bias=getattr(src, "bias", None) is not None,
        device=ref.device if ref is not None else None,
        dtype=weight.dtype if weight is not None else (rm.dtype if rm is not None else None),
        **extra,
    )
    # A flag toggled after construction is carried over as it is.
    new.track_running_stats = src.track_running_stats
    _copy_tensors(src, new)
    _copy_hooks(src, new)
    new.train(src.training)
    return new


def _copy_tensors(src: nn.Module, new: nn.Module) -> None:
    """src's parameters and buffers into new, by name. A pruned layer
    (``torch.nn.utils.prune``) has ``weight_orig``/``weight_mask`` where new has ``weight``:
    they are registered on new and ``weight`` becomes the plain attribute the pruning hook
    recomputes, as on src."""
    with torch.no_grad():
        for name, p in src._parameters.items():
            if p is None:
                continue
            mine = new._parameters.get(name)
            if mine is not None:
                mine.copy_(p)
                mine.requires_grad_(p.requires_grad)
            else:
                new.register_parameter(name, nn.Parameter(p.detach().clone(), p.requires_grad))
        for name, b in src._buffers.items():
            if b is None:
                continue
            buf = new._buffers.get(name)
            if buf is not None:
                buf.copy_(b)
            elif name not in new._buffers:
                persistent = name not in src._non_persistent_buffers_set
                new.register_buffer(name, b.detach().clone(), persistent=persistent)
        for name in [n for n in new._parameters if n not in src._parameters]:
            del new._parameters[name]
            value = getattr(src, name, None)
            setattr(new, name, None if value is None else value.detach().clone())


_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _copy_hooks(src: nn.Module, new: nn.Module) -> None:
    """The hooks registered on src (forward, backward, state_dict; a pruning method is a
    forward pre-hook) run on new too, as ``torch.ao.quantization``'s module swap keeps
    them. (Handles returned when they were registered still refer to src.)"""
    for attr in _HOOK_DICTS:
        theirs = getattr(src, attr, None)
        if theirs:
            getattr(new, attr).update(theirs)
    if getattr(src, "_is_full_backward_hook", None) is not None:
        new._is_full_backward_hook = src._is_full_backward_hook


def _plain_rank(m: nn.Module, sync_rank: int) -> int | None:
    if type(m) in _TORCH_BN or type(m) in _BNKIT_BN or _is_sync(m) or _is_variant(m):
        return batchnorm_rank(m, default=sync_rank)
    return None


def _is_variant(m: nn.Module) -> bool:
    return family.kind_of(m) in ("renorm", "ghost")


def _to_bnkit(m: nn.Module, **kw: Any) -> nn.Module | None:
    rank = _plain_rank(m, kw.get("sync_rank", 2))
    if rank is None or type(m) in _BNKIT_BN:
        return None
    return _copy_bn(m, _BNKIT_BN[rank - 1])


def _to_torch(m: nn.Module, **kw: Any) -> nn.Module | None:
    rank = _plain_rank(m, kw.get("sync_rank", 2))
    if rank is None or type(m) in _TORCH_BN:
        return None
    return _copy_bn(m, _TORCH_BN[rank - 1])


def _to_sync(m: nn.Module, **kw: Any) -> nn.Module | None:
    if type(m) in _TORCH_BN or type(m) in _BNKIT_BN or type(m) is nn.SyncBatchNorm:
        new = _copy_bn(m, SyncBatchNorm, process_group=kw.get("process_group"))
        rank = batchnorm_rank(m, default=kw.get("sync_rank", 2))
        new._bnkit_origin_rank = rank  # type: ignore[assignment]
        new.sync_name = kw.get("name") or new.sync_name  # type: ignore[assignment]
        return new
    return None


_FROZEN = family.classes("frozen")


def _to_frozen(m: nn.Module, **kw: Any) -> nn.Module | None:
    rank = _plain_rank(m, kw.get("sync_rank", 2))
    if rank is None:
        return None
    if m.running_mean is None:
        warnings.warn(
            f"convert(to='frozen'): {m} has no running statistics "
            "(track_running_stats=False); left as it is",
            UserWarning,
            stacklevel=4,
        )
        return None
    frozen = _FROZEN[rank - 1].from_batchnorm(m)
    frozen.train(m.training)
    return frozen


def _to_variant(family: tuple[Any, ...], what: str) -> Callable[..., nn.Module | None]:
    def convert_one(m: nn.Module, **kw: Any) -> nn.Module | None:
        rank = _plain_rank(m, kw.get("sync_rank", 2))
        if rank is None or type(m) in family:
            return None
        if m.running_mean is None:
            warnings.warn(
                f"convert(to={what!r}): {m} has no running statistics; left as it is",
                UserWarning,
                stacklevel=4,
            )
            return None
        return _copy_bn(m, family[rank - 1], **kw.get("options", {}))

    return convert_one


TARGETS: dict[str, Callable[..., nn.Module | None]] = {
    "bnkit": _to_bnkit,
    "torch": _to_torch,
    "frozen": _to_frozen,
    "sync": _to_sync,
    "renorm": _to_variant(family.classes("renorm"), "renorm"),
    "ghost": _to_variant(family.classes("ghost"), "ghost"),
}


def _swap(
    module: nn.Module, fn: Callable[..., nn.Module | None], name: str, **kw: Any
) -> nn.Module:
    new = fn(module, name=name, **kw)
    if new is not None:
        return new
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and is_parametrized(module):
        # torch.nn.utils.parametrize made it an instance of a class of its own
        warnings.warn(
            f"convert: {name or 'the model'} ({type(module).__name__}) is parametrized "
            "(torch.nn.utils.parametrize) and was left as it is; remove the "
            "parametrization (parametrize.remove_parametrizations) to convert it",
            UserWarning,
            stacklevel=3,
        )
    for child_name, child in module.named_children():
        full = f"{name}.{child_name}" if name else child_name
        replaced = _swap(child, fn, full, **kw)
        if replaced is not child:
            module.add_module(child_name, replaced)
    return module


def convert(
    model: nn.Module,
    to: str = "bnkit",
    *,
    process_group: Any = None,
    sync_rank: int = 2,
    **options: Any,
) -> nn.Module:
    """Swap every BatchNorm in ``model`` for the kind ``to`` names, keeping its state.

    Args:
        model: any module; children are replaced in place, and the (possibly new) root
            is returned, so use ``model = bnkit.convert(model, ...)``.
        to: ``"bnkit"`` (torch's BatchNorm or any SyncBatchNorm -> bnkit's BatchNorm),
            ``"torch"`` (-> torch's), ``"sync"`` (-> :class:`bnkit.SyncBatchNorm` on
            ``process_group``), or ``"frozen"`` (-> :class:`~bnkit.FrozenBatchNorm2d` etc.;
            a layer without running statistics is left as it is, with a warning).
        process_group: the group for ``to="sync"`` (default: the whole world).
        sync_rank: 1, 2 or 3: the BatchNorm{1,2,3}d a SyncBatchNorm becomes when it was not
            made by ``convert`` (which remembers the original kind).
        options: constructor options of the target, for ``to="renorm"`` (``rmax``, ``dmax``,
            ``warmup_steps``, ``relax_steps``) and ``to="ghost"`` (``virtual_batch_size``).

    Returns:
        The converted model. Its outputs equal the original's up to float rounding.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected a torch.nn.Module, got {type(model).__name__}")
    if to not in TARGETS:
        raise ValueError(f"convert: unknown target to={to!r}; expected one of {sorted(TARGETS)}")
    if sync_rank not in (1, 2, 3):
        raise ValueError(f"convert: sync_rank must be 1, 2 or 3, got {sync_rank!r}")
    if options and to not in ("renorm", "ghost"):
        raise TypeError(f"convert: options {sorted(options)} apply to to='renorm'/'ghost' only")
    return _swap(
        model, TARGETS[to], "", process_group=process_group, sync_rank=sync_rank, options=options
    )
