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
from torch.nn import Module
from torch.nn.modules.batchnorm import _BatchNorm as TorchBatchNorm
from torch.nn.modules.batchnorm import _NormBase

from bnkit.nn import _activations, _export, _kernels
from bnkit.nn import functional as F
from bnkit.nn._family import classes, is_batchnorm, member, torch_twin
from bnkit.nn._running import count_batch
from bnkit.nn._tensors import layer_tensor
from bnkit.nn._validate import check_momentum, validate

__all__ = [
    "is_batchnorm",
    "validate_layer",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
]

_DOC = r"""Applies Batch Normalization over a {rank} input, exactly as
``torch.nn.{name}`` does (from scratch; see ``docs/semantics.md``).

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

It is a subclass of ``torch.nn.{name}`` (``isinstance`` holds, so torch's helpers and
other libraries treat it as theirs) whose forward and backward are bnkit's own. While a
graph is captured for export, eval mode records torch's ``batch_norm`` op (see
:mod:`bnkit.nn._export`); ``torch.jit.script`` compiles torch's module on the same tensors.

Differences from torch (all stricter, none change a valid result): momentum outside
[0, 1] is rejected at construction (eps, as in torch, at the forward), and a bad input
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


def validate_layer(
    m: Any,
    input: Tensor,
    batch_stats: bool,
    tensors: tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None] | None = None,
) -> None:
    """:func:`~bnkit.nn.functional.validate` with every tensor of BatchNorm-like ``m``:
    ``tensors`` = (running_mean, running_var, weight, bias) where the caller has read them
    already, else read here (:func:`~bnkit.nn._tensors.layer_tensor`)."""
    if tensors is None:
        tensors = (
            layer_tensor(m, "running_mean"),
            layer_tensor(m, "running_var"),
            layer_tensor(m, "weight"),
            layer_tensor(m, "bias"),
        )
    validate(
        input,
        where=m._layer_name(),
        batch_stats=batch_stats,
        eps=m.eps,
        running_mean=tensors[0],
        running_var=tensors[1],
        weight=tensors[2],
        bias=tensors[3],
        ranks=m._ranks,
        # torch's lazy form with affine=False and track_running_stats=False has nothing
        # to infer: it keeps num_features 0 and takes any channel count (as torch does)
        num_features=None if m.num_features == 0 and tensors == (None,) * 4 else m.num_features,
        momentum=getattr(m, "momentum", None),
    )


def one_call(m: Any, input: Tensor, residual: Tensor | None, act: int) -> Tensor | None:
    """``act(m(input) [+ residual])`` for bnkit's BatchNorm module ``m`` in one C++ call
    (``layer_forward`` in _kernels.cpp: the checks, the count, the kernel and, where
    autograd records the call, its node), or None, having changed nothing, where the call
    is not the common one (a plain CPU tensor, nothing captured, every argument valid): the
    Python path then handles the case or words the error. (A small layer's time is mostly
    its Python, all the more where it runs between other layers: each function it passes
    through is a few cold cache lines.)"""
    call = _kernels.layer_call
    if call is None or torch.compiler.is_compiling() or not _plain_class(type(m)):
        return None
    return call(  # type: ignore[no-any-return]
        input,
        m._parameters,
        m._buffers,
        m.training,
        m.track_running_stats,
        m.eps,
        m.momentum,
        m._ranks,
        m.num_features,
        residual,
        act,
    )


_OVERRIDE_POINTS = ("_forward", "_validate", "_layer_name")
_PLAIN: dict[type, bool] = {}


def _plain_class(cls: type) -> bool:
    """``cls`` overrides none of the documented override points of :class:`BatchNormBase`
    (``_forward``, ``_validate``, ``_layer_name``): only then may the C++ one-call, which
    does their work itself, stand in for them. (Cached per class.)"""
    plain = _PLAIN.get(cls)
    if plain is None:
        lazy = issubclass(cls, _LazyBatchNorm)
        base = _LazyBatchNorm if lazy else BatchNormBase
        plain = all(getattr(cls, k) is getattr(base, k) for k in _OVERRIDE_POINTS)
        _PLAIN[cls] = plain
    return plain


class BatchNormBase(TorchBatchNorm):
    """Shared base: a subclass of ``torch.nn.modules.batchnorm._BatchNorm`` (so torch's
    helpers and other libraries treat every bnkit BatchNorm as a BatchNorm) whose forward
    is bnkit's own. Parameters, buffers, ``reset_*`` and state_dict versioning are torch's.

    Override points for subclasses, honoured on every call: ``_forward(input, residual,
    act)`` (the whole computation), ``_validate(input, batch_stats)`` (the checks) and
    ``_layer_name()`` (the name in messages); ``forward`` may be overridden too. A class
    that overrides one of the first three never takes the C++ one-call path."""

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
        name = type(self).__name__
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 0:
            raise ValueError(
                f"{name}: num_features must be a non-negative int (the channel count), "
                f"got {num_features!r}"
            )
        # eps is checked at the forward, as torch does (eps=-1 constructs; the training
        # forward says "eps must be positive")
        check_momentum(momentum, where=name)
        if momentum is not None and momentum > 0.5:
            warnings.warn(
                f"{name}: momentum={momentum} gives the new batch weight {momentum} in "
                f"torch's convention; Keras/TF/Flax momentum m is 1 - m here "
                f"(m=0.99 -> 0.01)",
                UserWarning,
                stacklevel=2,
            )
        _NormBase.__init__(
            self, num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, counter 0 (where there are buffers)."""
        if self.track_running_stats and self.running_mean is not None:
            super().reset_running_stats()

    def _layer_name(self) -> str:
        return f"{type(self).__name__}({self.num_features})"

    def _check_input_dim(self, input: Tensor) -> None:
        if isinstance(input, torch.fx.Proxy):  # fx tracing through torch's forward
            return
        validate(
            input,
            where=self._layer_name(),
            batch_stats=False,
            eps=self.eps,
            ranks=self._ranks,
            num_features=self.num_features,
        )

    def _validate(self, input: Tensor, batch_stats: bool) -> None:
        """Every tensor this forward will touch, checked before anything changes."""
        validate_layer(self, input, batch_stats)

    def forward(self, input: Tensor) -> Tensor:
        # an activation fused into this layer by fuse_activations' data-flow route (0: none)
        act = self.__dict__.get("_bnkit_act", 0)
        y = one_call(self, input, None, act)
        if y is not None:
            return y
        return self._forward(input, None, act)

    def _forward(self, input: Tensor, residual: Tensor | None, act: int) -> Tensor:
        """``act(self(input) + residual)`` (``act``: an activation code of
        ``bnkit.nn._activations``), fused into the normalization's passes where the
        fast path runs: what :func:`bnkit.nn.fused.batch_norm_act` calls. ``residual``
        must have the input's shape, dtype and device (the caller checks)."""
        running_mean = layer_tensor(self, "running_mean")
        running_var = layer_tensor(self, "running_var")
        training = self.training
        bn_training = training or (running_mean is None and running_var is None)
        if not bn_training and _export.exporting():
            return F.finish_activation(_export.eval_op(self, input), residual, act)
        if not isinstance(input, Tensor) and isinstance(input, torch.fx.Proxy):
            # torch.fx tracing through this layer (fx's default tracer makes only torch's
            # own modules leaves): record torch's ops, as tracing torch's layer does
            return F.finish_activation(TorchBatchNorm.forward(self, input), residual, act)
        weight, bias = layer_tensor(self, "weight"), layer_tensor(self, "bias")
        if _plain_class(type(self)):
            validate_layer(self, input, bn_training, (running_mean, running_var, weight, bias))
        else:
            self._validate(input, bn_training)
        factor: float | Tensor = 0.0
        track = self.track_running_stats
        if training and track and layer_tensor(self, "num_batches_tracked") is not None:
            factor = count_batch(self)
        # Buffers are passed only where they are used or updated.
        use_buffers = not training or track
        return F.apply_batch_norm(
            input,
            running_mean if use_buffers else None,
            running_var if use_buffers else None,
            weight,
            bias,
            bn_training,
            factor,
            self.eps,
            residual,
            act,
        )

    def __prepare_scriptable__(self) -> Module:
        """``torch.jit.script`` compiles torch's own module in place of this one (same
        parameters and buffers, shared, not copied): TorchScript cannot compile bnkit's
        Python forward, and torch's is the same function (followed by the activation
        fused into this layer, if any)."""
        act = self.__dict__.get("_bnkit_act", 0)
        if act:
            row = _activations.lookup(act)
            assert row is not None and row.modules
            cls, _ = row.modules[0]
            return torch.nn.Sequential(_export.as_torch(self), cls())
        return _export.as_torch(self)

    def extra_repr(self) -> str:
        act = self.__dict__.get("_bnkit_act", 0)
        if not act:
            return super().extra_repr()
        row = _activations.lookup(act)
        return f"{super().extra_repr()}, fused_activation={row.name if row else act!r}"


class _LazyBatchNorm(BatchNormBase):
    """Shared code of the lazy forms (combined with torch's ``LazyBatchNorm*d``, which
    supplies the uninitialized parameters): ``num_features`` from the first input, which
    is validated before anything is materialized."""

    def initialize_parameters(self, input: Tensor) -> None:  # type: ignore[override]
        if self.has_uninitialized_params():  # type: ignore[attr-defined,operator]
            validate(
                input, where=type(self).__name__, batch_stats=False, eps=self.eps, ranks=self._ranks
            )
        super().initialize_parameters(input)  # type: ignore[misc]

    def _layer_name(self) -> str:
        return type(self).__name__


@member("bnkit", 1)
class BatchNorm1d(BatchNormBase, torch.nn.BatchNorm1d):
    pass


@member("bnkit", 2)
class BatchNorm2d(BatchNormBase, torch.nn.BatchNorm2d):
    pass


@member("bnkit", 3)
class BatchNorm3d(BatchNormBase, torch.nn.BatchNorm3d):
    pass


@member("lazy", 1)
class LazyBatchNorm1d(torch.nn.LazyBatchNorm1d, _LazyBatchNorm):  # type: ignore[misc]
    cls_to_become = BatchNorm1d  # type: ignore[assignment]


@member("lazy", 2)
class LazyBatchNorm2d(torch.nn.LazyBatchNorm2d, _LazyBatchNorm):  # type: ignore[misc]
    cls_to_become = BatchNorm2d  # type: ignore[assignment]


@member("lazy", 3)
class LazyBatchNorm3d(torch.nn.LazyBatchNorm3d, _LazyBatchNorm):  # type: ignore[misc]
    cls_to_become = BatchNorm3d  # type: ignore[assignment]


_TORCH_OF: dict[type[Module], type[Module]] = {c: torch_twin(c) for c in classes("bnkit")}
_export.register_fusers(_TORCH_OF)
_export.register_quantized(_TORCH_OF)

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
