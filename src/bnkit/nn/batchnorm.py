"""BatchNorm1d/2d/3d and their lazy forms: from scratch, a drop-in for torch's modules.

The modules hold parameters and buffers exactly as ``torch.nn.BatchNorm*`` does (same
names, shapes, dtypes, state_dict keys and version) and hand every computation to
:mod:`bnkit.nn.functional`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module, Parameter, init
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from bnkit.nn import functional as F

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
]

_DOC = r"""Applies Batch Normalization over a {rank} input, exactly as
``torch.nn.{name}`` does (from scratch; see ``SEMANTICS.md``).

.. math::

    y = \frac{{x - \mathrm{{E}}[x]}}{{\sqrt{{\mathrm{{Var}}[x] + \epsilon}}}} * \gamma + \beta

The mean and variance are computed per channel (dim 1) over the mini-batch and every
other dimension. Training normalizes with the *biased* variance (``correction=0``) and
stores the *unbiased* one (``correction=1``) in the running estimate. Eval mode
normalizes with ``running_mean`` / ``running_var``.

.. note::
    ``momentum`` follows torch's convention, the weight of the *new* batch:
    ``running = (1 - momentum) * running + momentum * batch``. Keras/TF and Flax use the
    opposite (``momentum_torch = 1 - momentum_keras``); a value above 0.5 triggers a
    warning because it is almost always a pasted Keras value. ``momentum=None`` gives the
    cumulative average over all batches seen (``num_batches_tracked`` of them).

Differences from torch (all stricter, none change a valid result): arguments are
validated at construction (momentum outside [0, 1], negative eps), and a bad input
(wrong rank, channel count or dtype, one value per channel in training) is rejected
*before* ``num_batches_tracked`` is incremented, with the layer named in the message.
Statistics are computed with a shifted two-pass scheme and float64 partial sums, so they
are at least as accurate as torch's for every memory format.

Args:
    num_features: number of channels ``C`` of the input
    eps: added to the variance for numerical stability. Default: 1e-5
    momentum: weight of the new batch in the running statistics, or ``None`` for a
        cumulative average. Default: 0.1
    affine: learnable per-channel ``weight`` and ``bias``. Default: ``True``
    track_running_stats: keep ``running_mean``/``running_var``/``num_batches_tracked``;
        when ``False`` there are no buffers and batch statistics are used in both modes.
        Default: ``True``
    bias: with ``affine=True``, whether to learn the additive ``bias``. Default: ``True``

Shape:
    - Input: {shape}
    - Output: same shape and memory format as the input

Examples::

    >>> import torch, bnkit
    >>> m = bnkit.{name}(4)
    >>> y = m(torch.randn({example}) * 3 + 5)
"""


def count_batch(m: Any) -> float:
    """Count one training batch in ``m.num_batches_tracked`` and return the weight of its
    statistics in the running average: ``momentum``, or ``1 / count`` for
    ``momentum=None`` (the cumulative average). Works on torch's BatchNorm too."""
    m.num_batches_tracked.add_(1)
    return 1.0 / float(m.num_batches_tracked) if m.momentum is None else float(m.momentum)


def track_batch(m: Any, mean: Tensor, var: Tensor, n: int) -> None:
    """The running-statistic update of BatchNorm-like ``m`` (torch's rule, counter
    included) from statistics computed elsewhere: the mean and biased variance of ``n``
    values per channel (SyncBatchNorm's global batch, Ghost/Renorm, accumulate)."""
    if not (m.track_running_stats and m.num_batches_tracked is not None):
        return
    factor = count_batch(m)
    if n == 0 or m.running_mean is None or m.running_var is None:
        return
    with torch.no_grad():
        new_m, new_v = F.update_running_stats(m.running_mean, m.running_var, mean, var, n, factor)
        m.running_mean.copy_(new_m)
        m.running_var.copy_(new_v)


class _BatchNorm(Module):
    """Shared base: parameters, buffers, state_dict versioning and the forward."""

    _version = 2
    __constants__ = ("track_running_stats", "momentum", "eps", "num_features", "affine")
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    _ranks: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 0:
            raise ValueError(
                f"{name}: num_features must be a non-negative int (the channel count), "
                f"got {num_features!r}"
            )
        F.check_eps(eps, training=False, where=name)
        F.check_momentum(momentum, where=name)
        if momentum is not None and momentum > 0.5:
            warnings.warn(
                f"{name}: momentum={momentum} gives the new batch weight {momentum} in "
                f"torch's convention; Keras/TF/Flax momentum m is 1 - m here "
                f"(m=0.99 -> 0.01)",
                UserWarning,
                stacklevel=2,
            )
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.running_mean: Tensor | None
        self.running_var: Tensor | None
        self.num_batches_tracked: Tensor | None
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, counter 0."""
        if self.track_running_stats and self.running_mean is not None:
            assert self.running_var is not None and self.num_batches_tracked is not None
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset running statistics, weight to 1 and bias to 0."""
        self.reset_running_stats()
        if self.affine:
            init.ones_(self.weight)
            if self.bias is not None:
                init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )

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
        version = local_metadata.get("version")
        key = prefix + "num_batches_tracked"
        # Version 2 added num_batches_tracked: older checkpoints load with the counter
        # kept as it is (0 for a fresh module).
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            nbt = self.num_batches_tracked
            state_dict[key] = (
                nbt
                if nbt is not None and nbt.device != torch.device("meta")
                else torch.tensor(0, dtype=torch.long)
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _layer_name(self) -> str:
        return f"{type(self).__name__}({self.num_features})"

    def _check_input_dim(self, input: Tensor) -> None:
        if not isinstance(input, Tensor):
            raise TypeError(
                f"{self._layer_name()}: expected a torch.Tensor, got {type(input).__name__}"
            )
        if input.dim() not in self._ranks:
            want = " or ".join(f"{r}D" for r in self._ranks)
            raise ValueError(
                f"{self._layer_name()}: expected {want} input (got {input.dim()}D input of "
                f"shape {tuple(input.shape)})"
            )
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{self._layer_name()}: expected {self.num_features} channels in dim 1, got "
                f"{input.shape[1]} (input shape {tuple(input.shape)})"
            )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        where = self._layer_name()
        # Validate before touching the counter: a rejected batch changes nothing.
        if self.training:
            F.check_batch_size(input.size(), where)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        F.check_eps(self.eps, bn_training, where)
        factor: float = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            factor = count_batch(self)
        # Buffers are passed only where they are used or updated.
        track = not self.training or self.track_running_stats
        return F._batch_norm(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            bn_training,
            factor,
            self.eps,
            where,
            checked=True,
        )


class _LazyBatchNorm(LazyModuleMixin, _BatchNorm):
    """Shared base of the lazy forms: ``num_features`` is taken from the first input."""

    weight: UninitializedParameter  # type: ignore[assignment]
    bias: UninitializedParameter  # type: ignore[assignment]
    cls_to_become: Any = None

    def __init__(
        self,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        # Build with no tensors, then put uninitialized ones in their place.
        super().__init__(0, eps, momentum, False, False, **factory, bias=False)
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = UninitializedParameter(**factory)
            if bias:
                self.bias = UninitializedParameter(**factory)
        if track_running_stats:
            self.running_mean = UninitializedBuffer(**factory)
            self.running_var = UninitializedBuffer(**factory)
            self.num_batches_tracked = torch.tensor(0, dtype=torch.long, device=device)

    def reset_parameters(self) -> None:
        if not self.has_uninitialized_params() and self.num_features != 0:
            super().reset_parameters()

    def _check_input_dim(self, input: Tensor) -> None:
        if self.has_uninitialized_params():
            return  # checked again once materialized
        super()._check_input_dim(input)

    def initialize_parameters(self, input: Tensor) -> None:  # type: ignore[override]
        if not self.has_uninitialized_params():
            return
        if input.dim() not in self._ranks:
            want = " or ".join(f"{r}D" for r in self._ranks)
            raise ValueError(
                f"{type(self).__name__}: expected {want} input (got {input.dim()}D input)"
            )
        self.num_features = input.shape[1]
        if self.affine:
            self.weight.materialize((self.num_features,))
            if self.bias is not None:
                self.bias.materialize((self.num_features,))
        if self.track_running_stats:
            assert isinstance(self.running_mean, UninitializedBuffer)
            assert isinstance(self.running_var, UninitializedBuffer)
            self.running_mean.materialize((self.num_features,))
            self.running_var.materialize((self.num_features,))
        self.reset_parameters()


class BatchNorm1d(_BatchNorm):
    _ranks = (2, 3)


class BatchNorm2d(_BatchNorm):
    _ranks = (4,)


class BatchNorm3d(_BatchNorm):
    _ranks = (5,)


class LazyBatchNorm1d(_LazyBatchNorm):
    _ranks = (2, 3)
    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_LazyBatchNorm):
    _ranks = (4,)
    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_LazyBatchNorm):
    _ranks = (5,)
    cls_to_become = BatchNorm3d


for _cls, _rank, _shape, _ex in (
    (BatchNorm1d, "2D or 3D", "(N, C) or (N, C, L)", "8, 4"),
    (BatchNorm2d, "4D", "(N, C, H, W)", "8, 4, 5, 5"),
    (BatchNorm3d, "5D", "(N, C, D, H, W)", "8, 4, 3, 5, 5"),
):
    _cls.__doc__ = _DOC.format(rank=_rank, name=_cls.__name__, shape=_shape, example=_ex)
for _lazy, _eager in (
    (LazyBatchNorm1d, BatchNorm1d),
    (LazyBatchNorm2d, BatchNorm2d),
    (LazyBatchNorm3d, BatchNorm3d),
):
    _lazy.__doc__ = (
        f"A :class:`{_eager.__name__}` whose ``num_features`` is inferred from the first "
        f"input (dim 1); it becomes a :class:`{_eager.__name__}` once materialized."
    )
