"""BatchNorm followed by an activation (and a residual add before it), in one pass.

``batch_norm_act(bn, x, residual, activation)`` is exactly ``act(bn(x) + residual)`` for
*any* BatchNorm-like module ``bn``: where ``bn`` is one of bnkit's plain
``BatchNorm1d/2d/3d`` and the fast path runs, the add and the activation happen inside the
normalization's output pass (forward) and the activation's derivative gates the incoming
gradient inside its statistics pass (backward), saving whole passes over memory; anything
else (torch's layers, SyncBatchNorm, the variants, FrozenBatchNorm, a module some helper
put in its place, the plain backend, CUDA, a graph being captured) is computed as
``act(bn(x) + residual)`` with torch's ops. So replacing the layer behind a fused call can
make it slower, never different.

:func:`bnkit.fuse_activations` (``bnkit.tools.fuse``) rewrites a traced model's
``BatchNorm -> [add ->] ReLU/ReLU6`` patterns into calls of this function.
"""

from __future__ import annotations

from torch import Tensor
from torch.nn import Module

from bnkit.nn import _activations, _family, _router
from bnkit.nn import functional as F
from bnkit.nn.batchnorm import BatchNormBase, one_call

__all__ = ["ACTIVATIONS", "FUSABLE", "batch_norm_act"]

ACTIVATIONS = _activations.names()  # what they fuse
FUSABLE = _family.classes("bnkit")  # the classes whose passes take the activation


def batch_norm_act(
    bn: Module, input: Tensor, residual: Tensor | None = None, activation: str | None = None
) -> Tensor:
    """``activation(bn(input) + residual)``, fused where bnkit's kernels can do it.

    Args:
        bn: the BatchNorm module (its mode, parameters, buffers and counter are used and
            updated exactly as ``bn(input)`` would)
        input: its input
        residual: added to the normalized output before the activation (``None``: no
            add); where it is not a tensor of the input's shape, dtype and device (a
            broadcast, say) the add is torch's
        activation: ``"relu"``, ``"relu6"`` or ``None``
    """
    act = _activations.code(activation)
    if type(bn) in FUSABLE:
        assert isinstance(bn, BatchNormBase)
        y = one_call(bn, input, residual, act)  # the common call, in one C++ call
        if y is not None:
            return y
        # (the residual is checked here, not while a graph is captured: the shape test
        # would be recorded as a constant, and the kernels step aside there anyway)
        if isinstance(input, Tensor) and (
            residual is None
            or (
                isinstance(residual, Tensor)
                and not _router.capturing(input)
                and residual.shape == input.shape
                and residual.dtype == input.dtype
                and residual.device == input.device
            )
        ):
            return bn._forward(input, residual, act)
    return F.finish_activation(bn(input), residual, act)
