"""Statistics and normalization: the forward math, with torch's ops.

Statistics are reduced over every dimension except dim 1 (channels), ``n = numel / C``,
with a shifted two-pass scheme: a first mean ``m0``, the centred values ``d = x - m0``
(exact where ``x`` is near ``m0``), then ``mean = m0 + sum(d) / n`` and
``var = sum(d^2) / n - (sum(d) / n)^2`` (biased; the correction term is tiny). Sums run
over contiguous runs in the input dtype (torch's cascade summation) and the partial sums
are added in float64, so a channel with mean 1e4 and std 1 in float32 keeps about seven
significant digits of its variance. The training output is ``d * scale + shift`` with
``scale = weight / sqrt(var + eps)``, so the large mean never enters its rounding; eval is
``(x - running_mean) * scale + bias``. Half and bfloat16 input is computed in float32.

The C++ kernels (``_kernels.cpp``) compute the same formulas; :mod:`bnkit.nn._router`
decides which runs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from bnkit.nn._validate import LOW_PRECISION as _LOW_PRECISION

__all__ = [
    "batch_stats_torch",
    "channel_shape",
    "channel_sum",
    "compiled_train",
    "differentiable_stats",
    "eval_affine",
    "eval_forward",
    "inv_std",
    "train_forward",
]

# Blocks of rows summed in the input dtype before the partial sums go to float64.
_ROW_BLOCK = 32


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the math runs in: float32 for half/bfloat16 input, else the input's."""
    return torch.float32 if x.dtype in _LOW_PRECISION else x.dtype


def acc_dtype(x: Tensor) -> torch.dtype:
    """The dtype of partial sums and statistics: float64 (float32 on MPS)."""
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


def channel_sum(t: Tensor, other: Tensor | None = None) -> Tensor:
    """Per-channel sum of ``t`` (or of ``t * other``), partial sums added in float64.

    Runs of values that are contiguous in memory are summed in the input dtype (torch's
    cascade summation keeps their error at O(eps log n)); the partial sums are added in
    float64. Both tensors are read in ``t``'s memory order.
    """
    acc = acc_dtype(t)
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
    shift = (channel_sum(xc) / n).to(xc.dtype)
    # A channel holding inf or NaN: shift by 0, so that the sums below are the plain sums
    # and the statistics come out as torch's (mean inf/-inf/NaN, variance NaN).
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    d = xc - shift.view(shape)
    s1 = channel_sum(d) / n
    s2 = channel_sum(d, d) / n
    var = (s2 - s1 * s1).clamp_min(0.0)
    return _Stats(shift, s1, var, n), d


def batch_stats_torch(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, biased variance) of ``x`` with torch's ops, without gradients,
    in the accumulation dtype."""
    with torch.no_grad():
        st, _ = _batch_stats(x.to(compute_dtype(x)))
    return st.shift.to(st.mean_lo.dtype) + st.mean_lo, st.var


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
    scale, shift = affine(w, b, inv_std(running_var.detach().double(), eps))
    return scale, shift - running_mean.detach().double() * scale


def differentiable_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` as ordinary differentiable ops, in
    the compute dtype (float32 for half input): for double backward and pooled statistics,
    where autograd must see the statistics depend on ``x``."""
    xc = x.to(compute_dtype(x))
    dims = [0, *range(2, x.dim())]
    mean = xc.mean(dims)
    var = (xc - mean.view(channel_shape(x))).pow(2).mean(dims)
    return mean, var


def affine(weight: Tensor | None, bias: Tensor | None, invstd: Tensor) -> tuple[Tensor, Tensor]:
    """``(weight * invstd, bias)`` with 1 and 0 where absent, in ``invstd``'s dtype."""
    scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
    shift = torch.zeros_like(invstd) if bias is None else bias.to(invstd.dtype)
    return scale, shift


def train_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, biased var)`` with batch statistics: ``y = d * scale + shift`` from the
    centred ``d`` (see the module docstring); the statistics in the accumulation dtype."""
    cdt = compute_dtype(x)
    acc = acc_dtype(x)
    st, d = _batch_stats(x.to(cdt))
    invstd = inv_std(st.var, eps)
    scale, shift = affine(weight, bias, invstd)
    shift = shift - st.mean_lo * scale
    shape = channel_shape(x)
    y = torch.addcmul(shift.to(cdt).view(shape), d, scale.to(cdt).view(shape))
    mean = st.shift.to(acc) + st.mean_lo
    return y.to(x.dtype), mean, st.var


def compiled_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The training normalization as ``torch.compile`` sees it: differentiable torch ops
    in the compute dtype, from which AOTAutograd derives the backward and inductor fuses
    both passes as it does torch's own decomposition (``var_mean``: a Welford reduction);
    float64 sums or per-element float64 scale factors in the generated loops would make
    the compiled step slower than torch's compiled step. The statistics are returned
    detached, in the accumulation dtype."""
    cdt = compute_dtype(x)
    shape = channel_shape(x)
    xc = x.to(cdt)
    var, mean = torch.var_mean(xc, [0, *range(2, x.dim())], correction=0)
    invstd = torch.rsqrt(var + eps)
    y = (xc - mean.view(shape)) * invstd.view(shape)
    if weight is not None:
        y = y * weight.to(cdt).view(shape)
    if bias is not None:
        y = y + bias.to(cdt).view(shape)
    acc = acc_dtype(x)
    return y.to(x.dtype), mean.detach().to(acc), var.detach().to(acc)


def eval_forward(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """``(x - running_mean) * scale + bias`` with ``scale = weight / sqrt(running_var +
    eps)``: per-channel factors in float64 (in the compute dtype under ``torch.compile``,
    whose generated loops would recompute float64 factors per element), the rest in the
    compute dtype. Differentiable in everything."""
    cdt = compute_dtype(x)
    shape = channel_shape(x)
    acc = acc_dtype(x) if cdt != torch.float64 else torch.float64
    if torch.compiler.is_compiling():
        acc = cdt
    invstd = inv_std(running_var.to(acc), eps)
    scale, shift = affine(weight, bias, invstd)
    d = x.to(cdt) - running_mean.to(cdt).view(shape)
    y = torch.addcmul(shift.to(cdt).view(shape), d, scale.to(cdt).view(shape))
    return y.to(x.dtype)
