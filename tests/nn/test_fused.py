"""BatchNorm + residual add + activation (bnkit.nn.fused.batch_norm_act): the same function
as ``act(bn(x) + residual)``, measured against a float64 closed form and against torch's
unfused layers, on every backend (tests/nn/conftest.py) and both memory formats."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bnkit
from bnkit.nn import _kernels, _router
from bnkit.nn.fused import batch_norm_act
from bnkit.testing import random_input, reference_running, reference_train

ACTS = {
    None: lambda t: t,
    "relu": torch.relu,
    "relu6": torch.nn.functional.relu6,
}
EXAMPLES = int(os.environ.get("BNKIT_HYPOTHESIS_EXAMPLES", "30"))


def _layer(c: int, rank: int, dtype: torch.dtype, seed: int = 1, **kw: object) -> torch.nn.Module:
    cls = {2: bnkit.BatchNorm1d, 3: bnkit.BatchNorm1d, 4: bnkit.BatchNorm2d, 5: bnkit.BatchNorm3d}
    m = cls[rank](c, dtype=dtype, **kw)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if m.weight is not None:
            m.weight.copy_(torch.rand(c, generator=g, dtype=torch.float64) * 1.5 + 0.25)
            m.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
        if m.running_mean is not None:
            m.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 2 + 1)
            m.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) * 3 + 0.5)
    return m


def _reference(m: torch.nn.Module, x: torch.Tensor, r: torch.Tensor | None, act: str | None):
    """act(bn(x) + r) in float64 from the definitions (training: batch statistics)."""
    w = None if m.weight is None else m.weight.detach().double()
    b = None if m.bias is None else m.bias.detach().double()
    if m.training:
        y, _, _ = reference_train(x, w, b, m.eps)
    else:
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        y = (x.double() - m.running_mean.double().view(shape)) / torch.sqrt(
            m.running_var.double().view(shape) + m.eps
        )
        if w is not None:
            y = y * w.view(shape) + b.view(shape)
    if r is not None:
        y = y + r.double()
    return ACTS[act](y)


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    shape=st.sampled_from(
        [(16, 8), (6, 5, 7), (4, 6, 5, 5), (3, 4, 2, 3, 3), (2, 40, 9, 9), (2, 3, 80, 81)]
    ),
    channels_last=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    act=st.sampled_from([None, "relu", "relu6"]),
    residual=st.booleans(),
    training=st.booleans(),
    affine=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_float64_closed_form(
    shape: tuple[int, ...],
    channels_last: bool,
    dtype: torch.dtype,
    act: str | None,
    residual: bool,
    training: bool,
    affine: bool,
    seed: int,
) -> None:
    x = random_input(shape, dtype, seed, channels_last)
    r = random_input(shape, dtype, seed + 1, channels_last) * 0.5 if residual else None
    m = _layer(shape[1], len(shape), dtype, affine=affine).train(training)
    rm0, rv0 = m.running_mean.clone(), m.running_var.clone()
    ref = _reference(m, x, r, act)
    y = batch_norm_act(m, x, r, act)
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * 10)
    assert y.dtype == dtype and y.shape == x.shape
    if training:  # the running statistics move exactly as the unfused layer's
        em, ev = reference_running([x], rm0, rv0, m.momentum)
        torch.testing.assert_close(m.running_mean.double(), em, rtol=tol, atol=tol)
        torch.testing.assert_close(m.running_var.double(), ev, rtol=tol, atol=tol)
        assert int(m.num_batches_tracked) == 1
    else:
        assert torch.equal(m.running_mean, rm0) and int(m.num_batches_tracked) == 0


# (2, 3, 80, 81): NCHW runs long enough for the one-sweep kernel (nchw_fused)
@pytest.mark.parametrize("shape", [(8, 12, 9, 9), (2, 3, 80, 81)], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("act", [None, "relu", "relu6"])
@pytest.mark.parametrize("training", [True, False])
def test_same_as_torch_unfused_forward_and_backward(
    shape: tuple[int, ...], channels_last: bool, act: str | None, training: bool
) -> None:
    """Output and every gradient (x, weight, bias, residual) against torch's BatchNorm2d
    followed by torch's add and activation: bnkit's error against the same computation in
    float64 is no larger than torch's own float32 error (the weight and bias gradients sum
    thousands of terms that cancel, so neither is exact)."""
    c = shape[1]
    x = random_input(shape, torch.float32, 3, channels_last) * 2
    r = random_input(shape, torch.float32, 4, channels_last)
    go = random_input(x.shape, torch.float32, 5, channels_last)
    ours = _layer(c, 4, torch.float32).train(training)
    state0 = copy.deepcopy(ours.state_dict())
    results = {}
    for name, dtype in (("bnkit", torch.float32), ("torch", torch.float32), ("f64", torch.float64)):
        m = ours if name == "bnkit" else torch.nn.BatchNorm2d(c, dtype=dtype).train(training)
        if name != "bnkit":
            m.load_state_dict(state0)
        xi = x.detach().to(dtype, copy=True).requires_grad_()
        ri = r.detach().to(dtype, copy=True).requires_grad_()
        y = batch_norm_act(m, xi, ri, act) if name == "bnkit" else ACTS[act](m(xi) + ri)
        (y * go.to(dtype)).sum().backward()
        results[name] = (y, xi.grad, ri.grad, m.weight.grad, m.bias.grad, m.state_dict())
    ref = results["f64"]
    torch.testing.assert_close(results["bnkit"][0], results["torch"][0], rtol=1e-5, atol=1e-5)
    # the weight and bias gradients are sums of N * H * W terms per channel: float32 summation
    # leaves an error of a few eps * sum|terms| in any order (torch's included)
    xd = x.double()
    xhat = (xd - xd.mean((0, 2, 3), keepdim=True)) / xd.std((0, 2, 3), keepdim=True)
    terms = go.double().abs() * (xhat.abs() if training else xhat.abs() + 1)
    bound = 4 * torch.finfo(torch.float32).eps * terms.sum((0, 2, 3)).max().item()
    for i in range(1, 5):
        err = {k: (results[k][i].double() - ref[i]).abs().max().item() for k in ("bnkit", "torch")}
        assert err["bnkit"] <= 2 * err["torch"] + (bound if i >= 3 else 1e-6), (i, err, bound)
    for k, v in results["torch"][5].items():
        torch.testing.assert_close(results["bnkit"][5][k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("act", ["relu", "relu6"])
def test_gradcheck_float64(channels_last: bool, act: str) -> None:
    x = random_input((5, 3, 4, 4), torch.float64, 7, channels_last).requires_grad_()
    r = random_input((5, 3, 4, 4), torch.float64, 8, channels_last).requires_grad_()
    m = _layer(3, 4, torch.float64)

    def f(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _with_params(m, w, b, x, r, act)

    w = m.weight.detach().clone().requires_grad_()
    b = m.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (x, r, w, b), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradgradcheck(f, (x, r, w, b), eps=1e-6, atol=1e-4)


@pytest.mark.parametrize("act", [None, "relu"])
def test_gradcheck_residual_of_a_layer_without_affine(act: str | None) -> None:
    # the residual is the autograd node's second tensor input here (no weight, no bias)
    x = random_input((5, 3, 4, 4), torch.float64, 7).requires_grad_()
    r = random_input((5, 3, 4, 4), torch.float64, 8).requires_grad_()
    m = _layer(3, 4, torch.float64, affine=False)

    def f(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return batch_norm_act(m, x, r, act)

    assert torch.autograd.gradcheck(f, (x, r), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradgradcheck(f, (x, r), eps=1e-6, atol=1e-4)


def _with_params(m, w, b, x, r, act):  # type: ignore[no-untyped-def]
    """batch_norm_act with the layer's weight and bias replaced by w, b (gradcheck's
    inputs), in training mode without touching the layer's statistics."""
    layer = copy.copy(m)
    layer._parameters = dict(m._parameters, weight=w, bias=b)
    layer.track_running_stats = False
    layer._buffers = dict(m._buffers, running_mean=None, running_var=None)
    return batch_norm_act(layer, x, r, act)


def test_relu_gradient_follows_torch_at_nan_and_bounds() -> None:
    """torch's rules: relu/relu6 keep NaN and its gradient passes; relu6's gradient is 0
    at 0 and 6 and beyond."""
    m = _layer(2, 2, torch.float32).eval()
    with torch.no_grad():
        m.running_mean.zero_()
        m.running_var.fill_(1 - m.eps)  # scale 1: y = x * w + b with w = 1, b = 0
        m.weight.fill_(1.0)
        m.bias.zero_()
    x = torch.tensor([[float("nan"), -1.0], [0.0, 6.0], [3.0, 7.0]]).requires_grad_()
    for act in ("relu", "relu6"):
        x.grad = None
        ref_x = x.detach().clone().requires_grad_()
        y = batch_norm_act(m, x, None, act)
        y_ref = ACTS[act](ref_x * 1.0)
        assert torch.equal(y.isnan(), y_ref.isnan())
        torch.testing.assert_close(y, y_ref, equal_nan=True)
        y.sum().backward()
        y_ref.sum().backward()
        assert torch.equal(x.grad, ref_x.grad), (act, x.grad, ref_x.grad)


def test_anything_else_is_act_of_bn_plus_residual() -> None:
    """Modules the kernels do not fuse (torch's, Frozen, Renorm) and residuals they cannot
    take (a broadcast, another dtype) give act(bn(x) + r) with torch's ops."""
    x = random_input((6, 4, 5, 5), torch.float32, 9)
    r = random_input((6, 4, 5, 5), torch.float32, 10)
    for m in (
        torch.nn.BatchNorm2d(4),
        bnkit.FrozenBatchNorm2d(4),
        bnkit.BatchRenorm2d(4),
        bnkit.BatchNorm2d(4),
    ):
        for res in (r, r[:1], r[0, :, :1, :1].double(), None):
            a, b = copy.deepcopy(m), copy.deepcopy(m)
            y = batch_norm_act(a, x, res, "relu")
            expected = torch.relu(b(x) + (res if res is not None else 0))
            torch.testing.assert_close(y, expected.to(y.dtype), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("act", [None, "relu", "relu6"])
@pytest.mark.parametrize("training", [True, False])
def test_bit_identical_to_the_unfused_layer(
    channels_last: bool, act: str | None, training: bool
) -> None:
    """relu/relu6/add: the same bits as bnkit's layer followed by torch's add and
    activation, output and input gradient (the gate is the forward's own pre-activation)."""
    x = random_input((6, 20, 7, 7), torch.float32, 21, channels_last)
    r = random_input((6, 20, 7, 7), torch.float32, 22, channels_last)
    go = random_input((6, 20, 7, 7), torch.float32, 23, channels_last)
    a = _layer(20, 4, torch.float32).train(training)
    b = copy.deepcopy(a)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = batch_norm_act(a, xa, r, act)
    yb = ACTS[act](b(xb) + r)
    assert torch.equal(ya, yb)
    ya.backward(go)
    yb.backward(go)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-7)


def test_bad_activation_is_named() -> None:
    with pytest.raises(ValueError, match="activation must be one of"):
        batch_norm_act(bnkit.BatchNorm2d(2), torch.randn(2, 2, 3, 3), None, "gelu")


def test_bad_input_still_validated_with_layer_named() -> None:
    m = bnkit.BatchNorm2d(3)
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3\)"):
        batch_norm_act(m, torch.randn(2, 4, 3, 3), None, "relu")
    assert int(m.num_batches_tracked) == 0


def test_kernels_check_their_fused_arguments() -> None:
    """Bad codes, residuals and coefficients straight into the C++ entry points are
    exceptions, never memory errors."""
    if _kernels.backend() != "cpp":
        pytest.skip("cpp only")
    x = random_input((4, 3, 5, 5), torch.float32, 1)
    fast = _router.data(x)
    assert fast is not None
    y, mean, var, coef = fast.forward_train(x, None, None, eps=1e-5, act=1)
    assert coef is not None and coef.shape == (3, 3)
    bad_calls = [
        lambda: fast.forward_train(x, None, None, eps=1e-5, act=7),
        lambda: fast.forward_train(x, None, None, eps=1e-5, residual=x[:2], act=1),
        lambda: fast.forward_eval(x, mean, var, None, None, eps=1e-5, residual=x[:, :2], act=1),
        lambda: fast.backward_train(
            x, x, None, mean, var=var, need_grad_input=True, raw_sums=False, act=1, coef=None
        ),
        lambda: fast.backward_train(
            x,
            x,
            None,
            mean,
            var=var,
            need_grad_input=True,
            raw_sums=False,
            act=1,
            coef=coef[:, :2].contiguous(),
        ),
    ]
    for call in bad_calls:
        with pytest.raises(RuntimeError):
            call()


@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("res_grad", [True, False])
def test_gradients_asked_for_only_where_needed(x_grad: bool, res_grad: bool) -> None:
    """Any subset of (input, residual) needing a gradient, the residual in the other
    memory format: the gradients that exist are torch's unfused ones."""
    x = random_input((6, 5, 7, 7), torch.float32, 11, channels_last=True)
    r = random_input((6, 5, 7, 7), torch.float32, 12)  # contiguous while x is not
    go = random_input((6, 5, 7, 7), torch.float32, 13)
    ours = _layer(5, 4, torch.float32)
    ref = torch.nn.BatchNorm2d(5)
    ref.load_state_dict(ours.state_dict())
    ins = []
    for _ in range(2):
        ins.append((x.clone().requires_grad_(x_grad), r.clone().requires_grad_(res_grad)))
    y = batch_norm_act(ours, *ins[0], "relu")
    y_ref = torch.relu(ref(ins[1][0]) + ins[1][1])
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    (y * go).sum().backward()
    (y_ref * go).sum().backward()
    for a, b in zip(ins[0], ins[1], strict=True):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("training", [True, False])
def test_cuda_fused_call_is_torchs_ops(training: bool) -> None:
    """On CUDA the fused call is act(bn(x) + residual) on the plain path (the C++ kernels
    are CPU-only and never see a device tensor), equal to torch's cuDNN layers."""
    x = random_input((4, 3, 5, 5), torch.float32, 31).cuda().requires_grad_()
    r = random_input((4, 3, 5, 5), torch.float32, 32).cuda()
    ours = _layer(3, 4, torch.float32).cuda().train(training)
    ref = torch.nn.BatchNorm2d(3).cuda().train(training)
    ref.load_state_dict(ours.state_dict())
    x2 = x.detach().clone().requires_grad_()
    y = batch_norm_act(ours, x, r, "relu")
    y_ref = torch.relu(ref(x2) + r)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
