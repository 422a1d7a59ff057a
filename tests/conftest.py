"""Shared test helpers: a float64 closed-form reference of torch's BatchNorm semantics."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("BNKIT_HYPOTHESIS_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.load_profile("ci")
torch.set_num_threads(min(2, torch.get_num_threads()))


def reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def cshape(x: torch.Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


def reference_train(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 closed form: (y, mean, biased var) straight from the definition."""
    xd = x.double()
    dims = reduce_dims(xd)
    mean = xd.mean(dims)
    var = ((xd - mean.view(cshape(xd))) ** 2).mean(dims)
    y = (xd - mean.view(cshape(xd))) / torch.sqrt(var.view(cshape(xd)) + eps)
    if weight is not None:
        y = y * weight.double().view(cshape(xd))
    if bias is not None:
        y = y + bias.double().view(cshape(xd))
    return y, mean, var


def reference_train_grads(
    x: torch.Tensor, weight: torch.Tensor | None, grad_out: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 closed-form backward from SEMANTICS.md: (grad_x, grad_weight, grad_bias)."""
    xd, go = x.double(), grad_out.double()
    dims = reduce_dims(xd)
    n = xd.numel() // xd.shape[1]
    _, mean, var = reference_train(xd, None, None, eps)
    invstd = 1.0 / torch.sqrt(var + eps)
    xhat = (xd - mean.view(cshape(xd))) * invstd.view(cshape(xd))
    w = torch.ones_like(mean) if weight is None else weight.double()
    g = go * w.view(cshape(xd))
    gx = (invstd / n).view(cshape(xd)) * (
        n * g - g.sum(dims).view(cshape(xd)) - xhat * (g * xhat).sum(dims).view(cshape(xd))
    )
    return gx, (go * xhat).sum(dims), go.sum(dims)


def reference_eval(
    x: torch.Tensor,
    rm: torch.Tensor,
    rv: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    xd = x.double()
    y = (xd - rm.double().view(cshape(xd))) / torch.sqrt(rv.double().view(cshape(xd)) + eps)
    if weight is not None:
        y = y * weight.double().view(cshape(xd))
    if bias is not None:
        y = y + bias.double().view(cshape(xd))
    return y


def random_input(
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    channels_last: bool = False,
) -> torch.Tensor:
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
