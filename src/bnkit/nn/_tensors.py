"""How bnkit's layers read their own tensors (weight, bias, running statistics)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["layer_tensor"]


def layer_tensor(m: Any, name: str) -> Tensor | None:
    """``m.<name>``: read from the module's parameter or buffer dict where it is there
    (``Module.__getattr__`` costs a fraction of a microsecond per name, on every call of
    every small layer), else as the attribute: ``torch.nn.utils.prune`` and
    ``torch.nn.utils.parametrize`` take a tensor out of ``_parameters`` and compute it on
    access (a pruned weight, a parametrized one), and a layer must use what they compute,
    as torch's does."""
    params = m._parameters
    if name in params:
        return params[name]  # type: ignore[no-any-return]
    buffers = m._buffers
    if name in buffers:
        return buffers[name]  # type: ignore[no-any-return]
    return getattr(m, name, None)
