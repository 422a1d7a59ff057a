"""bnkit.functional: gradients, numerics, the pure form under torch.func and compile."""

from __future__ import annotations

import inspect

import pytest
import torch

import bnkit
from bnkit.nn import functional as BF
from tests.conftest import random_input, reference_train


def test_signature_matches_torch_functional() -> None:
    assert list(inspect.signature(BF.batch_norm).parameters) == list(
        inspect.signature(torch.nn.functional.batch_norm).parameters
    )
    for name, p in inspect.signature(torch.nn.functional.batch_norm).parameters.items():
        assert inspect.signature(BF.batch_norm).parameters[name].default == p.default


def test_never_calls_torch_batch_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("bnkit called torch's batch norm")

    monkeypatch.setattr(torch.nn.functional, "batch_norm", forbidden)
    monkeypatch.setattr(torch, "batch_norm", forbidden)
    monkeypatch.setattr(torch, "native_batch_norm", forbidden)
    b = bnkit.BatchNorm2d(3)
    x = random_input((4, 3, 3, 3)).requires_grad_()
    b(x).sum().backward()
    b.eval()(x).sum().backward()


@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 4), (2, 3, 3, 2), (2, 2, 2, 2, 3)])
def test_gradcheck_and_gradgradcheck_training(affine: str, shape: tuple[int, ...]) -> None:
    x = random_input(shape, torch.float64, seed=7).requires_grad_()
    c = shape[1]
    w = None
    if affine in ("both", "weight"):
        w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(c, dtype=torch.float64).requires_grad_() if affine in ("both", "bias") else None
    inputs = tuple(t for t in (x, w, b) if t is not None)

    def f(*args: torch.Tensor) -> torch.Tensor:
        rest = iter(args[1:])
        ww = next(rest) if w is not None else None
        bb = next(rest) if b is not None else None
        return BF.batch_norm(args[0], None, None, ww, bb, training=True, eps=1e-3)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("affine", ["both", "bias"])
def test_gradcheck_and_gradgradcheck_eval(affine: str) -> None:
    x = random_input((3, 2, 4, 2), torch.float64).requires_grad_()
    w = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64).requires_grad_()
    rm, rv = torch.randn(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 0.5

    def f(xx: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ww, bb = params if affine == "both" else (None, params[0])
        return BF.batch_norm(xx, rm, rv, ww, bb, training=False)

    inputs = (x, w, b) if affine == "both" else (x, b)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(32, 8, 16, 16), (4096, 16)])
def test_large_mean_small_std_at_least_as_accurate_as_torch(shape, channels_last) -> None:
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64) + 1e4
    x = x64.float()
    if channels_last and len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    y64, mean64, var64 = reference_train(x, None, None, 1e-5)
    mine, theirs = bnkit.BatchNorm2d if len(shape) == 4 else bnkit.BatchNorm1d, None
    theirs = torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d
    b, t = mine(shape[1], momentum=1.0), theirs(shape[1], momentum=1.0)
    err_b = (b(x).double() - y64).abs().max().item()
    err_t = (t(x).double() - y64).abs().max().item()
    n = x.numel() // shape[1]
    var_err_b = (b.running_var.double() - var64 * n / (n - 1)).abs().max().item()
    var_err_t = (t.running_var.double() - var64 * n / (n - 1)).abs().max().item()
    assert err_b <= max(err_t, 2e-6), (err_b, err_t)
    assert var_err_b <= max(var_err_t, 1e-6), (var_err_b, var_err_t)


def test_batch_stats_closed_form() -> None:
    x = random_input((5, 3, 4, 4), seed=11)
    mean, var = BF.batch_stats(x)
    torch.testing.assert_close(mean.double(), x.double().mean((0, 2, 3)), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        var.double(), x.double().var((0, 2, 3), unbiased=False), atol=1e-6, rtol=1e-6
    )


def test_functional_eval_requires_running_stats() -> None:
    with pytest.raises(ValueError, match="running_mean and running_var must be given"):
        BF.batch_norm(random_input((4, 3)), None, None, training=False)


def test_functional_channel_mismatch() -> None:
    with pytest.raises(RuntimeError, match="running_mean should contain 4 elements"):
        BF.batch_norm(random_input((4, 4)), torch.zeros(3), torch.ones(3))


# ----------------------------------------------------------------- stateless form


def _state(c: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.zeros(c), torch.ones(c), torch.tensor(0)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_stateless_matches_module_and_mutates_nothing(momentum) -> None:
    m = bnkit.BatchNorm2d(3, momentum=momentum)
    rm, rv, nbt = _state()
    for step in range(3):
        x = random_input((4, 3, 2, 2), seed=step)
        out = BF.batch_norm_stateless(
            x, rm, rv, m.weight, m.bias, num_batches_tracked=nbt, training=True, momentum=momentum
        )
        torch.testing.assert_close(out.output, m(x))
        rm, rv, nbt = out.running_mean, out.running_var, out.num_batches_tracked
        torch.testing.assert_close(rm, m.running_mean)
        torch.testing.assert_close(rv, m.running_var)
        assert int(nbt) == int(m.num_batches_tracked)
    fresh = _state()
    BF.batch_norm_stateless(random_input((4, 3, 2, 2)), *fresh[:2], training=True)
    assert torch.equal(fresh[0], torch.zeros(3)) and torch.equal(fresh[1], torch.ones(3))


def test_stateless_under_vmap_matches_a_loop() -> None:
    xs = random_input((5, 4, 3, 2, 2), seed=3)  # 5 independent models, each a (4,3,2,2) batch
    rms, rvs = torch.zeros(5, 3), torch.ones(5, 3)

    def one(x: torch.Tensor, rm: torch.Tensor, rv: torch.Tensor):
        out = BF.batch_norm_stateless(x, rm, rv, training=True)
        return out.output, out.running_mean, out.running_var

    ys, nms, nvs = torch.func.vmap(one)(xs, rms, rvs)
    for i in range(5):
        y, nm, nv = one(xs[i], rms[i], rvs[i])
        torch.testing.assert_close(ys[i], y)
        torch.testing.assert_close(nms[i], nm)
        torch.testing.assert_close(nvs[i], nv)


def test_stateless_under_func_grad_matches_closed_form() -> None:
    x = random_input((6, 3), torch.float64, seed=4)
    w = torch.rand(3, dtype=torch.float64) + 0.5
    target = torch.randn(6, 3, dtype=torch.float64)

    def loss(weight: torch.Tensor) -> torch.Tensor:
        out = BF.batch_norm_stateless(x, None, None, weight, None, training=True)
        return (out.output * target).sum()

    xhat = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(torch.func.grad(loss)(w), (target * xhat).sum(0))


def test_stateless_under_compile_fullgraph() -> None:
    torch._dynamo.reset()

    def step(x, rm, rv, nbt, w, b):
        out = BF.batch_norm_stateless(
            x, rm, rv, w, b, num_batches_tracked=nbt, training=True, momentum=None
        )
        return out.output, out.running_mean, out.running_var, out.num_batches_tracked

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = random_input((4, 3, 2, 2), seed=5)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    rm, rv, nbt = _state()
    got = compiled(x, rm, rv, nbt, w, b)
    want = step(x, rm, rv, nbt, w, b)
    for g_, w_ in zip(got, want, strict=True):
        torch.testing.assert_close(g_, w_)
