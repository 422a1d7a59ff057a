"""Fold by the data flow that ran: for BatchNorms that fx could not place.

One forward of the model on the example inputs, with a ``TorchFunctionMode`` and module
hooks, records which tensor each BatchNorm consumed and produced, which module produced
each Conv/ConvTranspose/Linear output, every shape op (view, reshape, flatten, transpose,
permute, ...) between them, and how often each tensor was used as data anywhere else. A
layer whose output goes only into one BatchNorm (directly, or through shape ops that keep
each BatchNorm channel on one output channel of the layer) folds into it, "after"; a
BatchNorm whose output goes only into a Linear/Conv folds "before" (where that is exact:
see :mod:`bnkit.tools.fold`). The Python around them (TF-style padding computed from the
input shape, a reshape back) is untouched. Each fold is kept only if the whole model's
output on the example is reproduced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["Flow", "channel_map", "record"]

T = torch.Tensor
_SHAPE_OPS: set[Any] = {
    T.view, T.reshape, T.flatten, T.transpose, T.permute, T.contiguous, T.squeeze,
    T.unsqueeze, T.movedim, T.t, T.view_as, T.reshape_as, T.unflatten,
    torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze,
    torch.unsqueeze, torch.movedim, torch.t, torch.unflatten,
}  # fmt: skip
_SHAPE_ONLY_SECOND = {T.view_as, T.reshape_as, T.expand_as, T.type_as}


@dataclass
class Flow:
    """What one forward did, by tensor identity (the tensors are kept alive)."""

    uses: dict[int, int] = field(default_factory=dict)  # data uses of each tensor
    shape_op: dict[int, tuple[Any, Tensor, tuple[Any, ...], dict[str, Any]]] = field(
        default_factory=dict
    )  # out id -> (op, input, other args, kwargs)
    produced_by: dict[int, str] = field(default_factory=dict)  # layer output id -> path
    inputs: dict[str, Tensor] = field(default_factory=dict)  # module path -> its input
    outputs: dict[str, Tensor] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    keep: list[Any] = field(default_factory=list)

    def use(self, t: Tensor) -> None:
        self.uses[id(t)] = self.uses.get(id(t), 0) + 1
        self.keep.append(t)

    def views(self, t: Tensor) -> list[Tensor]:
        """``t`` and the tensors before it made by shape ops alone, last made first (up to
        the one a shape op did not make, excluded)."""
        out: list[Tensor] = []
        while id(t) in self.shape_op and len(out) < 64:
            out.append(t)
            t = self.shape_op[id(t)][1]
        return out

    def chain(self, t: Tensor) -> tuple[Tensor, list[tuple[Any, tuple[Any, ...], dict[str, Any]]]]:
        """The tensor ``t`` was made from by shape ops alone, and those ops in order."""
        made = self.views(t)
        ops = [self.shape_op[id(v)] for v in reversed(made)]
        base = self.shape_op[id(made[-1])][1] if made else t
        return base, [(op, rest, kw) for op, _src, rest, kw in ops]


def _tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


class _Mode(TorchFunctionMode):
    def __init__(self, flow: Flow, sealed: Callable[[], bool]) -> None:
        super().__init__()
        self.flow = flow
        self.sealed = sealed

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.sealed() or not _tensors(out):
            return out  # inside a layer or BatchNorm, or a metadata read (size, shape)
        data = args[:1] if func in _SHAPE_ONLY_SECOND else args
        for t in _tensors(data) + _tensors(kwargs):
            self.flow.use(t)
        if func in _SHAPE_OPS and args and isinstance(args[0], Tensor) and isinstance(out, Tensor):
            self.flow.shape_op[id(out)] = (func, args[0], tuple(args[1:]), dict(kwargs))
            self.flow.keep.append(out)
        return out


def record(
    model: nn.Module, example: tuple[Any, ...], watched: Callable[[nn.Module], bool]
) -> Flow:
    """One forward of ``model`` on ``example``, recording the data flow around the modules
    ``watched`` selects (layers and BatchNorms: their insides are sealed)."""
    flow = Flow()
    depth = [0]
    handles = []
    for name, m in model.named_modules():
        if not watched(m):
            continue

        def pre(mod: nn.Module, args: Any, name: str = name) -> None:
            if depth[0] == 0 and args and isinstance(args[0], Tensor):
                flow.calls[name] = flow.calls.get(name, 0) + 1
                flow.inputs.setdefault(name, args[0])
                flow.use(args[0])
            depth[0] += 1

        def post(mod: nn.Module, args: Any, out: Any, name: str = name) -> None:
            depth[0] -= 1
            if depth[0] == 0 and isinstance(out, Tensor):
                flow.outputs.setdefault(name, out)
                flow.produced_by[id(out)] = name
                flow.keep.append(out)

        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        with _Mode(flow, lambda: depth[0] > 0):
            model(*example)
    finally:
        for h in handles:
            h.remove()
    return flow


def channel_map(
    base: Tensor,
    axis: int,
    ops: list[tuple[Any, tuple[Any, ...], dict[str, Any]]],
    channels: int,
) -> list[int] | None:
    """For each channel (dim 1) of the tensor ``ops`` make from ``base``, the one index
    along ``base``'s ``axis`` all its values come from; None where a channel mixes several
    or the map is not one-to-one."""
    n = base.shape[axis]
    if n != channels:
        return None
    shape = [1] * base.dim()
    shape[axis] = n
    idx = torch.arange(n, dtype=torch.float64).reshape(shape).expand(base.shape).contiguous()
    try:
        for op, rest, kw in ops:  # (a tensor in rest is a shape: reshape_as(other))
            idx = op(idx, *rest, **kw)
    except Exception:
        return None
    if idx.dim() < 2 or idx.shape[1] != channels:
        return None
    per = idx.transpose(0, 1).reshape(channels, -1)
    lo, hi = per.min(dim=1).values, per.max(dim=1).values
    if not torch.equal(lo, hi):
        return None
    out = [int(v) for v in lo.tolist()]
    return out if sorted(out) == list(range(channels)) else None
