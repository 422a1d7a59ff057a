"""What the fx-based tools (fold, fuse_activations) share: a tracer that keeps every
BatchNorm one call, and the check that a trace computes what the module computes."""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn

from bnkit.nn import is_batchnorm
from bnkit.tools._seeded import seeded

__all__ = ["UnfaithfulTrace", "as_tuple", "check_same", "flat", "hooks", "trace"]


class UnfaithfulTrace(RuntimeError):
    """The traced graph does not compute what the module does."""


def trace(
    model: nn.Module,
    leaf: Callable[[nn.Module], bool] = lambda m: False,
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """``model`` traced by torch.fx with every BatchNorm (bnkit's too) and every module
    ``leaf`` accepts kept as one call."""

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return is_batchnorm(m) or leaf(m) or super().is_leaf_module(m, qualname)

    return fx.GraphModule(model, _Tracer().trace(model, concrete_args=concrete_args))


_HOOKS = {
    "_forward_pre_hooks": "forward pre-hooks",
    "_forward_hooks": "forward hooks",
    "_backward_pre_hooks": "backward hooks",
    "_backward_hooks": "backward hooks",
}


def hooks(m: nn.Module) -> str | None:
    """The kinds of hooks registered on ``m`` ("forward hooks and ..."; a pruning method is
    a forward pre-hook), or None. A graph rewrite that replaces a module call (folding,
    fusing) would no longer run them."""
    kinds = sorted({what for attr, what in _HOOKS.items() if getattr(m, attr, None)})
    return " and ".join(kinds) or None


def as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def flat(out: Any) -> list[Tensor]:
    """The tensors of a module's output (a tensor, a sequence or a dict of them)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [o for o in out if isinstance(o, Tensor)] if isinstance(out, Sequence) else []


def check_same(module: nn.Module, traced: nn.Module, args: tuple[Any, ...], what: str) -> None:
    """``traced`` (the trace of ``module``, ``what``: "folded", "fused") must compute what
    the module does on ``args``: a trace can silently drop control flow it cannot see
    (``torch.jit.isinstance`` on a proxy is False, a shape-dependent branch is frozen), and
    such a graph is not the module. Raises :class:`UnfaithfulTrace`."""
    # on copies: a train-mode BatchNorm inside would update its statistics; both from the
    # same random state (dropout, drop-connect), the caller's state left as it was
    with seeded():
        want = flat(copy.deepcopy(module)(*args))
    try:
        # (fx prints the failing line itself: kept off stderr)
        with seeded(), contextlib.redirect_stderr(io.StringIO()):
            got = flat(copy.deepcopy(traced)(*args))
    except Exception as exc:
        raise UnfaithfulTrace(
            f"the traced graph, {what}, fails where the module runs ({type(exc).__name__}: "
            f"{str(exc)[:200]})"
        ) from exc
    if len(want) != len(got):
        raise UnfaithfulTrace("the traced graph returns other outputs than the module")
    for a, b in zip(want, got, strict=True):
        if a.shape != b.shape:
            raise UnfaithfulTrace(
                f"the traced graph gives shape {tuple(b.shape)}, not {tuple(a.shape)}"
            )
        err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        scale = a.double().abs().max().item() if a.numel() else 0.0
        tol = 1e-9 if a.dtype == torch.float64 else 1e-4
        if not err <= tol * max(scale, 1.0):
            raise UnfaithfulTrace(
                f"the traced graph, {what}, differs from the module by {err:.2g} on the "
                "example (control flow the tracer does not see)"
            )
