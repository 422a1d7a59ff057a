"""FrozenBatchNorm1d/2d/3d: BatchNorm with fixed statistics and affine parameters.

Every tensor is a buffer (nothing for an optimizer to move), the running statistics are
always used, whatever the training flag, and the state_dict has BatchNorm's keys, so a
checkpoint moves freely between a BatchNorm and its frozen form.

A FrozenBatchNorm is deliberately *not* a ``torch.nn.BatchNorm*d`` (torchvision's
``FrozenBatchNorm2d`` is not either): helpers that recompute or synchronise statistics
(``torch.optim.swa_utils.update_bn``, precise BN, ``convert_sync_batchnorm``) must leave
it alone, which is what freezing means.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import Module

from bnkit.nn import _export
from bnkit.nn import functional as F
from bnkit.nn._family import member
from bnkit.nn._scriptable import ScriptableFrozenBatchNorm
from bnkit.nn.batchnorm import validate_layer

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d"]


class _FrozenBatchNorm(Module):
    """Shared base: ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``."""

    _version = 2
    _ranks: tuple[int, ...] = ()
    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor

    def __init__(
        self, num_features: int, eps: float = 1e-5, device: Any = None, dtype: Any = None
    ) -> None:
        super().__init__()
        F.check_eps(eps, training=False, where=type(self).__name__)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        # 1 - eps, so that a fresh layer is exactly the identity.
        self.register_buffer("running_var", torch.ones(num_features, **factory) - eps)
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    def _layer_name(self) -> str:
        return f"{type(self).__name__}({self.num_features})"

    def _validate(self, input: Tensor, batch_stats: bool = False) -> None:
        validate_layer(self, input, batch_stats=False)  # running statistics, always

    def forward(self, input: Tensor) -> Tensor:
        if _export.exporting():
            return _export.eval_op(self, input)
        self._validate(input)
        return F.apply_batch_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            False,
            0.0,
            self.eps,
        )

    def __prepare_scriptable__(self) -> Module:
        """``torch.jit.script`` compiles an equivalent module on the same buffers."""
        return ScriptableFrozenBatchNorm(self)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A BatchNorm with affine=False or bias=False has no weight/bias: identity affine.
        # An old checkpoint has no num_batches_tracked.
        for key, fill in (("weight", self.weight), ("bias", self.bias)):
            state_dict.setdefault(prefix + key, fill)
        state_dict.setdefault(prefix + "num_batches_tracked", self.num_batches_tracked)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @classmethod
    def from_batchnorm(cls, bn: Module) -> _FrozenBatchNorm:
        """A frozen copy of a BatchNorm (torch's or bnkit's) with its statistics and affine."""
        rm = getattr(bn, "running_mean", None)
        if rm is None:
            raise ValueError(
                f"{type(bn).__name__}({getattr(bn, 'num_features', '?')}) has no running "
                "statistics (track_running_stats=False), so there is nothing to freeze"
            )
        frozen = cls(bn.num_features, bn.eps, device=rm.device, dtype=rm.dtype)  # type: ignore[arg-type]
        frozen.load_state_dict({k: v.detach() for k, v in bn.state_dict().items()}, strict=False)
        return frozen


@member("frozen", 1)
class FrozenBatchNorm1d(_FrozenBatchNorm):
    """Frozen BatchNorm over (N, C) or (N, C, L) input."""


@member("frozen", 2)
class FrozenBatchNorm2d(_FrozenBatchNorm):
    """Frozen BatchNorm over (N, C, H, W) input."""


@member("frozen", 3)
class FrozenBatchNorm3d(_FrozenBatchNorm):
    """Frozen BatchNorm over (N, C, D, H, W) input."""
