"""Modules that ``torch.jit.script`` compiles in place of bnkit's (see ``_export``).

No ``from __future__ import annotations`` here: TorchScript reads the annotations.
"""

from typing import Any

import torch
from torch import Tensor
from torch.nn import Module

__all__ = ["ScriptableFrozenBatchNorm"]


class ScriptableFrozenBatchNorm(Module):
    """What ``torch.jit.script`` compiles for a FrozenBatchNorm: the running statistics
    always, whatever the training flag; the same buffers."""

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

    def __init__(self, m: Any) -> None:
        super().__init__()
        self.eps = float(m.eps)
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            self._buffers[name] = m._buffers[name]

    def forward(self, input: Tensor) -> Tensor:
        return torch.nn.functional.batch_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            False,
            0.0,
            self.eps,
        )
