"""float64 references of torch's BatchNorm semantics, straight from the definitions.

One module that the conformance checker, the benchmarks, the report and the test suite
all import: each function recomputes from scratch, in float64, what ``docs/semantics.md``
says, with none of bnkit's numerics (no shift, no fast path), so that comparing bnkit
against it is comparing against the definition. The flags of :func:`reference_train` give
the closed forms of the classic from-scratch mistakes (unbiased variance, eps outside the
square root, wrong reduction axes), which is how ``conform`` recognises them.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "random_input",
    "reference_eval",
    "reference_running",
    "reference_train",
    "reference_train_grads",
]


def _dims(x: Tensor) -> tuple[int, ...]:
    return (0, *range(2, x.dim()))


def _cshape(x: Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


def _affine(y: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
    if w is not None:
        y = y * w.detach().double().view(_cshape(y))
    if b is not None:
        y = y + b.detach().double().view(_cshape(y))
    return y


def reference_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    *,
    unbiased: bool = False,
    eps_outside: bool = False,
    dims: tuple[int, ...] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BatchNorm in float64: ``(y, mean, biased var)`` per channel.

    Differentiable in ``x`` (autograd of the definition is the true gradient). With a flag
    set, the closed form of a typical *wrong* BatchNorm: ``unbiased`` normalizes with the
    unbiased variance, ``eps_outside`` computes ``(x - mean) / (sqrt(var) + eps)``,
    ``dims`` reduces over other dimensions (``(0,)``: per element over the batch).
    """
    xd = x.double()
    red = dims if dims is not None else _dims(x)
    mean = xd.mean(red, keepdim=True)
    var = xd.var(red, correction=1 if unbiased else 0, keepdim=True)
    den = var.sqrt() + eps if eps_outside else (var + eps).sqrt()
    y = _affine((xd - mean) / den, weight, bias)
    if dims is None:
        return y, mean.reshape(-1), xd.var(red, correction=0).reshape(-1)
    return y, mean, var


def reference_eval(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Eval-mode BatchNorm in float64: ``(x - rm) / sqrt(rv + eps) * weight + bias``."""
    xd = x.double()
    shape = _cshape(xd)
    rm = running_mean.detach().double().view(shape)
    rv = running_var.detach().double().view(shape)
    return _affine((xd - rm) / torch.sqrt(rv + eps), weight, bias)


def reference_train_grads(
    x: Tensor, weight: Tensor | None, grad_out: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The closed-form training backward of ``docs/semantics.md`` in float64:
    ``(grad_x, grad_weight, grad_bias)``."""
    xd, go = x.double(), grad_out.double()
    dims, shape = _dims(xd), _cshape(xd)
    n = xd.numel() // xd.shape[1]
    _, mean, var = reference_train(xd, None, None, eps)
    invstd = 1.0 / torch.sqrt(var + eps)
    xhat = (xd - mean.view(shape)) * invstd.view(shape)
    w = torch.ones_like(mean) if weight is None else weight.detach().double()
    g = go * w.view(shape)
    gx = (invstd / n).view(shape) * (
        n * g - g.sum(dims).view(shape) - xhat * (g * xhat).sum(dims).view(shape)
    )
    return gx, (go * xhat).sum(dims), go.sum(dims)


def reference_running(
    batches: list[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    momentum: float | None,
) -> tuple[Tensor, Tensor]:
    """Running statistics after training on ``batches`` in turn, by torch's rule:
    ``(1 - f) * old + f * batch`` with the *unbiased* batch variance, ``f = momentum`` or
    ``1 / count`` for ``momentum=None`` (the cumulative average)."""
    rm, rv = running_mean.detach().double(), running_var.detach().double()
    for count, x in enumerate(batches, start=1):
        xd = x.detach().double()
        f = 1.0 / count if momentum is None else momentum
        rm = (1 - f) * rm + f * xd.mean(_dims(xd))
        rv = (1 - f) * rv + f * xd.var(_dims(xd), correction=1)
    return rm, rv


def random_input(
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    channels_last: bool = False,
) -> Tensor:
    """Non-zero-mean input with per-channel scales and offsets (never all zeros)."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    scale = torch.rand(c, generator=g, dtype=torch.float64) * 3 + 0.5
    offset = torch.randn(c, generator=g, dtype=torch.float64) * 4 + 2
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    view = [1, c] + [1] * (len(shape) - 2)
    x = (x * scale.view(view) + offset.view(view)).to(dtype)
    if channels_last and len(shape) in (4, 5):
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x
