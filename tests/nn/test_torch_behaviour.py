"""Edge cases where bnkit once differed from torch (found by running PyTorch's own
BatchNorm tests against bnkit): each is run on torch's and on bnkit's and the outcomes,
value or exception type, compared. And the subclass override points."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as TF

import bnkit
import bnkit.functional as BF
from tests.conftest import random_input


def _outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except Exception as exc:  # the exception type is what is compared
        return type(exc).__name__, None


def _same(torch_fn: Callable[[], Any], bnkit_fn: Callable[[], Any]) -> None:
    (t_kind, t_val), (b_kind, b_val) = _outcome(torch_fn), _outcome(bnkit_fn)
    assert t_kind == b_kind, f"torch: {t_kind}, bnkit: {b_kind}"
    if isinstance(t_val, torch.Tensor):
        assert isinstance(b_val, torch.Tensor)
        assert b_val.shape == t_val.shape and b_val.dtype == t_val.dtype
        torch.testing.assert_close(b_val, t_val)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_negative_eps_constructs_and_fails_at_the_forward(training: bool) -> None:
    x = random_input((4, 3, 2, 2))
    mods = [cls(3, eps=-1.0).train(training) for cls in (torch.nn.BatchNorm2d, bnkit.BatchNorm2d)]
    _same(lambda: mods[0](x), lambda: mods[1](x))


@pytest.mark.parametrize("n", [0, 4], ids=["empty", "batch"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float64_input_into_float32_layer(n: int, training: bool) -> None:
    x = random_input((max(n, 1), 3, 2, 2), dtype=torch.float64)[:n]
    mods = [cls(3).train(training) for cls in (torch.nn.BatchNorm2d, bnkit.BatchNorm2d)]
    _same(lambda: mods[0](x), lambda: mods[1](x))


@pytest.mark.parametrize("eps", [0.0, -1.0])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_checks_eps_before_dtypes(eps: float, training: bool) -> None:
    x = random_input((4, 3), dtype=torch.float64)
    args = (torch.zeros(3), torch.ones(3))
    _same(
        lambda: TF.batch_norm(x, *args, training=training, eps=eps),
        lambda: BF.batch_norm(x, *args, training=training, eps=eps),
    )


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(0,), (3,), (0, 3), (0, 3, 4)])
def test_low_rank_and_empty_functional(shape: tuple[int, ...], training: bool) -> None:
    c = shape[1] if len(shape) > 1 else shape[0]
    x = torch.randn(shape) + 2
    stats = (torch.randn(c), torch.rand(c) + 0.5)
    _same(
        lambda: TF.batch_norm(x, *stats, training=training),
        lambda: BF.batch_norm(x, *stats, training=training),
    )


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.bool, torch.float16, torch.float64, torch.int64])
@pytest.mark.parametrize("affine", ["none", "weight", "both", "empty-weight"])
def test_empty_1d_functional_keeps_torchs_promotion_and_graph(
    dtype: torch.dtype, affine: str, training: bool
) -> None:
    """torch returns ``input.clone() * weight[0] + bias[0]`` for an empty 1-D input: the dtype
    follows type promotion and the output stays connected to weight and bias."""
    x = torch.zeros(0, dtype=dtype)
    w = torch.randn(0 if affine == "empty-weight" else 3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    wb = {"none": (None, None), "weight": (w, None)}.get(affine, (w, b))
    stats = (torch.randn(3), torch.rand(3) + 0.5)
    _same(
        lambda: TF.batch_norm(x, *stats, *wb, training=training),
        lambda: BF.batch_norm(x, *stats, *wb, training=training),
    )
    if affine == "both":
        y = BF.batch_norm(x, *stats, w, b, training=training)
        assert y.requires_grad and y.grad_fn is not None


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dual_input", [True, False], ids=["dual-x", "plain-x"])
def test_running_mean_with_a_tangent(training: bool, dual_input: bool) -> None:
    x0 = random_input((4, 3))
    with fwAD.dual_level():
        x = fwAD.make_dual(x0, torch.randn_like(x0)) if dual_input else x0

        def call(fn: Callable[..., torch.Tensor]) -> torch.Tensor:
            rm = fwAD.make_dual(torch.zeros(3), torch.ones(3))
            out = fn(x, rm, torch.ones(3), training=training)
            return fwAD.unpack_dual(out).primal.clone()

        _same(lambda: call(TF.batch_norm), lambda: call(BF.batch_norm))


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_lazy_without_affine_or_stats_takes_any_channels(rank: int) -> None:
    lazy = {1: bnkit.LazyBatchNorm1d, 2: bnkit.LazyBatchNorm2d, 3: bnkit.LazyBatchNorm3d}[rank]
    ref = getattr(torch.nn, lazy.__name__)(affine=False, track_running_stats=False)
    ours = lazy(affine=False, track_running_stats=False)
    for c in (3, 5):  # torch keeps num_features 0 and takes any channel count
        x = random_input((16, c, *([6] * rank)), seed=c)
        torch.testing.assert_close(ours(x), ref(x))
    assert ours.num_features == ref.num_features == 0


class _CountingForward(bnkit.BatchNorm2d):
    calls = 0

    def _forward(self, input: torch.Tensor, residual: Any, act: int) -> torch.Tensor:
        type(self).calls += 1
        return super()._forward(input, residual, act) * 2


class _CountingValidate(bnkit.BatchNorm2d):
    calls = 0

    def _validate(self, input: torch.Tensor, batch_stats: bool) -> None:
        type(self).calls += 1
        super()._validate(input, batch_stats)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_override_points_are_honoured_on_every_call(training: bool) -> None:
    plain = bnkit.BatchNorm2d(3).train(training)
    fwd = _CountingForward(3).train(training)
    val = _CountingValidate(3).train(training)
    _CountingForward.calls = _CountingValidate.calls = 0
    for step in range(4):
        x = random_input((4, 3, 5, 5), seed=step)
        want = plain(x)
        torch.testing.assert_close(fwd(x), want * 2)
        torch.testing.assert_close(val(x), want)
    assert _CountingForward.calls == 4
    assert _CountingValidate.calls == 4
