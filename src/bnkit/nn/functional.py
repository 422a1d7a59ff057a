"""BatchNorm's public functional API, and the entry points every layer calls.

Each entry point validates (or is called after :func:`~bnkit.nn._validate.validate`), asks
:mod:`bnkit.nn._router` for the route, and runs it: the C++ kernel (alone or in its
autograd node) or bnkit's math in torch ops (:mod:`~bnkit.nn._stats` forward,
:mod:`~bnkit.nn._backward` gradients, :mod:`~bnkit.nn._running` running statistics).
Conventions are torch 2.13's (``docs/semantics.md``):

* statistics are reduced over every dimension except dim 1 (channels), ``n = numel / C``;
* training normalizes with the *biased* variance and feeds the *unbiased* one
  (``var * n / (n - 1)``) into the running estimate;
* ``running = (1 - f) * running + f * batch`` with ``f = momentum``, or, when
  ``momentum is None``, ``f = 1 / num_batches_tracked`` (a cumulative average).

A Tensor subclass with its own ``__torch_function__`` (MONAI's MetaTensor, ...) sees each
entry point as it sees torch's ``batch_norm``: it is handed the call (and, by default,
runs it with its handling off and returns the result as its own type).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from bnkit.nn import _activations, _router
from bnkit.nn._backward import TrainNorm, train_backward
from bnkit.nn._router import Path
from bnkit.nn._running import merge_stats, running_factor, update_running_stats
from bnkit.nn._stats import (
    acc_dtype,
    batch_stats_torch,
    channel_shape,
    compiled_train,
    compute_dtype,
    differentiable_stats,
    eval_affine,
    eval_forward,
    inv_std,
)
from bnkit.nn._validate import (
    UnsupportedDtypeError,
    check_batch_size,
    check_eps,
    check_floating,
    check_input,
    check_momentum,
    refuse_stat_tangents,
    validate,
)

__all__ = [
    "BatchNormState",
    "UnsupportedDtypeError",
    "apply_batch_norm",
    "batch_norm",
    "batch_norm_stateless",
    "batch_stats",
    "channel_shape",
    "check_batch_size",
    "check_eps",
    "check_momentum",
    "differentiable_stats",
    "eval_affine",
    "finish_activation",
    "inv_std",
    "merge_stats",
    "normalize_eval",
    "normalize_train",
    "running_factor",
    "train_backward",
    "update_running_stats",
    "validate",
]


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` (N, C, *), without gradients.

    Computed with the same stable scheme the layers use and returned in the accumulation
    dtype (float64; float32 on MPS), ready to be merged across batches with
    :func:`merge_stats`.
    """
    check_input(x, "batch_stats")
    check_floating(x, "batch_stats")
    if x.numel() == 0:
        raise ValueError(f"batch_stats: the input {tuple(x.shape)} holds no values")
    fast = _router.data(x)
    if fast is not None:
        return fast.stats(x.detach())
    return batch_stats_torch(x)


def finish_activation(y: Tensor, residual: Tensor | None, act: int) -> Tensor:
    """``act(y + residual)`` with torch's ops (the unfused form of every fused path; an
    unknown code is an error)."""
    if residual is not None:
        y = y + residual
    return _activations.apply(y, act)


def _train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    residual: Tensor | None = None,
    act: int = _activations.NONE,
    running: tuple[Tensor | None, Tensor | None, float | Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The training normalization by its route: ``(act(bn(x) + residual), mean, biased
    var)``; ``running = (running_mean, running_var, factor)`` are updated in place."""
    rm, rv, factor = running if running is not None else (None, None, 0.0)
    route = _router.train(x, weight, bias, residual, rm, rv)
    fast = route.fast
    if fast is not None:
        xk = x.contiguous() if route.copy else x
        in_kernel = None
        if route.buffers and rm is not None and rv is not None and not isinstance(factor, Tensor):
            in_kernel = (rm, rv, float(factor))
        if route.path is Path.KERNEL:
            # (a Function's apply would add a few microseconds: most of a small layer's call)
            y, mean, var, _ = fast.forward_train(
                xk, weight, bias, eps=eps, running=in_kernel, residual=residual, act=act
            )
        else:
            y, mean, var = fast.train_node(
                xk, weight, bias, eps=eps, running=in_kernel, residual=residual, act=act
            )
        if in_kernel is None and (rm is not None or rv is not None):
            _update(x, rm, rv, mean, var, factor)
        return y, mean, var
    if x.numel() == 0:
        # Keep the empty output connected to the graph, as torch does.
        y = x.to(compute_dtype(x))
        if weight is not None:
            y = y * weight.to(y.dtype).view(channel_shape(x))
        if bias is not None:
            y = y + bias.to(y.dtype).view(channel_shape(x))
        empty = torch.zeros(x.shape[1], dtype=acc_dtype(x), device=x.device)
        return finish_activation(y.to(x.dtype), residual, act), empty, empty.clone()
    if route.path is Path.COMPILED:
        y, mean, var = compiled_train(x, weight, bias, eps)
    else:
        y, mean, var = TrainNorm.apply(x, weight, bias, eps)
    if rm is not None or rv is not None:
        _update(x, rm, rv, mean, var, factor)
    return finish_activation(y, residual, act), mean, var


def _update(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    factor: float | Tensor,
) -> None:
    """The running-statistic update with torch's ops, in place."""
    n = x.numel() // x.shape[1]
    with torch.no_grad():
        rm = running_mean if running_mean is not None else mean
        rv = running_var if running_var is not None else var
        new_mean, new_var = update_running_stats(rm, rv, mean, var, n, factor)
        if running_mean is not None:
            running_mean.copy_(new_mean)
        if running_var is not None:
            running_var.copy_(new_var)


def normalize_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalize with batch statistics; returns ``(y, mean, biased_var)``.

    ``y`` is differentiable (closed-form backward, itself differentiable); ``mean`` and
    ``biased_var`` are detached per-channel statistics in float64 (float32 on MPS).
    """
    if type(x) is not Tensor and has_torch_function_variadic(x):
        return handle_torch_function(  # type: ignore[no-any-return]
            normalize_train, (x,), x, weight, bias, eps
        )
    return _train(x, weight, bias, eps)


def normalize_eval(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    residual: Tensor | None = None,
    act: int = _activations.NONE,
) -> Tensor:
    """Normalize with given statistics: ``(x - mean) / sqrt(var + eps) * weight + bias``
    (then ``act(... + residual)``, see :func:`apply_batch_norm`).

    Differentiable in ``x``, ``weight`` and ``bias`` (and in the statistics, should they
    require grad); the backward is ``grad * weight / sqrt(var + eps)``.
    """
    if type(x) is not Tensor and has_torch_function_variadic(x, residual):
        args = (x, running_mean, running_var, weight, bias, eps, residual, act)
        return handle_torch_function(normalize_eval, (x, residual), *args)  # type: ignore[no-any-return]
    route = _router.eval(x, weight, bias, residual, running_mean, running_var)
    fast = route.fast
    if fast is not None:
        xk = x.contiguous() if route.copy else x  # (autograd carries the gradient back)
        rm, rv = running_mean, running_var
        if route.path is Path.KERNEL:  # one pass, the activation and residual included
            return fast.forward_eval(xk, rm, rv, weight, bias, eps=eps, residual=residual, act=act)
        y = fast.eval_node(xk, weight, bias, rm, rv, eps=eps)
        return finish_activation(y, residual, act)
    y = eval_forward(x, running_mean, running_var, weight, bias, eps)
    return finish_activation(y, residual, act)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Drop-in for :func:`torch.nn.functional.batch_norm`, written from scratch.

    In training mode, normalizes with batch statistics and, where ``running_mean`` /
    ``running_var`` are given, updates them in place with ``momentum``. In eval mode,
    normalizes with ``running_mean`` / ``running_var``, which must be given.
    """
    if isinstance(input, Tensor) and input.dim() == 1:
        # torch normalizes an empty 1-D input to an empty output (there is no channel dim),
        # scaled by weight[0] and shifted by bias[0] so that the graph and torch's type
        # promotion are kept; any other 1-D input is refused with a RuntimeError
        if training:
            check_batch_size(input.size())
        check_eps(eps, training)
        if input.numel() == 0:
            out = input.clone()
            if weight is not None:
                out = out * weight[0]
            if bias is not None:
                out = out + bias[0]
            return out
        raise RuntimeError(
            f"batch_norm: expected an input of shape (N, C, *) with at least 2 dims, got a "
            f"1D input of shape {tuple(input.shape)}"
        )
    validate(
        input,
        where="batch_norm",
        batch_stats=training,
        eps=eps,
        running_mean=running_mean,
        running_var=running_var,
        weight=weight,
        bias=bias,
    )
    if not isinstance(momentum, (int, float)) or isinstance(momentum, bool):
        raise ValueError(f"batch_norm: momentum must be a float, got {momentum!r}")
    return apply_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def apply_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    factor: float | Tensor,
    eps: float,
    residual: Tensor | None = None,
    act: int = _activations.NONE,
) -> Tensor:
    """:func:`batch_norm` after :func:`validate` has accepted every argument (the layers
    validate once, then call this). In training mode the given running buffers are updated
    in place with weight ``factor`` for the new batch.

    With ``residual`` (a tensor of the input's shape, dtype and device: the caller checks)
    and/or an activation code ``act`` (``bnkit.nn._activations``) the result is
    ``act(bn(input) + residual)``, in one pass over memory on the kernels and with torch's
    ops everywhere else."""
    if type(input) is not Tensor and has_torch_function_variadic(input, residual):
        args = (input, running_mean, running_var, weight, bias, training, factor, eps)
        return handle_torch_function(  # type: ignore[no-any-return]
            apply_batch_norm, (input, residual), *args, residual, act
        )
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError(
                "batch_norm: running_mean and running_var must be given in eval mode "
                "(training=False); pass training=True to normalize with batch statistics"
            )
        if fwAD._current_level >= 0:
            refuse_stat_tangents(input, running_mean, running_var, weight, bias)
        return normalize_eval(input, running_mean, running_var, weight, bias, eps, residual, act)
    return _train(input, weight, bias, eps, residual, act, (running_mean, running_var, factor))[0]


class BatchNormState(NamedTuple):
    """What :func:`batch_norm_stateless` returns: the output and the new state."""

    output: Tensor
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None


def batch_norm_stateless(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    num_batches_tracked: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> BatchNormState:
    """Pure BatchNorm: returns the output and the new running statistics, mutates nothing.

    Same semantics as the modules (``momentum=None`` is the cumulative average and needs
    ``num_batches_tracked``, which the result returns incremented in training mode).
    Usable under :func:`torch.func.vmap`, :func:`torch.func.grad` and
    ``torch.compile(fullgraph=True)``.
    """
    where = "batch_norm_stateless"
    check_input(input, where)
    if training:
        check_batch_size(input.size(), where)
    check_eps(eps, training, where)
    check_floating(input, where)
    check_momentum(momentum, where)
    if momentum is None and training and running_mean is not None and num_batches_tracked is None:
        raise ValueError(f"{where}: momentum=None (cumulative average) needs num_batches_tracked")
    use_batch = training or (running_mean is None and running_var is None)
    if not use_batch:
        assert running_mean is not None and running_var is not None
        y = normalize_eval(input, running_mean, running_var, weight, bias, eps)
        return BatchNormState(y, running_mean, running_var, num_batches_tracked)
    y, mean, var = normalize_train(input, weight, bias, eps)
    new_count = num_batches_tracked
    if training and num_batches_tracked is not None:
        new_count = num_batches_tracked + 1
    new_mean, new_var = running_mean, running_var
    if training and running_mean is not None and running_var is not None and input.numel() > 0:
        n = input.numel() // input.shape[1]
        assert momentum is not None or new_count is not None
        factor = running_factor(momentum, new_count if new_count is not None else 0)
        new_mean, new_var = update_running_stats(
            running_mean, running_var, mean.detach(), var.detach(), n, factor
        )
    return BatchNormState(y, new_mean, new_var, new_count)
