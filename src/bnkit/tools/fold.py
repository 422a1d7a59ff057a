"""Fold eval-mode BatchNorm into a neighbouring Conv / ConvTranspose / Linear layer.

In eval mode a BatchNorm is the per-channel affine map ``y = s * x + t`` with
``s = weight / sqrt(running_var + eps)`` and ``t = bias - running_mean * s`` (weight 1 and
bias 0 when absent). After a layer ``z = W x + b`` it folds into ``W' = s W`` (per output
channel) and ``b' = s b + t``. Before a layer it folds into ``W' = W s`` (per input channel)
and ``b' = b + W t``, which is exact for Linear and for Conv without padding (padding adds
zeros *after* the BatchNorm, which the folded layer cannot reproduce), and never exact for
ConvTranspose (a constant input does not give a constant output at the borders).

:func:`fold` traces the model with ``torch.fx`` to see which layer feeds which; where the
model cannot be traced it falls back to adjacent pairs inside ``nn.Sequential`` containers.
Every folded parameter is computed in float64 and cast back, so device and dtype are kept.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bnkit.nn import functional as F
from bnkit.tools.convert import is_batchnorm

__all__ = ["FoldReport", "FoldedLayer", "bn_affine", "fold", "fold_pair"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_LAYERS = (*_CONV, *_CONVT, nn.Linear)


@dataclass
class FoldedLayer:
    """What happened to one BatchNorm."""

    name: str
    folded: bool
    into: str | None = None
    position: str | None = None  # "after" (BN after the layer) or "before"
    reason: str | None = None  # why not, when not folded


@dataclass
class FoldReport:
    """Every BatchNorm of the model, folded or not (with the reason), and the check."""

    layers: list[FoldedLayer] = field(default_factory=list)
    traced: bool = True
    trace_error: str | None = None
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0

    @property
    def folded(self) -> list[str]:
        return [f.name for f in self.layers if f.folded]

    @property
    def not_folded(self) -> dict[str, str]:
        return {f.name: f.reason or "" for f in self.layers if not f.folded}

    def __str__(self) -> str:
        lines = [
            f"folded {len(self.folded)} of {len(self.layers)} BatchNorm layer(s)"
            + (
                ""
                if self.traced
                else f" (not traceable: {self.trace_error}; module structure used)"
            ),
            f"max abs error vs the original {self.max_abs_error:.2e} "
            f"(relative {self.max_rel_error:.2e})",
        ]
        for f in self.layers:
            if f.folded:
                lines.append(f"  {f.name}: folded into {f.into} ({f.position} it)")
            else:
                lines.append(f"  {f.name}: not folded: {f.reason}")
        return "\n".join(lines)


def bn_affine(bn: Any) -> tuple[Tensor, Tensor]:
    """The eval-mode BatchNorm as ``(s, t)`` in float64: ``y = s * x + t`` per channel."""
    rm, rv = bn.running_mean, bn.running_var
    assert isinstance(rm, Tensor) and isinstance(rv, Tensor)
    return F.eval_affine(rm, rv, getattr(bn, "weight", None), getattr(bn, "bias", None), bn.eps)


def _bias64(layer: Any, out_channels: int, like: Tensor) -> Tensor:
    b = getattr(layer, "bias", None)
    if b is None:
        return torch.zeros(out_channels, dtype=torch.float64, device=like.device)
    return b.detach().double()


def _set(layer: Any, weight: Tensor, bias: Tensor) -> None:
    w = layer.weight
    layer.weight = nn.Parameter(weight.to(w.dtype), requires_grad=w.requires_grad)
    layer.bias = nn.Parameter(bias.to(w.dtype), requires_grad=w.requires_grad)


def _why_not_after(layer: Any, bn: Any) -> str | None:
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if out != bn.num_features:
        return (
            f"channel counts differ ({type(layer).__name__} gives {out}, BN has {bn.num_features})"
        )
    return None


def _why_not_before(layer: Any, bn: Any) -> str | None:
    if isinstance(layer, _CONVT):
        return "precedes a ConvTranspose: folding it there is not exact at the borders"
    if isinstance(layer, _CONV) and (
        layer.padding == "same" or any(p != 0 for p in layer.padding)  # type: ignore[union-attr]
    ):
        return "precedes a padded Conv: the padding zeros would not pass through the BN"
    inp = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    if inp != bn.num_features:
        return (
            f"channel counts differ ({type(layer).__name__} takes {inp}, BN has {bn.num_features})"
        )
    return None


@torch.no_grad()
def fold_pair(layer: Any, bn: Any, position: str = "after") -> None:
    """Fold ``bn`` into ``layer`` in place; ``position`` says where the BN sits."""
    s, t = bn_affine(bn)
    w = layer.weight.detach().double()
    if position == "after":
        if isinstance(layer, _CONVT):
            groups = layer.groups
            cin, cout_g = w.shape[0], w.shape[1]
            k = w.shape[2:]
            wg = w.reshape(groups, cin // groups, cout_g, *k)
            sg = s.reshape(groups, 1, cout_g, *([1] * len(k)))
            new_w = (wg * sg).reshape(w.shape)
        else:
            new_w = w * s.reshape(-1, *([1] * (w.dim() - 1)))
        new_b = _bias64(layer, s.numel(), w) * s + t
    elif position == "before":
        if isinstance(layer, nn.Linear):
            new_w = w * s.reshape(1, -1)
            new_b = _bias64(layer, w.shape[0], w) + w @ t
        else:
            groups = layer.groups
            cout, cin_g = w.shape[0], w.shape[1]
            k = w.shape[2:]
            s_in = s.reshape(groups, 1, cin_g)  # input channel g*cin_g + i
            t_in = t.reshape(groups, 1, cin_g)
            wg = w.reshape(groups, cout // groups, cin_g, *k)
            new_w = (wg * s_in.reshape(*s_in.shape, *([1] * len(k)))).reshape(w.shape)
            shift = (wg.sum(dim=tuple(range(3, 3 + len(k)))) * t_in).sum(-1).reshape(cout)
            new_b = _bias64(layer, cout, w) + shift
    else:
        raise ValueError(f"position must be 'after' or 'before', got {position!r}")
    _set(layer, new_w, new_b)


def _bn_reason(bn: Any) -> str | None:
    if bn.training:
        return "in training mode (fold folds eval-mode BatchNorm only: call model.eval())"
    if bn.running_mean is None or bn.running_var is None or not bn.track_running_stats:
        return "track_running_stats=False: it normalizes with batch statistics, not a fixed affine"
    return None


def _fold_traced(model: nn.Module, report: FoldReport, example: tuple[Any, ...]) -> nn.Module:
    from torch.fx import GraphModule, Tracer
    from torch.fx.passes.shape_prop import ShapeProp

    class _Tracer(Tracer):
        # bnkit's layers are leaves too, as torch.nn's are
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return is_batchnorm(m) or super().is_leaf_module(m, qualname)

    gm = GraphModule(model, _Tracer().trace(model))
    ShapeProp(gm).propagate(*example)
    mods = dict(gm.named_modules())

    def target(node: Any) -> nn.Module | None:
        return mods.get(node.target) if node.op == "call_module" else None

    def out_rank(node: Any) -> int | None:
        meta = node.meta.get("tensor_meta")
        return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    seen: dict[str, int] = {}
    for node in gm.graph.nodes:
        m = target(node)
        if m is not None:
            seen[node.target] = seen.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        bn = target(node)
        if bn is None or not is_batchnorm(bn):
            continue
        name = str(node.target)
        entry = FoldedLayer(name, False)
        report.layers.append(entry)
        if seen[name] > 1:
            entry.reason = f"the module is called {seen[name]} times"
            continue
        reason = _bn_reason(bn)
        if reason:
            entry.reason = reason
            continue
        src: Any = node.args[0] if node.args else None
        prev = target(src) if src is not None and hasattr(src, "op") else None
        reasons = []
        if prev is not None and isinstance(prev, _LAYERS):
            if seen[str(src.target)] > 1:
                reasons.append(f"{src.target} is called more than once")
            elif len(src.users) > 1:
                reasons.append(f"the output of {src.target} is used elsewhere too")
            elif isinstance(prev, nn.Linear) and out_rank(src) != 2:
                reasons.append(f"{src.target} output is not (N, C): BN would not see its features")
            elif (why := _why_not_after(prev, bn)) is not None:
                reasons.append(why)
            else:
                fold_pair(prev, bn, "after")
                node.replace_all_uses_with(src)
                gm.graph.erase_node(node)
                entry.folded, entry.into, entry.position = True, str(src.target), "after"
                continue
        else:
            kind = type(prev).__name__ if prev is not None else getattr(src, "op", "input")
            reasons.append(f"preceded by {kind}, not a Conv/ConvTranspose/Linear")
        users = list(node.users)
        nxt = target(users[0]) if len(users) == 1 else None
        if nxt is not None and isinstance(nxt, _LAYERS) and users[0].args[0] is node:
            if seen[str(users[0].target)] > 1:
                reasons.append(f"{users[0].target} is called more than once")
            elif isinstance(nxt, nn.Linear) and out_rank(node) != 2:
                reasons.append("its output is not (N, C) for the following Linear")
            elif (why := _why_not_before(nxt, bn)) is not None:
                reasons.append(why)
            else:
                fold_pair(nxt, bn, "before")
                node.replace_all_uses_with(src)
                gm.graph.erase_node(node)
                entry.folded, entry.into, entry.position = True, str(users[0].target), "before"
                continue
        elif len(users) > 1:
            reasons.append("its output is used more than once")
        else:
            kind = type(nxt).__name__ if nxt is not None else (users[0].op if users else "nothing")
            reasons.append(f"followed by {kind}")
        entry.reason = "; ".join(reasons)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _fold_structural(model: nn.Module, report: FoldReport) -> nn.Module:
    done: set[int] = set()
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for i, child_name in enumerate(names):
            bn = parent._modules[child_name]
            if bn is None or not is_batchnorm(bn):
                continue
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            entry = FoldedLayer(full, False)
            report.layers.append(entry)
            done.add(id(bn))
            reason = _bn_reason(bn)
            prev = parent._modules[names[i - 1]] if i > 0 else None
            if (
                reason is None
                and isinstance(prev, _CONV + _CONVT)
                and _why_not_after(prev, bn) is None
            ):
                fold_pair(prev, bn, "after")
                parent._modules[child_name] = nn.Identity()
                entry.folded, entry.position = True, "after"
                entry.into = f"{parent_name}.{names[i - 1]}" if parent_name else names[i - 1]
            else:
                entry.reason = reason or (
                    "not directly after a Conv/ConvTranspose in an nn.Sequential "
                    "(the model could not be traced, so only module structure is known)"
                )
    for name, m in model.named_modules():
        if is_batchnorm(m) and id(m) not in done:
            report.layers.append(
                FoldedLayer(
                    name,
                    False,
                    reason="the model could not be traced and this "
                    "BatchNorm is not inside an nn.Sequential",
                )
            )
    return model


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _outputs(model: nn.Module, example: tuple[Any, ...]) -> list[Tensor]:
    out = model(*example)
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [o for o in out if isinstance(o, Tensor)] if isinstance(out, Sequence) else []


@torch.no_grad()
def fold(model: nn.Module, example_inputs: Any) -> tuple[nn.Module, FoldReport]:
    """Fold every eval-mode BatchNorm that can be folded; return the new model and a report.

    Args:
        model: left untouched (a deep copy is folded).
        example_inputs: a tensor or a tuple of positional inputs, used to trace shapes and
            to check the folded model against the original.

    Returns:
        ``(folded_model, report)``: the report lists each BatchNorm as folded (into which
        layer, after or before it) or not (and why), and the max abs/relative error of the
        folded model's outputs vs the original's on ``example_inputs``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold: expected a torch.nn.Module, got {type(model).__name__}")
    example = _as_tuple(example_inputs)
    try:
        # on a copy: a train-mode BatchNorm in the model would update its statistics
        ref = _outputs(copy.deepcopy(model), example)
    except Exception as exc:
        raise ValueError(
            f"fold: the model fails on example_inputs ({type(exc).__name__}: {exc})"
        ) from exc
    work = copy.deepcopy(model)
    report = FoldReport()
    try:
        folded = _fold_traced(work, report, example)
    except Exception as exc:  # fx cannot trace data-dependent control flow etc.
        report = FoldReport(traced=False, trace_error=f"{type(exc).__name__}: {exc}")
        work = copy.deepcopy(model)
        folded = _fold_structural(work, report)
    got = _outputs(copy.deepcopy(folded), example)
    for a, b in zip(ref, got, strict=True):
        err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        scale = a.double().abs().max().item() if a.numel() else 1.0
        report.max_abs_error = max(report.max_abs_error, err)
        report.max_rel_error = max(report.max_rel_error, err / max(scale, 1e-30))
    return folded, report
