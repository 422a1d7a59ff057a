"""Fold eval-mode BatchNorm into a neighbouring Conv / ConvTranspose / Linear layer.

In eval mode a BatchNorm is the per-channel affine map ``y = s * x + t`` with
``s = weight / sqrt(running_var + eps)`` and ``t = bias - running_mean * s`` (weight 1 and
bias 0 when absent). After a layer ``z = W x + b`` it folds into ``W' = s W`` (per output
channel) and ``b' = s b + t``. Before a layer it folds into ``W' = W s`` (per input channel)
and ``b' = b + W t``, which is exact for Linear and for Conv without padding (padding adds
zeros *after* the BatchNorm, which the folded layer cannot reproduce), and never exact for
ConvTranspose (a constant input does not give a constant output at the borders).

:func:`fold` traces the model with ``torch.fx`` to see which layer feeds which. Where the
whole model cannot be traced (``float(Proxy)``, iterating over a proxy, shape-dependent
control flow), it traces the largest submodules that can be, recursively, folds inside
each and puts the model back together; a BatchNorm sitting directly in an untraceable
module folds into the layer before it only inside an ``nn.Sequential``. Conv/ConvTranspose/
Linear subclasses (e.g. a Conv2d that pads "same" before ``F.conv2d``) are folded when their
forward is linear in weight and bias, which is checked on the activations the layer saw
on ``example_inputs``; one that is not (weight standardization, say) is left alone, with
the reason. Every folded parameter is computed in float64 and cast back, so device and
dtype are kept.
"""

from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bnkit.nn import functional as F
from bnkit.nn import is_batchnorm
from bnkit.tools import _dataflow, _fx
from bnkit.tools._seeded import seeded

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
    traced: bool = True  # the whole model traced as one graph
    trace_error: str | None = None  # the first module that could not be traced, and why
    subgraphs: list[str] = field(default_factory=list)  # submodules traced on their own
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
                else f" (not traceable as a whole: {self.trace_error}; folded inside "
                f"{len(self.subgraphs)} traceable submodule(s))"
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


def _hook_reason(layer: Any, bn: Any) -> str | None:
    """Why a hook forbids folding: the folded layer would not run the BatchNorm's hooks,
    and the layer's own hooks would see the folded weights and outputs."""
    for m, who in ((bn, "the BatchNorm"), (layer, type(layer).__name__)):
        kinds = _fx.hooks(m)
        if kinds:
            return f"{who} has {kinds}, which the folded layer would not run as they ran"
    return None


def _why_not_after(layer: Any, bn: Any) -> str | None:
    if (hooks := _hook_reason(layer, bn)) is not None:
        return hooks
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if out != bn.num_features:
        return (
            f"channel counts differ ({type(layer).__name__} gives {out}, BN has {bn.num_features})"
        )
    return None


def _why_not_before(layer: Any, bn: Any) -> str | None:
    if (hooks := _hook_reason(layer, bn)) is not None:
        return hooks
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


def _fold_traced(
    model: nn.Module, report: FoldReport, call: _Call | None, prefix: str, ctx: _Context
) -> nn.Module:
    from torch.fx.passes.shape_prop import ShapeProp

    # the layers BatchNorms fold into are leaves too (subclasses as well: their forward
    # may pad or reshape, but they own one weight and bias to fold into)
    gm = _fx.trace(model, leaf=lambda m: isinstance(m, _LAYERS))
    if call is not None:
        # shapes unknown when this fails: the Linear folds that need them are refused
        with contextlib.suppress(Exception), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(*call.args)
    mods = dict(gm.named_modules())

    def target(node: Any) -> nn.Module | None:
        return mods.get(node.target) if node.op == "call_module" else None

    def out_rank(node: Any) -> int | None:
        meta = node.meta.get("tensor_meta")
        return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def full(name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

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
        entry = FoldedLayer(full(name), False)
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
            elif (why := _why_not_after(prev, bn)) is not None or (
                why := ctx.fold_checked(prev, bn, "after", full(str(src.target)))
            ) is not None:
                reasons.append(why)
            else:
                node.replace_all_uses_with(src)
                gm.graph.erase_node(node)
                entry.folded, entry.into, entry.position = True, full(str(src.target)), "after"
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
            elif (why := _why_not_before(nxt, bn)) is not None or (
                why := ctx.fold_checked(nxt, bn, "before", full(str(users[0].target)))
            ) is not None:
                reasons.append(why)
            else:
                node.replace_all_uses_with(src)
                gm.graph.erase_node(node)
                entry.folded = True
                entry.into, entry.position = full(str(users[0].target)), "before"
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


@dataclass
class _Call:
    """The positional and keyword arguments of a module's first call on the example."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class _Context:
    """What the recursive fold knows: each module's first call on the example inputs
    (recorded on a copy of the model, so module paths match), and the check of a fold into
    a subclass of Conv/ConvTranspose/Linear on the activations it saw."""

    def __init__(self, calls: dict[str, _Call]) -> None:
        self.calls = calls

    def fold_checked(self, layer: Any, bn: Any, position: str, path: str) -> str | None:
        """Fold ``bn`` into ``layer``; None when done, else why not (nothing changed)."""
        if type(layer) in _LAYERS:
            fold_pair(layer, bn, position)
            return None
        call = self.calls.get(path)
        if call is None:
            return (
                f"{path} is a {type(layer).__name__} (a subclass) that did not run on the "
                "example inputs, so its fold cannot be checked"
            )
        (x, *rest) = call.args
        if position == "after":
            expect = bn(layer(x, *rest, **call.kwargs))
        else:
            expect = layer(bn(x), *rest, **call.kwargs)
        saved = (layer.weight, layer.bias)
        fold_pair(layer, bn, position)
        got = layer(x, *rest, **call.kwargs)
        err = (got.double() - expect.double()).abs().max().item()
        scale = expect.double().abs().max().item()
        tol = 1e-9 if expect.dtype == torch.float64 else 1e-4
        if not err <= tol * max(scale, 1.0):
            layer.weight, layer.bias = saved
            return (
                f"{path} is a {type(layer).__name__} whose output is not linear in its "
                f"weight and bias (folding changed it by {err:.2g}; e.g. weight "
                "standardization): left alone"
            )
        return None


def _record_calls(model: nn.Module, example: tuple[Any, ...]) -> dict[str, _Call]:
    calls: dict[str, _Call] = {}
    handles = []
    for name, m in model.named_modules():

        def hook(mod: nn.Module, args: Any, kwargs: Any, name: str = name) -> None:
            calls.setdefault(name, _Call(tuple(args), dict(kwargs)))

        handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with seeded():  # the calls of the reference forward (see _outputs)
            model(*example)
    finally:
        for h in handles:
            h.remove()
    return calls


def _fold_recursive(module: nn.Module, prefix: str, report: FoldReport, ctx: _Context) -> nn.Module:
    """Fold inside ``module``: trace it whole if it can be, else each child in turn."""
    call = ctx.calls.get(prefix)
    if call is not None and not is_batchnorm(module) and not call.kwargs:
        part = FoldReport()
        try:
            # on a copy: if the trace turns out not to be the module, nothing was touched
            folded = _fold_traced(copy.deepcopy(module), part, call, prefix, ctx)
            _fx.check_same(module, folded, call.args, "folded")
        except Exception as exc:  # fx cannot trace it (or not faithfully): look inside
            if report.trace_error is None:
                report.trace_error = f"{prefix or 'the model'}: {type(exc).__name__}: {exc}"
            if not prefix:
                report.traced = False
        else:
            if not part.layers:  # no BatchNorm in it: the module stays as it was
                return module
            report.layers.extend(part.layers)
            if prefix:
                report.subgraphs.append(prefix)
            return folded
    children = list(module.named_children())
    for i, (name, child) in enumerate(children):
        path = f"{prefix}.{name}" if prefix else name
        if not is_batchnorm(child):
            new = _fold_recursive(child, path, report, ctx)
            if new is not child:
                setattr(module, name, new)
            continue
        entry = FoldedLayer(path, False)
        report.layers.append(entry)
        reason = _bn_reason(child)
        prev_name, prev = children[i - 1] if i > 0 else (None, None)
        if reason is None and isinstance(module, nn.Sequential) and isinstance(prev, _LAYERS):
            prev_path = f"{prefix}.{prev_name}" if prefix else str(prev_name)
            prev_now = module._modules[str(prev_name)]
            why = _why_not_after(prev_now, child) or ctx.fold_checked(
                prev_now, child, "after", prev_path
            )
            if why is None:
                module._modules[name] = nn.Identity()
                entry.folded, entry.into, entry.position = True, prev_path, "after"
                continue
            reason = why
        entry.reason = reason or (
            f"it sits directly in {prefix or 'the model'} ({type(module).__name__}), which "
            "could not be traced, and not right after a Conv/Linear in an nn.Sequential: "
            "its data flow is unknown"
            if call is not None
            else f"{prefix or 'the model'} did not run on the example inputs"
        )
    return module


def _close(ref: list[Tensor], got: list[Tensor]) -> float | None:
    """The worst relative error of ``got`` against ``ref`` when within float rounding (of
    the dtype), else None."""
    worst = 0.0
    if len(ref) != len(got):
        return None
    for a, b in zip(ref, got, strict=True):
        if a.shape != b.shape:
            return None
        if not a.numel():
            continue
        err = (a.double() - b.double()).abs().max().item()
        scale = max(a.double().abs().max().item(), 1.0)
        tol = 1e-9 if a.dtype == torch.float64 else 1e-4
        if not err <= tol * scale:
            return None
        worst = max(worst, err / scale)
    return worst


def _permuted(bn: Any, order: list[int]) -> nn.Module:
    """An eval BatchNorm1d whose channel ``order[c]`` is ``bn``'s channel ``c``."""
    c = len(order)
    tmp = nn.BatchNorm1d(c, eps=bn.eps, affine=True).eval().double()
    idx = torch.tensor(order)
    w = getattr(bn, "weight", None)
    b = getattr(bn, "bias", None)
    rm, rv = tmp.running_mean, tmp.running_var
    assert rm is not None and rv is not None
    with torch.no_grad():
        rm[idx] = bn.running_mean.double().cpu()
        rv[idx] = bn.running_var.double().cpu()
        tmp.weight[idx] = w.double().cpu() if w is not None else torch.ones(c, dtype=torch.float64)
        tmp.bias[idx] = b.double().cpu() if b is not None else torch.zeros(c, dtype=torch.float64)
    return tmp.to(bn.running_mean.device)


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    head, _, leaf = path.rpartition(".")
    return (model.get_submodule(head) if head else model), leaf


def _fold_by_flow(
    model: nn.Module, example: tuple[Any, ...], report: FoldReport, ref: list[Tensor]
) -> None:
    """Fold the BatchNorms left unfolded by following the data flow of one forward
    (:mod:`bnkit.tools._dataflow`); each fold is kept only if the model's output on the
    example is reproduced."""
    todo = [e for e in report.layers if not e.folded]
    if not todo:
        return
    modules = dict(model.named_modules())
    todo = [e for e in todo if e.name in modules and _bn_reason(modules[e.name]) is None]
    if not todo:
        return
    try:
        with seeded():
            flow = _dataflow.record(
                model, example, lambda m: is_batchnorm(m) or isinstance(m, _LAYERS)
            )
    except Exception:  # a model that cannot run under a TorchFunctionMode: keep the fx result
        return
    for entry in todo:
        bn = modules[entry.name]
        x = flow.inputs.get(entry.name)
        if x is None or flow.calls.get(entry.name, 0) != 1:
            continue
        base, ops = flow.chain(x)
        layer_path = flow.produced_by.get(id(base))
        reason = None
        if layer_path is not None:
            reason = _try_after(model, flow, entry, bn, base, ops, layer_path, example, ref)
        if not entry.folded:
            why = _try_before(model, flow, entry, bn, example, ref)
            if not entry.folded and (reason or why):
                entry.reason = f"{entry.reason}; by data flow: {reason or why}"


def _try_after(
    model: nn.Module,
    flow: Any,
    entry: FoldedLayer,
    bn: Any,
    base: Tensor,
    ops: list[Any],
    layer_path: str,
    example: tuple[Any, ...],
    ref: list[Tensor],
) -> str | None:
    layer = model.get_submodule(layer_path)
    if flow.calls.get(layer_path, 0) != 1:
        return f"{layer_path} runs more than once"
    chain_ok = flow.uses.get(id(base), 0) == 1 and all(
        flow.uses.get(id(t), 0) == 1 for t in flow.views(flow.inputs[entry.name])
    )
    if not chain_ok:
        return f"the output of {layer_path} is used elsewhere too"
    if (why := _hook_reason(layer, bn)) is not None:
        return why
    axis = base.dim() - 1 if isinstance(layer, nn.Linear) else 1
    order = _dataflow.channel_map(base, axis, ops, bn.num_features)
    if order is None:
        return (
            f"the shape ops between {layer_path} and it do not keep each of its channels on "
            f"one output channel of {layer_path}"
        )
    return _commit(model, entry, bn, layer, layer_path, _permuted(bn, order), "after", example, ref)


def _try_before(
    model: nn.Module,
    flow: Any,
    entry: FoldedLayer,
    bn: Any,
    example: tuple[Any, ...],
    ref: list[Tensor],
) -> str | None:
    y = flow.outputs.get(entry.name)
    if y is None:
        return None
    users = [p for p, t in flow.inputs.items() if t is y and p != entry.name]
    if len(users) != 1 or flow.uses.get(id(y), 0) != 1:
        return None
    path = users[0]
    layer = model.get_submodule(path)
    if not isinstance(layer, _LAYERS) or flow.calls.get(path, 0) != 1:
        return None
    if isinstance(layer, nn.Linear) and y.dim() != 2:
        return "its output is not (N, C) for the following Linear"
    if (why := _why_not_before(layer, bn)) is not None:
        return why
    return _commit(model, entry, bn, layer, path, bn, "before", example, ref)


def _commit(
    model: nn.Module,
    entry: FoldedLayer,
    bn: Any,
    layer: Any,
    layer_path: str,
    affine: Any,
    position: str,
    example: tuple[Any, ...],
    ref: list[Tensor],
) -> str | None:
    """Fold, replace the BatchNorm by Identity, keep it only if the model's output holds."""
    saved = (layer.weight, layer.bias)
    parent, leaf = _parent(model, entry.name)
    fold_pair(layer, affine, position)
    parent._modules[leaf] = nn.Identity()
    try:
        ok = _close(ref, _outputs(model, example)) is not None
    except Exception:
        ok = False
    if not ok:
        layer.weight, layer.bias = saved
        parent._modules[leaf] = bn
        return f"folding into {layer_path} changed the model's output: left alone"
    entry.folded, entry.into, entry.position = True, layer_path, position
    entry.reason = None
    return None


def _outputs(model: nn.Module, example: tuple[Any, ...]) -> list[Tensor]:
    """The model's output tensors on the example, under one fixed random state (a model
    that draws random numbers in eval is compared with itself, not with other draws)."""
    with seeded():
        return _fx.flat(model(*example))


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
    example = _fx.as_tuple(example_inputs)
    try:
        # on a copy: a train-mode BatchNorm in the model would update its statistics
        ref = _outputs(copy.deepcopy(model), example)
    except Exception as exc:
        raise ValueError(
            f"fold: the model fails on example_inputs ({type(exc).__name__}: {exc})"
        ) from exc
    work = copy.deepcopy(model)
    ctx = _Context(_record_calls(copy.deepcopy(model), example))
    report = FoldReport()
    folded = _fold_recursive(work, "", report, ctx)
    _fold_by_flow(folded, example, report, ref)
    got = _outputs(copy.deepcopy(folded), example)
    for a, b in zip(ref, got, strict=True):
        err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        scale = a.double().abs().max().item() if a.numel() else 1.0
        report.max_abs_error = max(report.max_abs_error, err)
        report.max_rel_error = max(report.max_rel_error, err / max(scale, 1e-30))
    return folded, report
