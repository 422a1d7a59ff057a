"""The math of Batch Normalization, in one place.

Everything in bnkit that computes a batch mean or variance, normalizes, differentiates a
normalization or updates running statistics goes through this module: the layers, the
frozen and synchronised variants and the tools all call it, none re-derives the formulas.

Conventions (torch 2.13, see ``docs/semantics.md``):

* statistics are reduced over every dimension except dim 1 (channels), ``n = numel / C``;
* training normalizes with the *biased* variance and feeds the *unbiased* one
  (``var * n / (n - 1)``) into the running estimate;
* ``running = (1 - f) * running + f * batch`` with ``f = momentum``, or, when
  ``momentum is None``, ``f = 1 / num_batches_tracked`` (a cumulative average).

Numerics. Batch statistics use a shifted two-pass scheme: a first mean ``m0``, then the
centred values ``d = x - m0`` (exact in floating point when ``x`` is near ``m0``), then
``mean = m0 + sum(d) / n`` and ``var = sum(d^2) / n - (sum(d) / n)^2``, the correction
term being tiny. Sums are taken over contiguous runs in the input dtype (torch's cascade
summation) and the per-run partial sums are added in float64, so a channel with mean 1e4
and std 1 in float32 keeps about seven significant digits of its variance. The output is
computed from ``d`` as ``d * scale + shift`` so that the large mean never enters the
rounding of the output.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from bnkit.nn import _kernels

__all__ = [
    "BatchNormState",
    "batch_norm",
    "batch_norm_stateless",
    "batch_stats",
    "merge_stats",
    "train_backward",
    "apply_batch_norm",
    "channel_shape",
    "differentiable_stats",
    "eval_affine",
    "inv_std",
    "running_factor",
    "check_eps",
    "check_momentum",
    "validate",
    "check_batch_size",
    "normalize_eval",
    "normalize_train",
    "update_running_stats",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Blocks of rows summed in the input dtype before the partial sums go to float64.
_ROW_BLOCK = 32


# --------------------------------------------------------------------------- checks


def check_eps(eps: float, training: bool, where: str = "batch_norm") -> None:
    """Raise ``ValueError`` unless eps > 0 (training) or eps >= 0 (eval), as torch does."""
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or math.isnan(eps):
        raise ValueError(f"{where}: eps must be a number, got {eps!r}")
    if training and eps <= 0.0:
        raise ValueError(f"{where}: eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"{where}: eps must be non-negative, but got {eps}")


def check_momentum(momentum: float | None, where: str = "batch_norm") -> None:
    """Raise ``ValueError`` unless momentum is None or a number in [0, 1]."""
    if momentum is None:
        return
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise ValueError(f"{where}: momentum must be a float in [0, 1] or None, got {momentum!r}")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(
            f"{where}: momentum must be in [0, 1] (torch convention: weight of the new "
            f"batch), got {momentum}; a Keras momentum m corresponds to 1 - m here"
        )


def check_batch_size(size: torch.Size, where: str = "") -> None:
    """torch's ``_verify_batch_size``: training needs more than one value per channel."""
    if where == "batch_norm":
        where = ""
    if _one_value_per_channel(size):
        prefix = f"{where}: " if where else ""
        raise ValueError(
            f"{prefix}Expected more than 1 value per channel when training, got input size {size}"
        )


class UnsupportedDtypeError(TypeError, NotImplementedError):
    """A non-floating input. torch raises NotImplementedError ("batch_norm" not implemented
    for 'Long'); this is both that and a TypeError, so either ``except`` catches it."""


def _check_input(x: Tensor, where: str, ranks: tuple[int, ...] = ()) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor input, got {type(x).__name__}")
    if ranks and x.dim() not in ranks:
        want = " or ".join(f"{r}D" for r in ranks)
        raise ValueError(
            f"{where}: expected {want} input (got {x.dim()}D input of shape {tuple(x.shape)})"
        )
    if x.dim() < 2:
        raise ValueError(
            f"{where}: expected an input of shape (N, C, *) with at least 2 dims, "
            f"got {x.dim()}D input of shape {tuple(x.shape)}"
        )


def _check_floating(x: Tensor, where: str) -> None:
    if not x.is_floating_point():
        raise UnsupportedDtypeError(
            f"{where}: expected a floating-point input (float16/bfloat16/float32/float64), "
            f"got {x.dtype}"
        )


def _check_per_channel(t: Tensor | None, name: str, x: Tensor, where: str) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    c = x.shape[1]
    if t.dim() != 1 or t.shape[0] != c:
        # torch's wording ("bias should contain 64 elements not 2"), with the input's shape
        raise RuntimeError(
            f"{where}: {name} should contain {c} elements not {t.numel()} (one per channel "
            f"of the input {tuple(x.shape)}; got shape {tuple(t.shape)})"
        )
    if t.device != x.device:
        raise RuntimeError(
            f"{where}: {name} is on {t.device} but the input is on {x.device}; expected all "
            f"tensors on the same device (move the module with .to({str(x.device)!r}))"
        )
    ok = t.dtype == x.dtype or (x.dtype in _LOW_PRECISION and t.dtype == torch.float32)
    if not ok and x.numel() > 0:  # torch returns an empty batch whatever the dtypes
        raise RuntimeError(
            f"{where}: {name} has dtype {t.dtype} but the input is {x.dtype}; expected "
            f"{x.dtype} (or float32 for half/bfloat16 input): convert the module with "
            f".to({x.dtype}) or the input with .to({t.dtype})"
        )


def validate(
    input: Tensor,
    *,
    where: str,
    batch_stats: bool,
    eps: float,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    ranks: tuple[int, ...] = (),
    num_features: int | None = None,
    momentum: float | None = None,
) -> None:
    """The one validation of a BatchNorm call, run before anything changes.

    Every layer kind (the modules, the functional forms, frozen, the variants, sync) calls
    it with every tensor the computation will touch: the input (a floating tensor of one of
    ``ranks``, with ``num_features`` channels), and the per-channel ``running_mean``,
    ``running_var``, ``weight`` and ``bias`` (one value per channel, on the input's device,
    of the input's dtype or float32 for half/bfloat16 input). ``batch_stats``: the call
    normalizes with batch statistics, so it needs more than one value per channel and
    ``eps > 0``. Raises ``TypeError``/``ValueError``/``RuntimeError`` naming ``where``.
    """
    # The common case (everything right) in a few cheap comparisons; anything off goes to
    # the detailed checks below, which name what is wrong. (A layer call's overhead is
    # mostly this and the C++ call: it is what small layers pay per call.)
    if (
        type(input) is Tensor
        and input.dtype in _FLOATS
        and (input.dim() in ranks if ranks else input.dim() >= 2)
        and (num_features is None or input.shape[1] == num_features)
        and type(eps) is float
        and (eps > 0.0 if batch_stats else eps >= 0.0)
        and (momentum is None or (type(momentum) is float and 0.0 <= momentum <= 1.0))
    ):
        c, dev, dt = input.shape[1], input.device, input.dtype
        low = dt in _LOW_PRECISION
        ok = True
        for t in (running_mean, running_var, weight, bias):
            if t is not None and not (
                isinstance(t, Tensor)
                and t.dim() == 1
                and t.shape[0] == c
                and t.device == dev
                and (t.dtype == dt or (low and t.dtype == torch.float32))
            ):
                ok = False
                break
        if ok and not (batch_stats and _one_value_per_channel(input.shape)):
            return
    # torch's order: the module's rank check, the functional's batch-size and eps checks
    # (Python), then the op's dtype, size and device checks (C++)
    _check_input(input, where, ranks)
    if batch_stats:
        check_batch_size(input.size(), where)
    check_eps(eps, batch_stats, where)
    _check_floating(input, where)
    if num_features is not None and input.shape[1] != num_features:
        raise ValueError(
            f"{where}: expected {num_features} channels in dim 1, got {input.shape[1]} "
            f"(input shape {tuple(input.shape)})"
        )
    for name, t in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        _check_per_channel(t, name, input, where)
    check_momentum(momentum, where)


def _one_value_per_channel(size: torch.Size) -> bool:
    n = size[0]
    for s in size[2:]:
        n *= s
    return n == 1


# ---------------------------------------------------------------------- reductions


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in _LOW_PRECISION else x.dtype


def _acc_dtype(x: Tensor) -> torch.dtype:
    # MPS has no float64; everything else accumulates partial sums in float64.
    return torch.float32 if x.device.type == "mps" else torch.float64


def channel_shape(x: Tensor) -> list[int]:
    """The shape that broadcasts a per-channel (C,) tensor against ``x`` (N, C, *)."""
    return [1, -1] + [1] * (x.dim() - 2)


def _channels_fastest(t: Tensor) -> bool:
    """Whether the channel dim moves fastest in memory (channels_last, or 2D input)."""
    if t.dim() == 2:
        return True
    if t.is_contiguous():
        return False
    return t.permute(0, *range(2, t.dim()), 1).is_contiguous()


def _rows(t: Tensor, channels_fastest: bool) -> Tensor:
    """A view of ``t`` as (R, C) (channels fastest) or (N, C, L); copies only if needed."""
    c = t.shape[1]
    inner = math.prod(t.shape[2:])  # explicit sizes: -1 is ambiguous for empty tensors
    if channels_fastest:
        return t.permute(0, *range(2, t.dim()), 1).reshape(t.shape[0] * inner, c)
    return t.reshape(t.shape[0], c, inner)


def _channel_sum(t: Tensor, other: Tensor | None = None) -> Tensor:
    """Per-channel sum of ``t`` (or of ``t * other``), partial sums added in float64.

    Runs of values that are contiguous in memory are summed in the input dtype (torch's
    cascade summation keeps their error at O(eps log n)); the partial sums are added in
    float64. Both tensors are read in ``t``'s memory order.
    """
    acc = _acc_dtype(t)
    last = _channels_fastest(t)
    v = _rows(t, last)
    prod = v if other is None else v * _rows(other.expand_as(t), last)
    if not last:
        # (N, C, L): the inner run is contiguous, summed with torch's cascade summation.
        return prod.sum(-1).sum(0, dtype=acc)
    rows, c = prod.shape
    q = rows // _ROW_BLOCK
    total = prod[: q * _ROW_BLOCK].reshape(q, _ROW_BLOCK, c).sum(1).sum(0, dtype=acc)
    if rows > q * _ROW_BLOCK:
        total = total + prod[q * _ROW_BLOCK :].sum(0, dtype=acc)
    return total


class _Stats(NamedTuple):
    """Batch statistics in the accumulation dtype, plus the shift used to compute them."""

    shift: Tensor  # (C,) in the compute dtype: x - shift is formed exactly
    mean_lo: Tensor  # (C,) acc dtype: mean = shift + mean_lo
    var: Tensor  # (C,) acc dtype, biased
    n: int


def _batch_stats(xc: Tensor) -> tuple[_Stats, Tensor]:
    """Statistics of ``xc`` (compute dtype) and the centred tensor ``xc - shift``."""
    c = xc.shape[1]
    n = xc.numel() // c
    shape = channel_shape(xc)
    shift = (_channel_sum(xc) / n).to(xc.dtype)
    # A channel holding inf or NaN: shift by 0, so that the sums below are the plain sums
    # and the statistics come out as torch's (mean inf/-inf/NaN, variance NaN).
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    d = xc - shift.view(shape)
    s1 = _channel_sum(d) / n
    s2 = _channel_sum(d, d) / n
    var = (s2 - s1 * s1).clamp_min(0.0)
    return _Stats(shift, s1, var, n), d


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` (N, C, *), without gradients.

    Computed with the same stable scheme the layers use and returned in the accumulation
    dtype (float64; float32 on MPS), ready to be merged across batches with
    :func:`merge_stats`.
    """
    _check_input(x, "batch_stats")
    _check_floating(x, "batch_stats")
    if x.numel() == 0:
        raise ValueError(f"batch_stats: the input {tuple(x.shape)} holds no values")
    fast = _kernels.route(x)
    if fast is not None:
        return fast.stats(x.detach())
    with torch.no_grad():
        st, _ = _batch_stats(x.to(_compute_dtype(x)))
    return st.shift.to(st.mean_lo.dtype) + st.mean_lo, st.var


def merge_stats(
    count_a: int | Tensor,
    mean_a: Tensor,
    var_a: Tensor,
    count_b: int | Tensor,
    mean_b: Tensor,
    var_b: Tensor,
) -> tuple[int | Tensor, Tensor, Tensor]:
    """Chan et al.'s pairwise merge of (count, mean, biased variance) summaries.

    The result is exactly the count, mean and biased variance of the union of the two
    sets of values, whatever their sizes (an empty side is a no-op), without forming
    ``E[x^2] - E[x]^2`` from raw sums.
    """
    count = count_a + count_b
    if isinstance(count, int) and count == 0:
        return count, mean_a, var_a
    wa = count_a / count if not isinstance(count, Tensor) else count_a / count.clamp_min(1)
    wb = count_b / count if not isinstance(count, Tensor) else count_b / count.clamp_min(1)
    delta = mean_b - mean_a
    mean = mean_a + delta * wb
    var = var_a * wa + var_b * wb + delta * delta * wa * wb
    return count, mean, var


# ----------------------------------------------------------------- training forward


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
    cdt = _compute_dtype(x)
    n = x.numel() // x.shape[1] if n is None else n
    dense = not torch.is_grad_enabled() and _kernels.has_storage(grad_out)
    fast = _kernels.route(x) if dense else None
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
        sum_go = _channel_sum(go)
        sum_go_xhat = (_channel_sum(go, d) - lo * sum_go) * invstd
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


def inv_std(var: Tensor, eps: float) -> Tensor:
    """``1 / sqrt(var + eps)``."""
    return torch.rsqrt(var + eps)


def eval_affine(
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm as a per-channel affine map ``y = scale * x + shift``, in
    float64: ``scale = weight / sqrt(running_var + eps)``, ``shift = bias - running_mean *
    scale`` (weight 1 and bias 0 where absent). What folding writes into a convolution."""
    w = None if weight is None else weight.detach().double()
    b = None if bias is None else bias.detach().double()
    scale, shift = _affine(w, b, inv_std(running_var.detach().double(), eps))
    return scale, shift - running_mean.detach().double() * scale


def differentiable_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` as ordinary differentiable ops, in
    the compute dtype (float32 for half input): for double backward and pooled statistics,
    where autograd must see the statistics depend on ``x``."""
    xc = x.to(_compute_dtype(x))
    dims = [0, *range(2, x.dim())]
    mean = xc.mean(dims)
    var = (xc - mean.view(channel_shape(x))).pow(2).mean(dims)
    return mean, var


def running_factor(momentum: float | None, count: int | Tensor) -> float | Tensor:
    """The weight of the new batch in the running statistics: ``momentum``, or, for
    ``momentum=None`` (the cumulative average), ``1 / count`` where ``count`` is
    ``num_batches_tracked`` after this batch was counted."""
    if momentum is not None:
        return float(momentum)
    if isinstance(count, Tensor):  # float64 except where there is none (MPS)
        return 1.0 / count.to(torch.float32 if count.device.type == "mps" else torch.float64)
    return 1.0 / float(count)


class _TrainNorm(torch.autograd.Function):
    """Training-mode normalization with batch statistics and a hand-derived backward (and
    forward-mode derivative), in eager mode (dynamo refuses a Function with a custom
    ``jvp``: under ``torch.compile`` :func:`_compiled_train` runs instead).

    Outputs ``(y, mean, var)``; ``mean`` (acc dtype) and ``var`` (biased, acc dtype) are
    not differentiable. Saves ``x``, ``weight``, ``mean`` and ``var`` for backward,
    as torch's native kernel does.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        return _train_forward(x, weight, bias, eps)

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
    """The tangent of the training-mode output (see :meth:`_TrainNorm.jvp`); the
    per-channel means in the accumulation dtype, the rest in the compute dtype."""
    cdt = _compute_dtype(x)
    shape = channel_shape(x)
    n = x.numel() // x.shape[1]
    invstd = inv_std(var, eps).to(cdt).view(shape)
    xhat = (x.to(cdt) - mean.to(cdt).view(shape)) * invstd
    ty = torch.zeros_like(xhat)
    if tx is not None:
        t = tx.to(cdt)
        mean_t = (_channel_sum(t) / n).to(cdt).view(shape)
        mean_xhat_t = (_channel_sum(xhat, t) / n).to(cdt).view(shape)
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
    backward and for a gradient without storage (``_kernels.register_graph_backward``)."""
    if torch.is_grad_enabled():
        mean_c, var_c = differentiable_stats(x)
        mean, var = mean_c.to(var.dtype), var_c.to(var.dtype)
    invstd = inv_std(var, eps)
    if act:
        shape = channel_shape(x)
        scale, shift = _affine(weight, bias, invstd)
        pre = (x - mean.view(shape)) * scale.view(shape) + shift.view(shape)
        if residual is not None:
            pre = pre + residual
        grad_out = gate_activation(grad_out, pre, act)
    gx, gw, gb = train_backward(grad_out, x, weight, mean, invstd, needs)
    return gx, gw, gb, (grad_out if need_residual else None)


def gate_activation(grad_out: Tensor, pre: Tensor, act: int) -> Tensor:
    """``grad_out`` times the activation's derivative at the pre-activation ``pre``, with
    torch ops (the double-backward path of the fused Function; ``pre`` is recomputed
    differentiably from x, so an activation whose derivative is not piecewise constant
    would be differentiated correctly too)."""
    dead = pre <= 0 if act == _kernels.ACTIVATIONS["relu"] else (pre <= 0) | (pre >= 6)
    return torch.where(dead, torch.zeros_like(grad_out), grad_out)


def _affine(weight: Tensor | None, bias: Tensor | None, invstd: Tensor) -> tuple[Tensor, Tensor]:
    scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
    shift = torch.zeros_like(invstd) if bias is None else bias.to(invstd.dtype)
    return scale, shift


def _train_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    cdt = _compute_dtype(x)
    acc = _acc_dtype(x)
    st, d = _batch_stats(x.to(cdt))
    invstd = inv_std(st.var, eps)
    scale, shift = _affine(weight, bias, invstd)
    shift = shift - st.mean_lo * scale
    shape = channel_shape(x)
    y = torch.addcmul(shift.to(cdt).view(shape), d, scale.to(cdt).view(shape))
    mean = st.shift.to(acc) + st.mean_lo
    return y.to(x.dtype), mean, st.var


def normalize_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalize with batch statistics; returns ``(y, mean, biased_var)``.

    ``y`` is differentiable (closed-form backward, itself differentiable); ``mean`` and
    ``biased_var`` are detached per-channel statistics in float64 (float32 on MPS). A
    Tensor subclass sees the call (see :func:`apply_batch_norm`).
    """
    if type(x) is not Tensor and has_torch_function_variadic(x):
        return handle_torch_function(  # type: ignore[no-any-return]
            normalize_train, (x,), x, weight, bias, eps
        )
    if x.numel() == 0:
        # Keep the empty output connected to the graph, as torch does.
        y = x.to(_compute_dtype(x))
        if weight is not None:
            y = y * weight.to(y.dtype).view(channel_shape(x))
        if bias is not None:
            y = y + bias.to(y.dtype).view(channel_shape(x))
        empty = torch.zeros(x.shape[1], dtype=_acc_dtype(x), device=x.device)
        return y.to(x.dtype), empty, empty.clone()
    fast = _kernels.route(x)
    if fast is not None:
        if not _builds_graph(x, weight, bias, None):  # the kernel alone, as apply_batch_norm
            y, mean, var, _ = fast.forward_train(x, weight, bias, eps=eps)
        else:
            y, mean, var = fast.train_node(x, weight, bias, eps=eps)
    elif torch.compiler.is_compiling():
        y, mean, var = _compiled_train(x, weight, bias, eps)
    else:
        y, mean, var = _TrainNorm.apply(x, weight, bias, eps)
    return y, mean, var


def _compiled_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The training normalization as ``torch.compile`` sees it: differentiable torch ops
    in the compute dtype, from which AOTAutograd derives the backward and inductor fuses
    both passes as it does torch's own decomposition (``var_mean``: a Welford reduction);
    float64 sums or per-element float64 scale factors in the generated loops would make
    the compiled step slower than torch's compiled step. The statistics are returned
    detached, in the accumulation dtype."""
    cdt = _compute_dtype(x)
    shape = channel_shape(x)
    xc = x.to(cdt)
    var, mean = torch.var_mean(xc, [0, *range(2, x.dim())], correction=0)
    invstd = torch.rsqrt(var + eps)
    y = (xc - mean.view(shape)) * invstd.view(shape)
    if weight is not None:
        y = y * weight.to(cdt).view(shape)
    if bias is not None:
        y = y + bias.to(cdt).view(shape)
    acc = _acc_dtype(x)
    return y.to(x.dtype), mean.detach().to(acc), var.detach().to(acc)


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
        gw = (_channel_sum(grad_out, d) * invstd).to(weight.dtype)
    if needs[2]:
        gb = _channel_sum(grad_out).to(weight.dtype if weight is not None else x.dtype)
    return gx, gw, gb


_kernels.register_graph_backward(train_graph_backward, eval_graph_backward)


def normalize_eval(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    residual: Tensor | None = None,
    act: int = 0,
) -> Tensor:
    """Normalize with given statistics: ``(x - mean) / sqrt(var + eps) * weight + bias``
    (then ``act(... + residual)``, see :func:`apply_batch_norm`).

    Differentiable in ``x``, ``weight`` and ``bias`` (and in the statistics, should they
    require grad); the backward is ``grad * weight / sqrt(var + eps)``. A Tensor subclass
    sees the call (see :func:`apply_batch_norm`).
    """
    if type(x) is not Tensor and has_torch_function_variadic(x, residual):
        args = (x, running_mean, running_var, weight, bias, eps, residual, act)
        return handle_torch_function(normalize_eval, (x, residual), *args)  # type: ignore[no-any-return]
    stats_grad = running_mean.requires_grad or running_var.requires_grad
    fast = None if stats_grad else _kernels.route(x)
    if fast is not None:
        if not _builds_graph(x, weight, bias, residual):  # one pass, act and residual too
            return fast.forward_eval(
                x, running_mean, running_var, weight, bias, eps=eps, residual=residual, act=act
            )
        y = fast.eval_node(x, weight, bias, running_mean, running_var, eps=eps)
        return finish_activation(y, residual, act)
    cdt = _compute_dtype(x)
    shape = channel_shape(x)
    acc = _acc_dtype(x) if cdt != torch.float64 else torch.float64
    if torch.compiler.is_compiling():
        # inductor recomputes per-channel factors inside the per-element loop: float64
        # there costs ~10% of a compiled eval forward (torch's compiled kernel: float32)
        acc = cdt
    invstd = inv_std(running_var.to(acc), eps)
    scale, shift = _affine(weight, bias, invstd)
    d = x.to(cdt) - running_mean.to(cdt).view(shape)
    y = torch.addcmul(shift.to(cdt).view(shape), d, scale.to(cdt).view(shape))
    return finish_activation(y.to(x.dtype), residual, act)


# --------------------------------------------------------------- running statistics


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    n: int,
    factor: float | Tensor,
) -> tuple[Tensor, Tensor]:
    """New running statistics: ``(1 - f) * old + f * batch``, with unbiased batch variance.

    ``var`` is the biased batch variance over ``n`` values per channel; the running
    variance receives ``var * n / (n - 1)``. Computed in float64 (as torch's CPU kernel
    does) and returned in the dtype of the running buffers. Pure: nothing is mutated.
    """
    acc = mean.dtype
    unbiased = var * (n / (n - 1)) if n > 1 else var
    f = factor.to(acc) if isinstance(factor, Tensor) else factor
    new_mean = running_mean.to(acc) * (1 - f) + mean * f
    new_var = running_var.to(acc) * (1 - f) + unbiased * f
    return new_mean.to(running_mean.dtype), new_var.to(running_var.dtype)


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
    act: int = 0,
) -> Tensor:
    """:func:`batch_norm` after :func:`validate` has accepted every argument (the layers
    validate once, then call this). In training mode the given running buffers are updated
    in place with weight ``factor`` for the new batch.

    With ``residual`` (a tensor of the input's shape, dtype and device: the caller checks)
    and/or an activation code ``act`` (``_kernels.ACTIVATIONS``: 1 relu, 2 relu6) the
    result is ``act(bn(input) + residual)``, in one pass over memory on the fast path and
    with torch's ops everywhere else.

    A Tensor subclass with its own ``__torch_function__`` (MONAI's MetaTensor, ...) sees
    this call as it sees torch's ``batch_norm``: it is handed the call (and, by default,
    runs it with its handling off and returns the result as its own type, its metadata
    carried over)."""
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
            _refuse_stat_tangents(input, running_mean, running_var, weight, bias)
        return normalize_eval(input, running_mean, running_var, weight, bias, eps, residual, act)
    fast = _kernels.route_train(input, running_mean, running_var)
    if fast is not None:  # one call: statistics, output and the running-stat update
        running = None
        if running_mean is not None and running_var is not None:
            running = (running_mean, running_var, float(factor))
        if not _builds_graph(input, weight, bias, residual):
            # nothing to differentiate: the kernel alone (a Function's apply would add a
            # few microseconds, most of a small layer's per-call cost)
            return fast.forward_train(
                input, weight, bias, eps=eps, running=running, residual=residual, act=act
            )[0]
        return fast.train_node(
            input, weight, bias, eps=eps, running=running, residual=residual, act=act
        )[0]
    y, mean, var = normalize_train(input, weight, bias, eps)
    if input.numel() > 0 and (running_mean is not None or running_var is not None):
        n = input.numel() // input.shape[1]
        with torch.no_grad():
            rm = running_mean if running_mean is not None else mean
            rv = running_var if running_var is not None else var
            new_mean, new_var = update_running_stats(rm, rv, mean, var, n, factor)
            if running_mean is not None:
                running_mean.copy_(new_mean)
            if running_var is not None:
                running_var.copy_(new_var)
    return finish_activation(y, residual, act)


def _refuse_stat_tangents(
    x: Tensor, running_mean: Tensor, running_var: Tensor, *params: Tensor | None
) -> None:
    """torch's rule under forward-mode AD: an eval call whose input or parameters carry a
    tangent may not be given running statistics that carry one (the output is not
    differentiable in them)."""

    def dual(t: Tensor | None) -> bool:
        return t is not None and fwAD.unpack_dual(t).tangent is not None

    if (dual(running_mean) or dual(running_var)) and (dual(x) or any(map(dual, params))):
        raise RuntimeError(
            "batch_norm is not differentiable wrt running_mean and running_var, they cannot "
            "have forward grad defined"
        )


def _builds_graph(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None
) -> bool:
    """Autograd records this call: grad mode is on and a tensor of it requires grad. (The
    fast path is never taken under forward-mode AD: see ``_kernels.route``.)"""
    return torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
        or (residual is not None and residual.requires_grad)
    )


def finish_activation(y: Tensor, residual: Tensor | None, act: int) -> Tensor:
    """``act(y + residual)`` with torch's ops (the unfused form of every fused path)."""
    if residual is not None:
        y = y + residual
    if act == _kernels.ACTIVATIONS["relu"]:
        return torch.relu(y)
    if act == _kernels.ACTIVATIONS["relu6"]:
        return torch.nn.functional.relu6(y)
    return y


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
    _check_input(input, where)
    if training:
        check_batch_size(input.size(), where)
    check_eps(eps, training, where)
    _check_floating(input, where)
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
