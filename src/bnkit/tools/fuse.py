"""Fuse each BatchNorm with the activation (and residual add) that follows it.

``fuse_activations(model, example_inputs)`` converts the model's torch BatchNorms to
bnkit's (in place, as :func:`bnkit.convert` does), traces it with ``torch.fx`` and rewrites
every

    BatchNorm -> ReLU | ReLU6                    (conv blocks)
    BatchNorm -> add(residual) -> ReLU | ReLU6   (the end of a ResNet block)
    BatchNorm -> add(residual)                   (MobileNetV2's inverted residual)

into one call of :func:`bnkit.nn.fused.batch_norm_act`, which on the fast path applies the
add and the activation inside the normalization's own passes (forward and backward). The
result is a ``torch.fx.GraphModule`` holding the same modules (same parameters, buffers
and state_dict keys); it computes what the model computed, and still does if a helper
later swaps a BatchNorm for another module (the call then falls back to torch's ops).

Opt-in, because it needs a model ``torch.fx`` can trace (no data-dependent control flow)
and returns a GraphModule rather than the model's own class, as torch's own fx fusers do.
Left alone: a BatchNorm whose output has other users (it is needed on its own), an
in-place add into the residual (``r.add_(bn(x))`` mutates ``r``; fx itself records
``out += r`` as an out-of-place add), activations other than ReLU/ReLU6 (a fused SiLU
was measured no faster than torch's: its backward needs the sigmoid in both of its
passes; they stay torch's), and BatchNorm variants (SyncBatchNorm, Renorm, Ghost, Frozen),
which keep their own forward.
"""

from __future__ import annotations

import copy
import operator
import warnings
from typing import Any

import torch
from torch import fx, nn

from bnkit.nn import _activations
from bnkit.nn.fused import FUSABLE, batch_norm_act
from bnkit.tools import _dataflow, _fx
from bnkit.tools.convert import convert

__all__ = ["fuse_activations", "fused_sites"]

_ADDS = {operator.add, operator.iadd, torch.add}
_INPLACE_ADDS = {operator.iadd}


def _activation(node: fx.Node, modules: dict[str, nn.Module], src: fx.Node) -> str | None:
    """The name of the activation (a row of ``bnkit.nn._activations.TABLE``) that
    ``node`` applies to ``src`` and nothing else, or None."""
    if not node.args or node.args[0] is not src:
        return None
    if node.args[1:] or any(k != "inplace" for k in node.kwargs):
        return None
    for act in _activations.TABLE:
        if node.op == "call_module":
            m = modules.get(str(node.target))
            if m is None or _fx.hooks(m):  # (hooks: not fused away)
                return None
            if any(type(m) is cls and ok(m) for cls, ok in act.modules):
                return act.name
        elif (node.op == "call_function" and node.target in act.functions) or (
            node.op == "call_method" and node.target in act.methods
        ):
            return act.name
    return None


def _residual(node: fx.Node, src: fx.Node) -> fx.Node | None:
    """The other operand when ``node`` is ``src + other`` (a plain add, no alpha, into
    ``src`` when it is in place), else None."""
    if node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    if node.op == "call_function" and node.target in _ADDS:
        inplace = node.target in _INPLACE_ADDS
    elif node.op == "call_method" and node.target in ("add", "add_"):
        inplace = node.target == "add_"
    else:
        return None
    other = b if a is src else (a if b is src and not inplace else None)
    if not isinstance(other, fx.Node) or other is src:
        return None
    return other


def _act_of(m: nn.Module) -> str | None:
    for row in _activations.TABLE:
        if any(type(m) is cls and ok(m) for cls, ok in row.modules):
            return row.name
    return None


def _fuse_by_flow(model: nn.Module, example: tuple[Any, ...]) -> nn.Module | None:
    """For a model fx cannot trace whole: fuse each BatchNorm whose output goes only into
    an activation *module* (a row of the activation table), by the data flow of one
    recorded forward (:mod:`bnkit.tools._dataflow`). The BatchNorm keeps its name, state
    and type and applies the activation itself; the activation module becomes Identity.
    Kept only if the model computes what it did on the example (in both modes); None
    where nothing could be fused."""
    reference, model = model, copy.deepcopy(model)  # fused on a copy: a refusal loses nothing
    try:
        with torch.no_grad():
            flow = _dataflow.record(
                copy.deepcopy(model),
                example,
                lambda m: type(m) in FUSABLE or _act_of(m) is not None,
            )
    except Exception:
        return None
    mods = dict(model.named_modules())
    sites: list[str] = []
    for path, m in mods.items():
        if type(m) not in FUSABLE or flow.calls.get(path, 0) != 1 or _fx.hooks(m):
            continue
        y = flow.outputs.get(path)
        users = [p for p, t in flow.inputs.items() if y is not None and t is y and p != path]
        if len(users) != 1 or flow.uses.get(id(y), 0) != 1:
            continue
        act_path = users[0]
        act_mod = mods[act_path]
        act = _act_of(act_mod)
        if act is None or flow.calls.get(act_path, 0) != 1 or _fx.hooks(act_mod):
            continue
        m.__dict__["_bnkit_act"] = _activations.code(act)
        head, _, leaf = act_path.rpartition(".")
        (model.get_submodule(head) if head else model)._modules[leaf] = nn.Identity()
        sites.append(f"{path} + {act}")
    if not sites:
        return None
    try:
        with torch.no_grad():
            _fx.check_same(reference, model, example, "fused")
            other = (copy.deepcopy(reference).train(not model.training), copy.deepcopy(model))
            _fx.check_same(other[0], other[1].train(not model.training), example, "fused")
    except _fx.UnfaithfulTrace as exc:
        raise ValueError(
            f"fuse_activations: fusing {type(model).__name__} by its data flow changed its "
            f"output ({exc}); use the model unfused"
        ) from exc
    model.bnkit_fused = sites  # type: ignore[assignment]
    return model


def fused_sites(gm: nn.Module) -> list[str]:
    """What :func:`fuse_activations` fused, one line per site: ``"layer1.0.bn2 + add +
    relu"``."""
    sites: list[str] = getattr(gm, "bnkit_fused", [])
    return list(sites)


def fuse_activations(
    model: nn.Module, example_inputs: Any, concrete_args: dict[str, Any] | None = None
) -> nn.Module:
    """The model as a ``torch.fx.GraphModule`` whose BatchNorm -> [add ->] ReLU/ReLU6
    patterns run as one fused call each (see the module's docstring). torch's BatchNorms
    are first converted to bnkit's in place. ``example_inputs`` (a tensor or a tuple of
    positional inputs, as for :func:`bnkit.fold`) is run through the model and the fused
    graph (on copies: no statistics move) to check that the trace is the model: torch.fx
    can trace a model it does not see whole (shape-dependent branches, say) into a graph
    that computes something else. ``concrete_args`` goes to ``torch.fx.symbolic_trace``.
    :func:`fused_sites` lists what was fused.

    Where fx cannot trace the model whole, the model itself is returned with every
    BatchNorm whose output goes only into a ReLU/ReLU6 *module* fused by the data flow of
    one recorded forward (the BatchNorm keeps its name and state and applies the
    activation, the activation module becomes ``Identity``), checked on the example in
    both modes; an error where there is no such pair. (Then the returned model is a copy,
    which does not share its parameters with ``model``.)"""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_activations: expected an nn.Module, got {type(model).__name__}")
    convert(model, to="bnkit")
    name = type(model).__name__
    try:
        gm = _fx.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, ...)
        untraceable = ValueError(
            f"fuse_activations: torch.fx cannot trace {name} "
            f"({type(exc).__name__}: {exc}), and following its data flow found no "
            "BatchNorm -> ReLU/ReLU6 module pair to fuse; fusion needs a traceable forward "
            "(no control flow on tensor values), or use the model unfused"
        )
        fused_model = _fuse_by_flow(model, _fx.as_tuple(example_inputs))
        if fused_model is None:
            raise untraceable from exc
        return fused_model
    modules = dict(gm.named_modules())
    graph = gm.graph
    sites: list[str] = []
    for node in list(graph.nodes):
        if node.op != "call_module" or type(modules.get(str(node.target))) not in FUSABLE:
            continue
        if _fx.hooks(modules[str(node.target)]):  # the fused call would not run them
            continue
        if len(node.users) != 1 or len(node.args) != 1 or node.kwargs:
            continue
        user = next(iter(node.users))
        residual = _residual(user, node)
        act = _activation(user, modules, node)
        last, drop = user, [user]
        if residual is not None:
            act = None
            if len(user.users) == 1:
                after = next(iter(user.users))
                act = _activation(after, modules, user)
                if act is not None:
                    last, drop = after, [after, user]
        elif act is None:
            continue
        with graph.inserting_before(last):
            bn = graph.get_attr(str(node.target))
            fused = graph.call_function(
                batch_norm_act,
                args=(bn, node.args[0], residual),
                kwargs={"activation": act},
            )
        last.replace_all_uses_with(fused)
        for dead in (*drop, node):
            graph.erase_node(dead)
        parts = [str(node.target), *(["add"] if residual else []), *([act] if act else [])]
        sites.append(" + ".join(parts))
    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    gm.bnkit_fused = sites  # type: ignore[assignment]
    example = _fx.as_tuple(example_inputs)
    try:
        with torch.no_grad():
            _fx.check_same(model, gm, example, "fused")
    except _fx.UnfaithfulTrace as exc:
        raise ValueError(
            f"fuse_activations: torch.fx's trace of {name} is not the model ({exc}); "
            "use the model unfused"
        ) from exc
    # fx fixes Python branches on `self.training` at trace time: say so if the graph is
    # the model only in the mode it was traced in
    mode = model.training
    other = (copy.deepcopy(model).train(not mode), copy.deepcopy(gm).train(not mode))
    try:
        with torch.no_grad():
            _fx.check_same(*other, example, "fused")
    except _fx.UnfaithfulTrace:
        traced, untraced = ("training", "eval") if mode else ("eval", "training")
        warnings.warn(
            f"fuse_activations: the fused {name} computes the model in {traced} mode only "
            f"(it branches on self.training, which torch.fx fixes at trace time); for "
            f"{untraced} mode use the model or fuse it again in that mode",
            UserWarning,
            stacklevel=2,
        )
    return gm
