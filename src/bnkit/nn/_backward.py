"""Gradients: the closed-form backward of the normalization, in both modes, and its
forward-mode derivative.

Training, with ``xhat = (x - mean) * invstd`` and ``g = grad_out * weight`` over the ``n``
values of a channel::

    dx = invstd / n * (n g - sum(g) - xhat sum(g xhat))
    dweight = sum(grad_out xhat),  dbias = sum(grad_out)

Eval: ``dx = grad_out * weight * invstd``, ``dweight = sum(grad_out (x - mean)) * invstd``.
The forward derivative: ``d xhat = invstd (dx - mean(dx) - xhat mean(xhat dx))``. All are
written with differentiable torch ops, so a double backward differentiates them exactly;
the C++ kernels' backward computes the same sums, and the C++ autograd nodes call
:func:`train_graph_backward` / :func:`eval_graph_backward` under a double backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bnkit.nn import _activations, _router
from bnkit.nn._stats import (
    affine,
    channel_shape,
    channel_sum,
    compute_dtype,
    differentiable_stats,
    inv_std,
    train_forward,
)

__all__ = ["TrainNorm", "eval_graph_backward", "train_backward", "train_graph_backward"]


def train_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    needs: tuple[bool, bool, bool],
    n: int | None = None,
    reduce: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Closed-form gradient of the training-mode normalization.

    With ``xhat = (x - mean) * invstd`` and ``g = grad_out * weight`` over the ``n`` values
    of a channel: ``dx = invstd / n * (n g - sum(g) - xhat sum(g xhat))``,
    ``dweight = sum(grad_out xhat)``, ``dbias = sum(grad_out)``. Written with ordinary
    differentiable ops, so that calling it with ``mean``/``invstd`` that depend on ``x``
    gives the exact second derivative.

    For a batch split across processes (SyncBatchNorm), ``reduce`` maps the local
    ``(sum(grad_out), sum(grad_out * xhat))`` to their sums over all processes and ``n`` is
    the global count; the weight/bias gradients stay local (DDP reduces those).
    """
    shape = channel_shape(x)
    cdt = compute_dtype(x)
    n = x.numel() // x.shape[1] if n is None else n
    fast = _router.backward_sums(x, grad_out)
    lo = mean - mean.to(cdt).to(mean.dtype)  # what the compute-dtype shift missed
    if fast is not None:
        # the sums from the fast path (both passes there when nothing is reduced)
        gx, raw_go_xhat, sum_go, _ = fast.backward_train(
            grad_out,
            x,
            weight,
            mean,
            invstd=invstd,
            need_grad_input=needs[0] and reduce is None,
            raw_sums=True,
        )
        assert raw_go_xhat is not None  # raw sums are always both there
        sum_go_xhat = raw_go_xhat
    else:
        go = grad_out.to(cdt)
        d = x.to(cdt) - mean.to(cdt).view(shape)
        sum_go = channel_sum(go)
        sum_go_xhat = (channel_sum(go, d) - lo * sum_go) * invstd
    all_go, all_go_xhat = (sum_go, sum_go_xhat) if reduce is None else reduce(sum_go, sum_go_xhat)
    gx_done = fast is not None and reduce is None
    gw = gb = None
    if not needs[0]:
        gx = None
    elif not gx_done:
        a = invstd if weight is None else weight.to(invstd.dtype) * invstd
        k_d = -a * invstd * all_go_xhat / n  # coefficient of (x - shift)
        k_0 = -a * all_go / n - k_d * lo  # constant per channel
        if fast is not None:
            gx = fast.grad_apply(grad_out, x, mean, k_centered=k_d, k_grad=a, k_const=k_0)
        else:
            gx = go * a.to(cdt).view(shape) + d * k_d.to(cdt).view(shape) + k_0.to(cdt).view(shape)
            gx = gx.to(x.dtype)
    if needs[1] and weight is not None:
        gw = sum_go_xhat.to(weight.dtype)
    if needs[2]:
        gb = sum_go.to(weight.dtype if weight is not None else cdt)
    return gx, gw, gb


class TrainNorm(torch.autograd.Function):
    """Training-mode normalization with batch statistics and a hand-derived backward (and
    forward-mode derivative), in eager mode (dynamo refuses a Function with a custom
    ``jvp``: under ``torch.compile`` :func:`bnkit.nn._stats.compiled_train` runs instead).

    Outputs ``(y, mean, var)``; ``mean`` (acc dtype) and ``var`` (biased, acc dtype) are
    not differentiable. Saves ``x``, ``weight``, ``mean`` and ``var`` for backward,
    as torch's native kernel does.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        return train_forward(x, weight, bias, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, weight, _bias, eps = inputs
        _y, mean, var = output
        ctx.eps = eps
        ctx.has_bias = _bias is not None
        ctx.mark_non_differentiable(mean, var)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.save_for_forward(x, weight, mean, var)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, _gm: Tensor, _gv: Tensor) -> Any:  # type: ignore[override]
        """:func:`train_graph_backward` (the statistics recomputed differentiably from x
        under a double backward)."""
        x, weight, mean, var = ctx.saved_tensors
        needs = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            ctx.needs_input_grad[2] and ctx.has_bias,
        )
        gx, gw, gb, _ = train_graph_backward(
            grad_out, x, weight, None, mean, var, None, ctx.eps, 0, needs, False
        )
        return gx, gw, gb, None

    @staticmethod
    def jvp(  # type: ignore[override]
        ctx: Any, tx: Tensor | None, tw: Tensor | None, tb: Tensor | None, _teps: Any
    ) -> tuple[Tensor, None, None]:
        """Forward-mode derivative (``torch.autograd.forward_ad``, ``torch.func.jvp``):
        with ``xhat = (x - mean) * invstd`` over the n values of a channel,
        ``d xhat = invstd * (dx - mean(dx) - xhat * mean(xhat * dx))`` and
        ``dy = d xhat * weight + xhat * dweight + dbias``. The statistics are
        non-differentiable outputs (no tangent), as their backward has no gradient."""
        x, weight, mean, var = ctx.saved_tensors
        return _train_jvp(x, weight, mean, var, ctx.eps, tx, tw, tb), None, None


def _train_jvp(
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
    tx: Tensor | None,
    tw: Tensor | None,
    tb: Tensor | None,
) -> Tensor:
    """The tangent of the training-mode output (see :meth:`TrainNorm.jvp`); the
    per-channel means in the accumulation dtype, the rest in the compute dtype."""
    cdt = compute_dtype(x)
    shape = channel_shape(x)
    n = x.numel() // x.shape[1]
    invstd = inv_std(var, eps).to(cdt).view(shape)
    xhat = (x.to(cdt) - mean.to(cdt).view(shape)) * invstd
    ty = torch.zeros_like(xhat)
    if tx is not None:
        t = tx.to(cdt)
        mean_t = (channel_sum(t) / n).to(cdt).view(shape)
        mean_xhat_t = (channel_sum(xhat, t) / n).to(cdt).view(shape)
        ty = (t - mean_t - xhat * mean_xhat_t) * invstd
        if weight is not None:
            ty = ty * weight.to(cdt).view(shape)
    if tw is not None:
        ty = ty + xhat * tw.to(cdt).view(shape)
    if tb is not None:
        ty = ty + tb.to(cdt).view(shape)
    return ty.to(x.dtype)


def train_graph_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    residual: Tensor | None,
    eps: float,
    act: int,
    needs: tuple[bool, bool, bool],
    need_residual: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """The training backward with torch's ops: (grad_x, grad_weight, grad_bias,
    grad_residual), each None where not needed. Under grad mode (a double backward) the
    statistics are recomputed differentiably from x, so that autograd differentiates the
    closed form exactly. A fused activation ``act`` (whose pre-activation is recomputed
    from x, ``bias`` and ``residual``) gates ``grad_out`` first; the residual's gradient
    is the gated gradient. The fast path's autograd node calls this under a double
    backward and for a gradient without storage (handed to it by ``_kernels.get``)."""
    if torch.is_grad_enabled():
        mean_c, var_c = differentiable_stats(x)
        mean, var = mean_c.to(var.dtype), var_c.to(var.dtype)
    invstd = inv_std(var, eps)
    if act:
        shape = channel_shape(x)
        scale, shift = affine(weight, bias, invstd)
        pre = (x - mean.view(shape)) * scale.view(shape) + shift.view(shape)
        if residual is not None:
            pre = pre + residual
        grad_out = _activations.gate(grad_out, pre, act)
    gx, gw, gb = train_backward(grad_out, x, weight, mean, invstd, needs)
    return gx, gw, gb, (grad_out if need_residual else None)


def eval_graph_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The eval-mode backward with torch's ops, for a double backward (or a gradient
    without storage) through the fast path's autograd node (which otherwise computes the
    backward in one kernel call):
    ``dx = grad * weight * invstd``, ``dweight = sum(grad * (x - mean)) * invstd``,
    ``dbias = sum(grad)``, each None where ``needs`` says it is not wanted."""
    shape = channel_shape(x)
    invstd = inv_std(running_var.to(torch.float64), eps)
    a = invstd if weight is None else weight.to(invstd.dtype) * invstd
    gx = gw = gb = None
    if needs[0]:
        gx = grad_out * a.to(x.dtype).view(shape)
    if needs[1] and weight is not None:
        d = x - running_mean.to(x.dtype).view(shape)
        gw = (channel_sum(grad_out, d) * invstd).to(weight.dtype)
    if needs[2]:
        gb = channel_sum(grad_out).to(weight.dtype if weight is not None else x.dtype)
    return gx, gw, gb
