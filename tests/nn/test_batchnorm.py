"""bnkit's BatchNorm modules, point by point against docs/semantics.md and torch 2.13."""

from __future__ import annotations

import inspect

import pytest
import torch

import bnkit
from tests.conftest import random_input, reference_train

PAIRS = [
    (torch.nn.BatchNorm1d, bnkit.BatchNorm1d, (8, 3)),
    (torch.nn.BatchNorm1d, bnkit.BatchNorm1d, (4, 3, 5)),
    (torch.nn.BatchNorm2d, bnkit.BatchNorm2d, (4, 3, 5, 6)),
    (torch.nn.BatchNorm3d, bnkit.BatchNorm3d, (2, 3, 3, 4, 5)),
]
IDS = ["1d-2D", "1d-3D", "2d", "3d"]


def _params(cls: type) -> list[tuple[str, object, object]]:
    """Names, kinds and defaults of a constructor (annotations are strings in bnkit)."""
    sig = inspect.signature(cls.__init__)
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


@pytest.mark.parametrize("tcls,bcls,_shape", PAIRS, ids=IDS)
def test_constructor_signature_and_repr_match_torch(tcls, bcls, _shape) -> None:
    assert _params(bcls) == _params(tcls)
    for kw in (
        {},
        {"momentum": None, "affine": False},
        {"bias": False, "eps": 1e-3},
        {"track_running_stats": False},
    ):
        assert repr(bcls(5, **kw)) == repr(tcls(5, **kw))


@pytest.mark.parametrize("tcls,bcls,_shape", PAIRS, ids=IDS)
def test_parameters_buffers_and_state_dict_keys_match(tcls, bcls, _shape) -> None:
    for kw in ({}, {"affine": False}, {"bias": False}, {"track_running_stats": False}):
        t, b = tcls(4, **kw), bcls(4, **kw)
        assert list(t.state_dict()) == list(b.state_dict())
        for k, v in t.state_dict().items():
            assert b.state_dict()[k].dtype == v.dtype
            assert torch.equal(b.state_dict()[k], v)
        assert [n for n, _ in t.named_parameters()] == [n for n, _ in b.named_parameters()]


@pytest.mark.parametrize("tcls,bcls,shape", PAIRS, ids=IDS)
def test_state_dict_loads_both_ways(tcls, bcls, shape) -> None:
    t = tcls(3, momentum=None)
    t(random_input(shape, seed=1))
    t(random_input(shape, seed=2))
    b = bcls(3, momentum=None)
    b.load_state_dict(t.state_dict())
    assert int(b.num_batches_tracked) == 2
    x = random_input(shape, seed=3)
    t.eval(), b.eval()
    torch.testing.assert_close(b(x), t(x))
    # and a torch module loads bnkit's
    b.train()(random_input(shape, seed=4))
    t2 = tcls(3, momentum=None)
    t2.load_state_dict(b.state_dict())
    assert int(t2.num_batches_tracked) == 3
    torch.testing.assert_close(t2.running_var, b.running_var)


def test_old_checkpoint_without_num_batches_tracked_loads() -> None:
    t = torch.nn.BatchNorm2d(3)
    t(random_input((4, 3, 2, 2)))
    sd = t.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1  # type: ignore[attr-defined]
    b = bnkit.BatchNorm2d(3)
    b.load_state_dict(sd)
    assert int(b.num_batches_tracked) == 0
    torch.testing.assert_close(b.running_mean, t.running_mean)
    # with the current version the missing key is an error, as in torch
    sd._metadata[""]["version"] = 2  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        bnkit.BatchNorm2d(3).load_state_dict(sd)


def test_mismatched_state_dict_is_a_clear_error_and_changes_nothing() -> None:
    b = bnkit.BatchNorm2d(3)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    with pytest.raises(RuntimeError, match="size mismatch for running_mean"):
        b.load_state_dict(torch.nn.BatchNorm2d(4).state_dict())
    for k, v in b.state_dict().items():
        assert torch.equal(v, before[k])


def test_momentum_none_is_cumulative_average_of_unbiased_variances() -> None:
    b = bnkit.BatchNorm2d(3, momentum=None)
    xs = [random_input((2 + i, 3, 3, 2), torch.float64, seed=i) for i in range(4)]
    b.double()
    for x in xs:
        b(x)
    means = torch.stack([x.mean((0, 2, 3)) for x in xs])
    vars_ = torch.stack([x.var((0, 2, 3), unbiased=True) for x in xs])
    torch.testing.assert_close(b.running_mean, means.mean(0))
    torch.testing.assert_close(b.running_var, vars_.mean(0))
    assert int(b.num_batches_tracked) == 4


def test_momentum_update_uses_unbiased_variance() -> None:
    b = bnkit.BatchNorm1d(3, momentum=0.3).double()
    x = random_input((6, 3), torch.float64, seed=5)
    b(x)
    torch.testing.assert_close(b.running_mean, 0.3 * x.mean(0))
    torch.testing.assert_close(b.running_var, 0.7 + 0.3 * x.var(0, unbiased=True))


def test_running_stats_update_under_no_grad_and_frozen_parameters() -> None:
    b = bnkit.BatchNorm2d(3)
    b.requires_grad_(False)
    with torch.no_grad():
        b(random_input((4, 3, 2, 2)))
    assert int(b.num_batches_tracked) == 1
    assert not torch.equal(b.running_mean, torch.zeros(3))


def test_eval_mode_neither_updates_nor_counts() -> None:
    b = bnkit.BatchNorm2d(3).eval()
    b(random_input((4, 3, 2, 2)))
    assert int(b.num_batches_tracked) == 0
    assert torch.equal(b.running_mean, torch.zeros(3))


def test_track_running_stats_toggled_after_construction() -> None:
    t, b = torch.nn.BatchNorm2d(3), bnkit.BatchNorm2d(3)
    x = random_input((4, 3, 2, 2), seed=1)
    t(x), b(x)
    t.track_running_stats = b.track_running_stats = False
    x2 = random_input((4, 3, 2, 2), seed=2)
    torch.testing.assert_close(b(x2), t(x2))
    assert int(b.num_batches_tracked) == 1  # neither updated nor counted
    torch.testing.assert_close(b.running_mean, t.running_mean)
    t.eval(), b.eval()
    torch.testing.assert_close(b(x2), t(x2))  # eval still uses the old buffers


def test_track_running_stats_false_uses_batch_stats_in_eval() -> None:
    b = bnkit.BatchNorm2d(3, track_running_stats=False).eval()
    x = random_input((4, 3, 2, 2), torch.float64, seed=3).to(torch.float32)
    y64, _, _ = reference_train(x, b.weight, b.bias, b.eps)
    torch.testing.assert_close(b(x).double(), y64, atol=1e-5, rtol=0)
    assert list(b.state_dict()) == ["weight", "bias"]


def test_empty_batch_is_connected_and_counted() -> None:
    t, b = torch.nn.BatchNorm2d(3), bnkit.BatchNorm2d(3)
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    yt, yb = t(x), b(x)
    assert yb.shape == yt.shape and yb.grad_fn is not None
    yb.sum().backward()
    assert b.weight.grad is not None and torch.equal(b.weight.grad, torch.zeros(3))
    assert int(b.num_batches_tracked) == 1
    assert torch.equal(b.running_mean, torch.zeros(3)) and torch.equal(b.running_var, torch.ones(3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_with_float32_parameters(dtype) -> None:
    t, b = torch.nn.BatchNorm2d(3), bnkit.BatchNorm2d(3)
    x = random_input((4, 3, 5, 5), seed=2).to(dtype)
    t(x)
    yb = b(x)
    assert yb.dtype == dtype and b.running_mean.dtype == torch.float32
    y64, mean64, var64 = reference_train(x, None, None, 1e-5)
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(yb.double(), y64, atol=tol, rtol=0)
    torch.testing.assert_close(b.running_mean, t.running_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.running_var, t.running_var, atol=1e-5, rtol=1e-5)
    # a module converted to half keeps an int64 counter and works too
    h = bnkit.BatchNorm2d(3).to(dtype)
    assert h(x).dtype == dtype and h.num_batches_tracked.dtype == torch.int64


def test_channels_last_in_channels_last_out() -> None:
    b = bnkit.BatchNorm2d(3)
    x = random_input((4, 3, 5, 5), channels_last=True).requires_grad_()
    y = b(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.backward(torch.ones_like(y))
    assert x.grad is not None


def test_half_precision_parameters_error_for_mismatched_input_dtype() -> None:
    b = bnkit.BatchNorm2d(3).double()
    with pytest.raises(RuntimeError, match="float64 but the input is torch.float32"):
        b(random_input((4, 3, 2, 2)))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "cls,bad",
    [
        (bnkit.BatchNorm1d, (4,)),
        (bnkit.BatchNorm1d, (2, 3, 4, 5)),
        (bnkit.BatchNorm2d, (2, 3, 4)),
        (bnkit.BatchNorm3d, (2, 3, 4, 5)),
    ],
)
def test_wrong_rank_names_layer_and_rank(cls, bad) -> None:
    with pytest.raises(ValueError, match=rf"{cls.__name__}\(3\): expected .*got {len(bad)}D input"):
        cls(3)(torch.randn(bad))


def test_wrong_channel_count_is_rejected_before_counting() -> None:
    b = bnkit.BatchNorm2d(3)
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3\): expected 3 channels in dim 1, got 4"):
        b(torch.randn(2, 4, 3, 3))
    assert int(b.num_batches_tracked) == 0


def test_one_value_per_channel_in_training() -> None:
    b = bnkit.BatchNorm2d(3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        b(torch.randn(1, 3, 1, 1))
    assert int(b.num_batches_tracked) == 0  # nothing lost
    b.eval()
    assert b(torch.randn(1, 3, 1, 1)).shape == (1, 3, 1, 1)


def test_non_floating_input() -> None:
    with pytest.raises(TypeError, match="floating-point input.*torch.int64"):
        bnkit.BatchNorm2d(3)(torch.randint(0, 5, (2, 3, 2, 2)))


def test_eps_validation_like_torch() -> None:
    with pytest.raises(ValueError, match="eps must be positive during training, but got 0"):
        bnkit.BatchNorm2d(3, eps=0)(random_input((2, 3, 2, 2)))
    assert bnkit.BatchNorm2d(3, eps=0).eval()(random_input((2, 3, 2, 2))).isfinite().all()
    # eps=-1 constructs, as torch's does; its forward says what is wrong
    negative = bnkit.BatchNorm2d(3, eps=-1.0)
    with pytest.raises(ValueError, match="eps must be positive during training, but got -1"):
        negative(random_input((2, 3, 2, 2)))
    with pytest.raises(ValueError, match="eps must be non-negative, but got -1"):
        negative.eval()(random_input((2, 3, 2, 2)))
    with pytest.raises(ValueError, match="eps must be positive during training"):
        # eps is checked before the dtypes, as torch does
        bnkit.functional.batch_norm(
            random_input((2, 3), dtype=torch.float64),
            torch.zeros(3),
            torch.ones(3),
            training=True,
            eps=0.0,
        )
    with pytest.raises(ValueError, match="eps must be non-negative, but got -1"):
        bnkit.functional.batch_norm(random_input((2, 3)), torch.zeros(3), torch.ones(3), eps=-1)


@pytest.mark.parametrize("momentum", [-0.1, 1.5, "0.1"])
def test_bad_momentum(momentum) -> None:
    with pytest.raises(ValueError, match="momentum"):
        bnkit.BatchNorm2d(3, momentum=momentum)


def test_keras_looking_momentum_warns() -> None:
    with pytest.warns(UserWarning, match="1 - m"):
        bnkit.BatchNorm2d(3, momentum=0.99)


def test_num_features_validation() -> None:
    with pytest.raises(ValueError, match="num_features"):
        bnkit.BatchNorm2d(3.5)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ lazy


@pytest.mark.parametrize(
    "lazy,eager,tlazy,shape",
    [
        (bnkit.LazyBatchNorm1d, bnkit.BatchNorm1d, torch.nn.LazyBatchNorm1d, (4, 5)),
        (bnkit.LazyBatchNorm2d, bnkit.BatchNorm2d, torch.nn.LazyBatchNorm2d, (4, 5, 2, 2)),
        (bnkit.LazyBatchNorm3d, bnkit.BatchNorm3d, torch.nn.LazyBatchNorm3d, (2, 5, 2, 2, 2)),
    ],
)
def test_lazy_modules_materialize(lazy, eager, tlazy, shape) -> None:
    assert _params(lazy) == _params(tlazy)
    m, t = lazy(), tlazy()
    x = random_input(shape)
    torch.testing.assert_close(m(x), t(x))
    assert type(m) is eager and m.num_features == 5
    torch.testing.assert_close(m.running_var, t.running_var)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_torch_cudnn() -> None:
    t = torch.nn.BatchNorm2d(3).cuda()
    b = bnkit.BatchNorm2d(3).cuda()
    x = random_input((4, 3, 5, 5)).cuda().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    yt, yb = t(x), b(x2)
    torch.testing.assert_close(yb, yt, atol=1e-5, rtol=1e-5)
    yt.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.running_var, t.running_var)
    b.eval(), t.eval()
    torch.testing.assert_close(b(x2), t(x), atol=1e-5, rtol=1e-5)
