"""The kernels on what users feed them: half/bfloat16 input read and written in its own
dtype (computed in float32), strided views copied contiguous by the router's staged route;
torch's results, as accurately, forward and backward, with the running statistics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import bnkit
from bnkit.nn import _router
from bnkit.testing import reference_train

C = 6

VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "contiguous": lambda t: t,
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "transposed": lambda t: t.transpose(2, 3),
    "every other column": lambda t: torch.cat([t, t], dim=3)[..., ::2],
    "batch-major": lambda t: t.transpose(0, 1).contiguous().transpose(0, 1),
}


def _x(dtype: torch.dtype, view: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(5, C, 7, 7, generator=g) * torch.linspace(0.5, 3, C).view(1, -1, 1, 1)
    base = base + torch.linspace(-4, 4, C).view(1, -1, 1, 1)
    return VIEWS[view](base.to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("view", list(VIEWS))
def test_the_route_stages_what_the_kernels_cannot_read(
    backend: str, dtype: torch.dtype, view: str
) -> None:
    if backend != "cpp":
        pytest.skip("the kernels' routes")
    x = _x(dtype, view)
    route = _router.train(x, None, None, None)
    strided = view in ("transposed", "every other column", "batch-major")
    assert route.fast is not None  # every dtype here reaches the kernels
    assert route.copy == strided


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("training", [True, False])
def test_staged_calls_match_torch(
    backend: str, dtype: torch.dtype, view: str, training: bool
) -> None:
    ours, ref = bnkit.BatchNorm2d(C), nn.BatchNorm2d(C)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.linspace(0.5, 1.5, C))
            m.bias.copy_(torch.linspace(-1, 1, C))
            m.running_mean.copy_(torch.linspace(-3, 3, C))
            m.running_var.copy_(torch.linspace(0.5, 4, C))
    ours.train(training)
    ref.train(training)
    xa = _x(dtype, view).requires_grad_()
    xb = _x(dtype, view).requires_grad_()
    ya, yb = ours(xa), ref(xb)
    assert ya.dtype == yb.dtype == dtype
    if backend == "cpp":  # torch's output layout (the plain path keeps the input's strides)
        assert ya.is_contiguous() == yb.is_contiguous()
    tol = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(ya, yb, rtol=tol, atol=tol)
    g = torch.randn(ya.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    ya.backward(g)
    yb.backward(g)
    assert xa.grad is not None and xb.grad is not None and xa.grad.dtype == dtype
    torch.testing.assert_close(xa.grad, xb.grad, rtol=tol, atol=tol * 4)
    for pa, pb in ((ours.weight, ref.weight), (ours.bias, ref.bias)):
        assert pa.grad is not None and pb.grad is not None
        # sums over 245 values of half-precision products: both libraries round them
        torch.testing.assert_close(pa.grad, pb.grad, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_staged_training_output_is_as_accurate_as_torch(backend: str, dtype: torch.dtype) -> None:
    x = _x(dtype, "contiguous")
    want, _, _ = reference_train(x.double(), None, None, 1e-5)
    ours = bnkit.BatchNorm2d(C, affine=False)(x)
    theirs = nn.BatchNorm2d(C, affine=False)(x)
    err_ours = (ours.double() - want).abs().max()
    err_theirs = (theirs.double() - want).abs().max()
    assert err_ours <= err_theirs * 1.01


def _per_channel(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    rm, rv = torch.randn(C, generator=g), torch.rand(C, generator=g) + 0.5
    w, b = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
    return rm, rv, w, b


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["relu", "relu6", None])
@pytest.mark.parametrize("view", ["contiguous", "channels_last"])
def test_16_bit_eval_is_the_float32_kernel_rounded_once(
    backend: str, dtype: torch.dtype, act: str | None, view: str
) -> None:
    """The 16-bit eval kernel reads and writes x's dtype and computes in float32: its output
    is the float32 kernel's on x.float(), rounded to nearest even once, bit for bit (NaN,
    inf and signed zeros included), with the input's strides."""
    if backend != "cpp":
        pytest.skip("the kernels")
    from bnkit.nn import _activations

    fast = _router.data(torch.ones(2, 2))
    assert fast is not None
    rm, rv, w, b = _per_channel(6)
    code = _activations.code(act)
    x = _x(dtype, view)
    x[0, :4, 0, 0] = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0], dtype=dtype)
    one = fast.forward_eval(x, rm, rv, w, b, eps=1e-5, act=code)
    want = fast.forward_eval(x.float(), rm, rv, w, b, eps=1e-5, act=code).to(dtype)
    assert one.dtype == dtype and one.stride() == x.stride()
    nan = want.isnan()
    assert torch.equal(one.isnan(), nan)
    assert torch.equal(one.view(torch.int16)[~nan], want.view(torch.int16)[~nan])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape",
    # rows of more than one float16 block (512 values: 1030 channels, channels_last too)
    [(5, C, 7, 7), (3, C, 160, 160), (300, C), (4, C, 1, 1), (41, 1030), (3, 1030, 2, 3, "cl")],
)
def test_16_bit_training_is_the_float32_kernel_rounded_once(
    backend: str, dtype: torch.dtype, shape: tuple[Any, ...]
) -> None:
    """Training forward and backward on 16-bit tensors: the statistics are the float32
    kernel's on the widened input (float64 sums of the same float32 terms) and the outputs
    that kernel's rounded once, to within one unit in the last place of the 16-bit type
    (the sums may be taken in another order, the 16-bit layout's own blocking)."""
    if backend != "cpp":
        pytest.skip("the kernels")
    fast = _router.data(torch.ones(2, 2))
    assert fast is not None
    channels_last = shape[-1] == "cl"
    shape = tuple(shape[:-1]) if channels_last else shape
    g = torch.Generator().manual_seed(8)
    w, b = torch.rand(shape[1], generator=g) + 0.5, torch.randn(shape[1], generator=g)
    x = (torch.randn(shape, generator=g) * 2 + 3).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    go = torch.randn(shape, generator=g).to(dtype)
    y, mean, var, _ = fast.forward_train(x, w, b, eps=1e-5)
    y32, mean32, var32, _ = fast.forward_train(x.float(), w, b, eps=1e-5)
    assert y.dtype == dtype and mean.dtype == torch.float64
    torch.testing.assert_close(mean, mean32, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, var32, rtol=1e-12, atol=1e-12)
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(y.float(), y32.to(dtype).float(), rtol=ulp, atol=ulp)
    gx, gw, gb, _ = fast.backward_train(
        go, x, w, mean, var=var, eps=1e-5, need_grad_input=True, raw_sums=False
    )
    gx32, gw32, gb32, _ = fast.backward_train(
        go.float(), x.float(), w, mean32, var=var32, eps=1e-5, need_grad_input=True,
        raw_sums=False,
    )  # fmt: skip
    assert gx is not None and gx32 is not None and gx.dtype == dtype
    assert gw is not None and gw.dtype == torch.float32
    torch.testing.assert_close(gx.float(), gx32.to(dtype).float(), rtol=ulp, atol=ulp)
    torch.testing.assert_close(gw, gw32, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, gb32, rtol=1e-5, atol=1e-5)
    rm, rv = mean.float(), var.float()  # eval: bit for bit
    ye = fast.forward_eval(x, rm, rv, w, b, eps=1e-5)
    assert torch.equal(ye, fast.forward_eval(x.float(), rm, rv, w, b, eps=1e-5).to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_loads_and_stores_are_torchs_bit_for_bit(backend: str, dtype: torch.dtype) -> None:
    """The kernels' own conversions (integer arithmetic, vectorised) against torch's: every
    one of the 65536 16-bit patterns loaded exactly (an identity eval: x * 1 + 0, so only
    -0 becomes +0), and float32 results over 1e-30..1e30, subnormal, overflowing, inf and
    NaN rounded to nearest even as torch's .to() rounds them."""
    if backend != "cpp":
        pytest.skip("the kernels")
    fast = _router.data(torch.ones(2, 2))
    assert fast is not None
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    x = every.view(2**12, 16)
    one, zero = torch.ones(16), torch.zeros(16)
    y = fast.forward_eval(x, zero, one, one, zero, eps=0.0)
    want = x.float() * 1.0 + 0.0
    nan = want.isnan()
    assert torch.equal(y.isnan(), nan)
    assert torch.equal(y.float()[~nan], want[~nan])  # values (so -0 == +0)
    g = torch.Generator().manual_seed(10)
    scale = torch.logspace(-30, 30, 2**12).view(-1, 1)
    wide = (torch.randn(2**12, 16, generator=g) * scale).to(dtype)
    w = torch.rand(16, generator=g) * 3 + 0.1
    w[0], w[1] = 1e30, 1e-30  # overflow to inf, results deep in the subnormals
    rounded = fast.forward_eval(wide, zero, one, w, zero, eps=0.0)
    want = fast.forward_eval(wide.float(), zero, one, w, zero, eps=0.0).to(dtype)
    nan = want.isnan()
    assert torch.equal(rounded.isnan(), nan)
    assert torch.equal(rounded.view(torch.int16)[~nan], want.view(torch.int16)[~nan])


def test_the_kernels_refuse_other_dtypes(backend: str) -> None:
    if backend != "cpp":
        pytest.skip("the kernels")
    fast = _router.data(torch.ones(2, 2))
    assert fast is not None
    rm, rv, w, b = _per_channel(9)
    with pytest.raises(RuntimeError, match="float32, float64, bfloat16 or float16"):
        fast.forward_eval(torch.ones(2, C, dtype=torch.int32), rm, rv, w, b, eps=1e-5)
    with pytest.raises(RuntimeError, match="contiguous or channels_last"):
        fast.forward_eval(_x(torch.bfloat16, "transposed"), rm, rv, w, b, eps=1e-5)
    with pytest.raises(RuntimeError, match="running_var should contain"):
        fast.forward_eval(_x(torch.float16, "contiguous"), rm, rv[:2], w, b, eps=1e-5)
