"""The BatchNorm family, in one table: kind x rank -> bnkit class, and torch's twin.

A *kind* is one way of normalizing (``"bnkit"``: the plain layers; ``"lazy"``,
``"frozen"``, ``"renorm"``, ``"ghost"``, ``"sync"``); its *rank* is 1, 2 or 3 (the
``BatchNorm1d/2d/3d`` it stands for, which fixes the input ranks it takes), or ``None``
for a kind that takes every rank (SyncBatchNorm). Torch's own classes are in the table as
kind ``"torch"`` (and ``"torch-lazy"``, ``"torch-sync"``). Each bnkit class joins with the
:func:`member` decorator, which also gives it its ``_ranks``; everything that maps one
class to another (``convert``, export, TorchScript, fused, fuse, frozen, the variants)
reads this table, never a class name.

Adding a kind: decorate its classes with ``@member("mykind", rank)``; ``convert`` gains
``to="mykind"`` where a target is registered in ``tools/convert.py``, and
``tests/nn/test_family.py`` checks every member has a torch twin, ranks and a round trip.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "INPUT_RANKS",
    "TORCH",
    "classes",
    "is_batchnorm",
    "kind_of",
    "lookup",
    "member",
    "rank_of",
    "torch_twin",
]

INPUT_RANKS: dict[int | None, tuple[int, ...]] = {1: (2, 3), 2: (4,), 3: (5,), None: (2, 3, 4, 5)}
TORCH: dict[int | None, type[nn.Module]] = {
    1: nn.BatchNorm1d,
    2: nn.BatchNorm2d,
    3: nn.BatchNorm3d,
    None: nn.SyncBatchNorm,
}

_TABLE: dict[tuple[str, int | None], type] = {}
_KEY: dict[type, tuple[str, int | None]] = {}


def _register(kind: str, rank: int | None, cls: type) -> None:
    key = (kind, rank)
    if key in _TABLE and _TABLE[key] is not cls:
        raise ValueError(f"bnkit family: {key} is already {_TABLE[key].__qualname__}")
    _TABLE[key] = cls
    _KEY[cls] = key


_TORCH_ROWS: tuple[tuple[str, int, type], ...] = (
    ("torch", 1, nn.BatchNorm1d),
    ("torch", 2, nn.BatchNorm2d),
    ("torch", 3, nn.BatchNorm3d),
    ("torch-lazy", 1, nn.LazyBatchNorm1d),
    ("torch-lazy", 2, nn.LazyBatchNorm2d),
    ("torch-lazy", 3, nn.LazyBatchNorm3d),
)
for _kind, _rank, _cls in _TORCH_ROWS:
    _register(_kind, _rank, _cls)
_register("torch-sync", None, nn.SyncBatchNorm)

T = TypeVar("T", bound=type)


def member(kind: str, rank: int | None) -> Callable[[T], T]:
    """Class decorator: ``cls`` is bnkit's ``kind`` of rank ``rank`` (sets ``_ranks``)."""

    def join(cls: T) -> T:
        cls._ranks = INPUT_RANKS[rank]  # type: ignore[attr-defined]
        _register(kind, rank, cls)
        return cls

    return join


def lookup(kind: str, rank: int | None) -> type:
    """The class of ``kind`` and ``rank``; a ``KeyError`` naming what exists otherwise."""
    cls = _TABLE.get((kind, rank))
    if cls is None:
        have = sorted(r for k, r in _TABLE if k == kind and r is not None)
        raise KeyError(f"bnkit family: no {kind!r} class of rank {rank} (ranks: {have})")
    return cls


def _key(m: Any) -> tuple[str, int | None] | None:
    cls = m if isinstance(m, type) else type(m)
    return _KEY.get(cls)


def kind_of(m: Any) -> str | None:
    """The kind of module (or class) ``m`` exactly (not of a user's subclass), or None."""
    key = _key(m)
    return key[0] if key else None


def rank_of(m: Any) -> int | None:
    """1, 2 or 3 for a member of a ranked kind; None for a rankless one or a non-member."""
    key = _key(m)
    return key[1] if key else None


def classes(kind: str) -> tuple[Any, ...]:
    """The classes of ``kind``, by rank."""
    return tuple(
        cls for (k, r), cls in sorted(_TABLE.items(), key=lambda kv: str(kv[0])) if k == kind
    )


def torch_twin(m: Any) -> type[nn.Module]:
    """Torch's class that ``m`` (a module or class of the family, or any class with
    ``_ranks``) stands for: ``nn.BatchNorm1d/2d/3d``, or ``nn.SyncBatchNorm``."""
    key = _key(m)
    if key is not None:
        return TORCH[key[1]]
    ranks = getattr(m, "_ranks", ())
    for rank, rs in INPUT_RANKS.items():
        if rs == tuple(ranks):
            return TORCH[rank]
    name = m.__name__ if isinstance(m, type) else type(m).__name__
    raise TypeError(f"{name}: no torch BatchNorm class for input ranks {ranks}")


def is_batchnorm(module: nn.Module) -> bool:
    """True for torch's and bnkit's BatchNorm modules (every subclass of torch's
    ``_BatchNorm``: BatchNorm1d/2d/3d, lazy, SyncBatchNorm, Renorm, Ghost); False for
    FrozenBatchNorm, whose statistics nothing may change."""
    return isinstance(module, _BatchNorm)
