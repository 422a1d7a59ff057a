"""Bad input gets an exception before anything changes, on every layer kind and backend;
non-finite input gives torch's results; the C++ entry points check their own
preconditions (each reproducer of the hardening issue is a test here)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import bnkit
from bnkit.nn import _router
from bnkit.nn import functional as F
from tests.conftest import random_input

C = 6

LAYERS: dict[str, Callable[[], nn.Module]] = {
    "BatchNorm": lambda: bnkit.BatchNorm2d(C),
    "BatchRenorm": lambda: bnkit.BatchRenorm2d(C),
    "GhostBatchNorm": lambda: bnkit.GhostBatchNorm2d(C, virtual_batch_size=2),
    "SyncBatchNorm": lambda: bnkit.SyncBatchNorm(C),  # no process group: plain BatchNorm
    "Frozen": lambda: bnkit.FrozenBatchNorm2d(C),
}


def snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def assert_unchanged(m: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed although the call was rejected"


def x4(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return random_input((4, C, 3, 3), dtype)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
@pytest.mark.parametrize("training", [True, False])
def test_wrong_size_tensor_is_an_error_naming_it(kind: str, name: str, training: bool) -> None:
    m = LAYERS[kind]().train(training)
    setattr(m, name, torch.ones(2) if "running" in name else nn.Parameter(torch.ones(2)))
    if kind == "Frozen":
        m._buffers[name] = torch.ones(2)
    before = snapshot(m)
    with pytest.raises(RuntimeError, match=rf"{name} should contain {C} elements not 2"):
        m(x4())
    assert_unchanged(m, before)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_tensor_on_another_device_is_an_error(kind: str) -> None:
    m = LAYERS[kind]()
    m._buffers["running_var"] = torch.ones(C, device="meta")
    with pytest.raises(RuntimeError, match="running_var is on meta but the input is on cpu"):
        m(x4())


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize(
    "bad", [torch.int64, torch.bool, torch.float64], ids=["int64", "bool", "float64"]
)
def test_rejected_input_changes_nothing(kind: str, bad: torch.dtype) -> None:
    m = LAYERS[kind]().train()
    before = snapshot(m)
    x = x4(torch.float64)
    x = x.to(bad) if bad != torch.float64 else x  # float64 input into a float32 module
    # torch's exception types: NotImplementedError for a non-floating input (bnkit's is a
    # TypeError too), RuntimeError ("mixed dtype") for a floating one not the module's dtype
    err = RuntimeError if bad == torch.float64 else NotImplementedError
    with pytest.raises(err, match=r"(expected a floating-point input|has dtype)"):
        m(x)
    assert_unchanged(m, before)


def test_functional_validates_every_tensor() -> None:
    x = x4()
    with pytest.raises(RuntimeError, match="bias should contain 6 elements not 2"):
        F.batch_norm(x, None, None, torch.ones(C), torch.ones(2), training=True)
    rm, rv = torch.zeros(C), torch.ones(C)
    with pytest.raises(RuntimeError, match="running_mean has dtype torch.float64"):
        F.batch_norm(x, rm.double(), rv, training=True)
    assert torch.equal(rm, torch.zeros(C))


def _nonfinite_input(kind: str, shape: tuple[int, ...], channels_last: bool) -> torch.Tensor:
    x = random_input(shape, seed=5, channels_last=channels_last)
    at = (1, 1) + (0,) * (len(shape) - 2)
    other = (2, 1) + (1,) * (len(shape) - 2)
    if kind == "both":
        x[at], x[other] = float("inf"), float("-inf")
    else:
        x[at] = float(kind)
    return x


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "both"])
@pytest.mark.parametrize(
    "shape,channels_last",
    [((4, C, 3, 3), False), ((4, C, 3, 3), True), ((40, C), False), ((4, C, 5), False)],
    ids=["nchw", "channels_last", "2d", "3d"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_input_matches_torch(
    value: str, shape: tuple[int, ...], channels_last: bool, dtype: torch.dtype
) -> None:
    x = _nonfinite_input(value, shape, channels_last).to(dtype)
    tcls = nn.BatchNorm1d if len(shape) < 4 else nn.BatchNorm2d
    ref = tcls(C).to(dtype)
    ours = bnkit.convert(tcls(C).to(dtype), to="bnkit")
    y_ref, y = ref(x), ours(x)
    for a, b in (
        (y_ref, y),
        (ref.running_mean, ours.running_mean),
        (ref.running_var, ours.running_var),
    ):
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.equal(a.isinf() & (a > 0), b.isinf() & (b > 0))
        finite = a.isfinite()
        torch.testing.assert_close(b[finite], a[finite], rtol=1e-5, atol=1e-5)
    assert ours.running_var[1].isnan()  # the channel with the bad value


def test_batch_stats_of_non_finite_channel() -> None:
    x = _nonfinite_input("inf", (4, C, 3, 3), False)
    mean, var = F.batch_stats(x)
    assert mean[1] == float("inf") and var[1].isnan() and var[0].isfinite()


def test_fast_path_checks_its_own_preconditions(backend: str) -> None:
    if backend != "cpp":
        pytest.skip("cpp only")
    fast = _router.data(x4())
    assert fast is not None
    x, ok, bad = x4(), torch.ones(C), torch.ones(2)
    calls: list[Callable[[], Any]] = [
        lambda: fast.forward_train(x, ok, bad, eps=1e-5),
        lambda: fast.forward_train(x, ok, ok, eps=1e-5, running=(ok.clone(), bad.clone(), 0.1)),
        lambda: fast.forward_train(x, ok, ok, eps=1e-5, running=(ok.double(), ok.clone(), 0.1)),
        lambda: fast.forward_eval(x, ok, bad, ok, ok, eps=1e-5),
        lambda: fast.backward_train(x[:2], x, ok, ok, var=ok, need_grad_input=True, raw_sums=True),
        lambda: fast.backward_train(x, x, ok, bad, var=ok, need_grad_input=True, raw_sums=True),
        lambda: fast.grad_apply(x, x, ok, k_centered=ok, k_grad=bad, k_const=ok),
        lambda: fast.backward_eval(
            x, x, ok, ok, bad, eps=1e-5, need_grad_input=True, need_sums=True
        ),
        lambda: fast.backward_eval(
            x[:2], x, ok, ok, ok, eps=1e-5, need_grad_input=True, need_sums=False
        ),
        lambda: fast.backward_eval(
            x, x, ok, ok, ok, eps=-1.0, need_grad_input=True, need_sums=True
        ),
        # the autograd nodes check through the kernels they call
        lambda: fast.train_node(x.requires_grad_(False), ok, bad, eps=1e-5),
        lambda: fast.train_node(x.to(torch.int32), ok, ok, eps=1e-5),
        lambda: fast.eval_node(x, ok, ok, ok, bad, eps=1e-5),
        lambda: fast.eval_node(x, ok, ok, ok, ok, eps=-1.0),
        lambda: fast.stats(x.transpose(2, 3)),  # neither contiguous nor channels_last
        lambda: fast.stats(x.to(torch.float8_e4m3fn)),
    ]
    for i, call in enumerate(calls):
        with pytest.raises(RuntimeError, match="bnkit"):
            call()
            pytest.fail(f"call {i} did not raise")
