"""The router's staged routes: half/bfloat16 input and strided views reach the kernels
(converted to float32 / copied contiguous, the output rounded back once) and give torch's
results, as accurately, forward and backward, with the running statistics."""

from __future__ import annotations

from collections.abc import Callable

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
    low = dtype != torch.float32
    strided = view in ("transposed", "every other column", "batch-major")
    if not (low or strided):
        assert route.stage is None and route.fast is not None
        return
    assert route.fast is not None and route.stage is not None
    assert route.stage.dtype == (torch.float32 if low else None)
    assert route.stage.contiguous == strided


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_conversion_is_torchs_bit_for_bit(backend: str, dtype: torch.dtype) -> None:
    if backend != "cpp":
        pytest.skip("the kernels' conversion")
    fast = _router.data(torch.ones(2, 2))
    assert fast is not None
    g = torch.Generator().manual_seed(5)
    x = torch.randn(100_003, generator=g) * torch.logspace(-30, 30, 100_003)
    x[::97] = float("inf")
    x[1::97] = -float("inf")
    x[2::97] = float("nan")
    x[3::97] = 0.0
    x[4::97] = -0.0
    down, want = fast.convert(x, dtype), x.to(dtype)
    nan = want.isnan()
    assert torch.equal(down.isnan(), nan)
    assert torch.equal(down.view(torch.int16)[~nan], want.view(torch.int16)[~nan])
    up = fast.convert(want, torch.float32)
    assert torch.equal(up.isnan(), nan)
    assert torch.equal(up[~nan].view(torch.int32), want.float()[~nan].view(torch.int32))
    cl = _x(torch.float32, "channels_last")
    assert fast.convert(cl, dtype).stride() == cl.stride()
    with pytest.raises(RuntimeError, match="dense"):
        fast.convert(torch.ones(4, 8)[:, ::2], dtype)
    with pytest.raises(RuntimeError, match="float32 <-> bfloat16/float16"):
        fast.convert(torch.ones(4, dtype=torch.float64), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["relu", "relu6", None])
def test_the_one_pass_low_precision_eval_matches_the_staged_route(
    backend: str, dtype: torch.dtype, act: str | None
) -> None:
    """forward_eval_low (bfloat16/half read and written directly) gives what the staged
    route (convert, float32 kernel, convert back) gives, bit for bit, and checks its own
    preconditions."""
    if backend != "cpp":
        pytest.skip("the kernels")
    from bnkit.nn import _activations

    fast = _router.data(torch.ones(2, 2))
    assert fast is not None
    g = torch.Generator().manual_seed(6)
    rm, rv = torch.randn(C, generator=g), torch.rand(C, generator=g) + 0.5
    w, b = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
    code = _activations.code(act)
    for view in ("contiguous", "channels_last"):
        x = _x(dtype, view)
        one = fast.forward_eval_low(x, rm, rv, w, b, eps=1e-5, act=code)
        staged = fast.forward_eval(x.float(), rm, rv, w, b, eps=1e-5, act=code).to(dtype)
        assert one.dtype == dtype and one.stride() == x.stride()
        assert torch.equal(one, staged)
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        fast.forward_eval_low(torch.ones(2, C), rm, rv, w, b, eps=1e-5)
    with pytest.raises(RuntimeError, match="contiguous or channels_last"):
        fast.forward_eval_low(_x(dtype, "transposed"), rm, rv, w, b, eps=1e-5)
    with pytest.raises(RuntimeError, match="running_var should contain"):
        fast.forward_eval_low(_x(dtype, "contiguous"), rm, rv[:2], w, b, eps=1e-5)
