"""The activations a BatchNorm can be fused with, in one table.

Each :class:`Activation` holds everything every path needs: the code the C++ kernels use
(``kNoAct``/``kRelu``/... in ``_kernels.cpp``, whose ``activation_codes()`` a test
compares with this table), the torch forward the plain path applies, its backward (the
gradient times the derivative at the pre-activation, for the torch-op backward), and the
fx patterns ``bnkit.fuse_activations`` recognises. Code 0 is "no activation".

Adding one (say GELU): a row here and, for the fused C++ passes, its case in
``_kernels.cpp`` (the enum, ``act_f``, ``act_grad``, ``with_op``, ``check_act`` and
``activation_codes``). A row whose C++ case is missing fails
``test_activation_table_matches_the_kernels``; an unknown code is a ``ValueError`` on the
Python paths and a ``RuntimeError`` from the kernels, never an un-activated output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["Activation", "NONE", "TABLE", "apply", "code", "gate", "names"]

NONE = 0  # the code of "no activation"


@dataclass(frozen=True)
class Activation:
    """One fusable activation."""

    name: str  # what ``batch_norm_act(..., activation=name)`` takes
    code: int  # the kernels' code
    forward: Callable[[Tensor], Tensor]  # the torch form, applied by the plain path
    # grad_out times the derivative at the pre-activation: backward(grad_out, pre)
    backward: Callable[[Tensor, Tensor], Tensor]
    # fx patterns: modules (and a predicate on their attributes), functions, method names
    modules: tuple[tuple[type[nn.Module], Callable[[nn.Module], bool]], ...] = ()
    functions: tuple[Callable[..., Tensor], ...] = ()
    methods: tuple[str, ...] = ()


def _always(m: nn.Module) -> bool:
    return True


def _hardtanh_0_6(m: nn.Module) -> bool:
    return (getattr(m, "min_val", None), getattr(m, "max_val", None)) == (0.0, 6.0)


TABLE: tuple[Activation, ...] = (
    Activation(
        "relu",
        1,
        torch.relu,
        lambda g, pre: torch.where(pre <= 0, torch.zeros_like(g), g),
        modules=((nn.ReLU, _always),),
        functions=(torch.relu, torch.relu_, nn.functional.relu),
        methods=("relu", "relu_"),
    ),
    Activation(
        "relu6",
        2,
        nn.functional.relu6,
        lambda g, pre: torch.where((pre <= 0) | (pre >= 6), torch.zeros_like(g), g),
        modules=((nn.ReLU6, _always), (nn.Hardtanh, _hardtanh_0_6)),
        functions=(nn.functional.relu6,),
    ),
)

_BY_NAME = {a.name: a for a in TABLE}
_BY_CODE = {a.code: a for a in TABLE}


def names() -> tuple[str, ...]:
    """The activation names, in table order."""
    return tuple(_BY_NAME)


def code(name: str | None, where: str = "batch_norm_act") -> int:
    """The code of activation ``name`` (``None``: no activation)."""
    if name is None:
        return NONE
    act = _BY_NAME.get(name) if isinstance(name, str) else None
    if act is None:
        raise ValueError(f"{where}: activation must be one of {names()} or None, got {name!r}")
    return act.code


def lookup(act: int) -> Activation | None:
    """The row of code ``act`` (None for :data:`NONE`); an unknown code is an error."""
    if act == NONE:
        return None
    row = _BY_CODE.get(act)
    if row is None:
        raise ValueError(
            f"activation code {act!r} is not one of {sorted(_BY_CODE)} (0: none); "
            f"codes come from bnkit.nn._activations.code()"
        )
    return row


def apply(y: Tensor, act: int) -> Tensor:
    """``act(y)`` with torch's ops."""
    row = lookup(act)
    return y if row is None else row.forward(y)


def gate(grad_out: Tensor, pre: Tensor, act: int) -> Tensor:
    """``grad_out`` times the activation's derivative at the pre-activation ``pre`` (torch
    ops: under a double backward ``pre`` depends on x and autograd differentiates this)."""
    row = lookup(act)
    return grad_out if row is None else row.backward(grad_out, pre)
