"""What PyTorch's test/test_nn.py checks of BatchNorm (its batchnorm, LazyBatchNorm and
load_state_dict tests), as checks of our own, run on torch's classes and on bnkit's.

Each check takes a namespace — torch's ``nn`` classes and ``F.batch_norm``, or bnkit's — and
asserts what test_nn.py asserts of torch's. Running it on torch too shows the check holds of
the real thing, so a bnkit failure is a departure from torch, not a wrong check.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnkit
import bnkit.functional as BF
from tests.conftest import random_input

NAMESPACES = {
    "torch": types.SimpleNamespace(
        BatchNorm1d=nn.BatchNorm1d,
        BatchNorm2d=nn.BatchNorm2d,
        BatchNorm3d=nn.BatchNorm3d,
        LazyBatchNorm1d=nn.LazyBatchNorm1d,
        LazyBatchNorm2d=nn.LazyBatchNorm2d,
        LazyBatchNorm3d=nn.LazyBatchNorm3d,
        batch_norm=F.batch_norm,
    ),
    "bnkit": types.SimpleNamespace(
        BatchNorm1d=bnkit.BatchNorm1d,
        BatchNorm2d=bnkit.BatchNorm2d,
        BatchNorm3d=bnkit.BatchNorm3d,
        LazyBatchNorm1d=bnkit.LazyBatchNorm1d,
        LazyBatchNorm2d=bnkit.LazyBatchNorm2d,
        LazyBatchNorm3d=bnkit.LazyBatchNorm3d,
        batch_norm=BF.batch_norm,
    ),
}
RANK_SHAPES = {1: (8, 4, 5), 2: (6, 4, 3, 5), 3: (4, 4, 2, 3, 3)}


@pytest.fixture(params=list(NAMESPACES))
def ns(request: pytest.FixtureRequest) -> types.SimpleNamespace:
    return NAMESPACES[request.param]


def test_less_than_one_value_per_channel_raises(ns: types.SimpleNamespace) -> None:
    x = torch.rand(1, 10, 1)
    with pytest.raises(ValueError):
        ns.BatchNorm1d(10)(x)
    with pytest.raises(ValueError):
        ns.batch_norm(x, torch.rand(10), torch.rand(10), training=True)
    ns.BatchNorm1d(10).eval()(x)  # eval uses the running statistics: fine


@pytest.mark.parametrize("which", ["running_mean", "running_var", "weight", "bias"])
@pytest.mark.parametrize("size", [9, 11])
def test_per_channel_tensor_of_the_wrong_size_raises(
    ns: types.SimpleNamespace, which: str, size: int
) -> None:
    x = torch.rand(2, 10)
    args = {"running_mean": torch.rand(10), "running_var": torch.rand(10)}
    args[which] = torch.rand(size)
    with pytest.raises(RuntimeError):
        ns.batch_norm(x, **args)


def test_buffers_not_updated_when_stats_are_not_tracked(ns: types.SimpleNamespace) -> None:
    bn = ns.BatchNorm1d(4, track_running_stats=False)
    assert bn.running_mean is None and bn.running_var is None
    assert bn.num_batches_tracked is None
    bn(random_input((8, 4)))
    assert bn.num_batches_tracked is None and bn.running_mean is None
    tracked = ns.BatchNorm1d(4)
    tracked.track_running_stats = False  # switched off after construction
    before = [t.clone() for t in tracked.buffers()]
    tracked(random_input((8, 4)))
    assert all(torch.equal(a, b) for a, b in zip(before, tracked.buffers(), strict=True))


def test_load_state_dict_num_batches_tracked(ns: types.SimpleNamespace) -> None:
    bn = ns.BatchNorm2d(1)
    for _ in range(3):
        bn(random_input((2, 1, 3, 3)))
    state = bn.state_dict()
    assert state["num_batches_tracked"].dtype == torch.long and state["num_batches_tracked"] == 3
    with torch.device("meta"):
        meta_bn = ns.BatchNorm2d(1)
    assert meta_bn.num_batches_tracked.device == torch.device("meta")
    meta_bn.load_state_dict(state, assign=True)
    assert torch.equal(meta_bn.state_dict()["num_batches_tracked"], state["num_batches_tracked"])
    # a state_dict without the counter (one saved before it existed) keeps the layer's own
    fresh = ns.BatchNorm2d(1)
    fresh.num_batches_tracked.fill_(7)
    partial = {k: v for k, v in state.items() if k != "num_batches_tracked"}
    assert fresh.load_state_dict(partial).missing_keys == []
    assert fresh.num_batches_tracked == 7 and torch.equal(fresh.running_var, bn.running_var)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("affine", [True, False])
def test_simple_average(ns: types.SimpleNamespace, rank: int, affine: bool) -> None:
    """momentum=None: the running statistics are the plain average over the batches seen
    (checked against closed-form means of the batches, as test_nn.py does)."""
    cls = getattr(ns, f"BatchNorm{rank}d")
    bn = cls(4, momentum=None, affine=affine)
    xs = [random_input(RANK_SHAPES[rank], seed=s) for s in range(3)]
    dims = [0, *range(2, xs[0].dim())]
    for x in xs:
        bn(x)
    mean = torch.stack([x.double().mean(dims) for x in xs]).mean(0)
    var = torch.stack([x.double().var(dims, unbiased=True) for x in xs]).mean(0)
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert bn.num_batches_tracked == 3


@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0])
def test_update_stats(ns: types.SimpleNamespace, momentum: float) -> None:
    bn = ns.BatchNorm2d(4, momentum=momentum)
    x = random_input((3, 4, 5, 2))
    bn(x)
    mean, var = x.double().mean((0, 2, 3)), x.double().var((0, 2, 3), unbiased=True)
    expected_mean = momentum * mean
    expected_var = (1 - momentum) + momentum * var
    torch.testing.assert_close(bn.running_mean.double(), expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), expected_var, rtol=1e-5, atol=1e-6)


def test_affine_and_not_affine(ns: types.SimpleNamespace) -> None:
    assert [n for n, _ in ns.BatchNorm2d(3).named_parameters()] == ["weight", "bias"]
    assert list(ns.BatchNorm2d(3, affine=False).parameters()) == []
    bn = ns.BatchNorm2d(3)
    x = random_input((4, 3, 2, 2)).requires_grad_()
    bn(x).pow(2).sum().backward()
    assert bn.weight.grad is not None and bn.bias.grad is not None and x.grad is not None


def test_eval_is_per_sample(ns: types.SimpleNamespace) -> None:
    """In eval every sample is normalized on its own: a batch gives the samples' outputs."""
    bn = ns.BatchNorm2d(3)
    bn(random_input((8, 3, 4, 4)))
    bn.eval()
    x = random_input((5, 3, 4, 4), seed=2)
    whole = bn(x)
    for i in range(5):
        torch.testing.assert_close(bn(x[i : i + 1]), whole[i : i + 1])


def test_half_overflow(ns: types.SimpleNamespace) -> None:
    """float16 input whose squares overflow float16: the output is computed in float32."""
    x = random_input((4, 3, 5, 5)).half() * 3000
    y = ns.BatchNorm2d(3).half()(x)
    assert y.dtype == torch.float16 and bool(y.isfinite().all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [True, False])
def test_mixed_reduced_precision_input(
    ns: types.SimpleNamespace, dtype: torch.dtype, training: bool
) -> None:
    """A reduced-precision input into a float32 layer (what autocast feeds it): output in the
    input's dtype, statistics and parameters stay float32, close to the float32 result."""
    bn = ns.BatchNorm2d(3).train(training)
    x = random_input((6, 3, 4, 4)).to(dtype)
    y = bn(x)
    assert y.dtype == dtype and bn.running_mean.dtype == torch.float32
    ref = ns.BatchNorm2d(3).train(training)(x.float())
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


def test_large_batch(ns: types.SimpleNamespace) -> None:
    x = random_input((2**15, 2, 1, 1))
    y = ns.BatchNorm2d(2)(x)
    torch.testing.assert_close(
        y.double().mean((0, 2, 3)), torch.zeros(2, dtype=torch.double), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_lazy_infers_and_matches_the_eager_layer(ns: types.SimpleNamespace, rank: int) -> None:
    lazy = getattr(ns, f"LazyBatchNorm{rank}d")()
    assert lazy.has_uninitialized_params()
    x = random_input(RANK_SHAPES[rank])
    y = lazy(x)
    eager = getattr(ns, f"BatchNorm{rank}d")(4)
    assert type(lazy) is type(eager)  # the lazy class becomes the eager one
    torch.testing.assert_close(y, eager(x))
    torch.testing.assert_close(lazy.running_mean, eager.running_mean)
    assert lazy.num_batches_tracked == 1 and lazy.num_features == 4


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_lazy_without_affine_or_stats(ns: types.SimpleNamespace, rank: int) -> None:
    lazy = getattr(ns, f"LazyBatchNorm{rank}d")(affine=False, track_running_stats=False)
    x = random_input(RANK_SHAPES[rank])
    torch.testing.assert_close(
        lazy(x), getattr(ns, f"BatchNorm{rank}d")(4, affine=False, track_running_stats=False)(x)
    )


def test_lazy_state(ns: types.SimpleNamespace) -> None:
    """A lazy layer takes an initialized layer's state_dict (and becomes initialized); an
    initialized layer refuses an uninitialized lazy one's."""
    lazy = ns.LazyBatchNorm2d()
    eager = ns.BatchNorm2d(5)
    eager(random_input((4, 5, 2, 2)))
    lazy.load_state_dict(eager.state_dict())
    assert not lazy.has_uninitialized_params()  # still the lazy class until a forward
    assert lazy.weight.shape == (5,) and torch.equal(lazy.running_var, eager.running_var)
    with pytest.raises(RuntimeError):
        ns.BatchNorm2d(5).load_state_dict(ns.LazyBatchNorm2d().state_dict())


def test_lazy_factory_kwargs(ns: types.SimpleNamespace) -> None:
    lazy = ns.LazyBatchNorm2d(dtype=torch.float64)
    lazy(random_input((4, 3, 2, 2), dtype=torch.float64))
    assert lazy.weight.dtype == torch.float64 and lazy.running_mean.dtype == torch.float64
    assert lazy.num_batches_tracked.dtype == torch.long


@pytest.mark.parametrize("training", [True, False])
def test_functional_grad(ns: types.SimpleNamespace, training: bool) -> None:
    """gradcheck and gradgradcheck of the functional form in float64, both modes."""
    x = random_input((3, 2, 4), dtype=torch.float64).requires_grad_()
    w = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64).requires_grad_()
    stats = (torch.randn(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 0.5)

    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        rm, rv = (s.clone() for s in stats)
        return ns.batch_norm(x, rm, rv, w, b, training=training)  # type: ignore[no-any-return]

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.complex64])
@pytest.mark.parametrize("training", [True, False])
def test_non_floating_input_raises_not_implemented(
    ns: types.SimpleNamespace, dtype: torch.dtype, training: bool
) -> None:
    x = (random_input((4, 3, 2, 2)) * 3).to(dtype)
    with pytest.raises(NotImplementedError):
        ns.BatchNorm2d(3).train(training)(x)
    with pytest.raises(NotImplementedError):
        ns.batch_norm(x, torch.zeros(3), torch.ones(3), training=training)


def test_batch_size_is_checked_before_the_tensors(ns: types.SimpleNamespace) -> None:
    """torch's functional checks one value per channel and eps (in Python) before the op's
    dtype, size and device checks: a call wrong in both ways gets the first error."""
    x = torch.ones(1, 3, 1, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ns.batch_norm(x, torch.zeros(4), torch.ones(4), training=True)
    with pytest.raises(ValueError, match="eps"):
        ns.batch_norm(x.expand(2, 3, 1, 1), torch.zeros(4), torch.ones(4), training=True, eps=0.0)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ns.batch_norm(torch.ones(1), None, None, training=True)
