"""Tensor subclasses through bnkit's layers as through torch's: MONAI's MetaTensor (which
carries an image's metadata through a network) and a plain user subclass keep their type,
values and metadata, forward and backward."""

from __future__ import annotations

import copy

import pytest
import torch

import bnkit
from tests.conftest import random_input


class Tagged(torch.Tensor):
    """A subclass with torch's default __torch_function__."""


def _pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    t = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        t.weight.uniform_(0.5, 1.5)
        t.bias.uniform_(-1, 1)
        t.running_mean.uniform_(0, 1)
        t.running_var.uniform_(0.5, 2)
    ours = bnkit.convert(torch.nn.Sequential(copy.deepcopy(t)), to="bnkit")[0]
    return t, ours


def _wrap(kind: str, x: torch.Tensor) -> torch.Tensor:
    if kind == "metatensor":
        monai_data = pytest.importorskip("monai.data")
        return monai_data.MetaTensor(x, meta={"filename_or_obj": "scan.nii.gz", "spacing": 1.5})
    return x.as_subclass(Tagged)


@pytest.mark.parametrize("kind", ["metatensor", "plain subclass"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_subclass_keeps_type_metadata_and_values(kind, training, channels_last) -> None:
    ref, ours = _pair()
    x = random_input((4, 3, 6, 5), channels_last=channels_last)
    outs, grads = [], []
    for m in (ref, ours):
        m.train(training)
        xi = _wrap(kind, x.clone()).requires_grad_()
        y = m(xi)
        y.square().sum().backward()
        outs.append(y)
        grads.append(xi.grad)
    assert type(outs[1]) is type(outs[0])
    if kind == "metatensor":
        assert outs[1].meta.keys() == outs[0].meta.keys()
        assert outs[1].meta["filename_or_obj"] == "scan.nii.gz"
        assert outs[1].meta["spacing"] == 1.5
        torch.testing.assert_close(outs[1].affine, outs[0].affine)
    plain = [t.as_subclass(torch.Tensor) for t in (*outs, *grads)]
    torch.testing.assert_close(plain[1], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain[3], plain[2], rtol=1e-4, atol=1e-5)
    for a, b in zip(ref.state_dict().values(), ours.state_dict().values(), strict=True):
        torch.testing.assert_close(b.as_subclass(torch.Tensor), a.as_subclass(torch.Tensor))


@pytest.mark.parametrize("training", [True, False])
def test_fake_tensor_mode_propagates_shapes(training: bool) -> None:
    # FakeTensorMode (shape and memory estimation without data): the kernels cannot read
    # a fake tensor, so bnkit's layer runs torch's ops, which the mode implements
    from torch._subclasses.fake_tensor import FakeTensorMode

    shapes = []
    for m in _pair():
        m.train(training)
        with FakeTensorMode(allow_non_fake_inputs=True):
            x = torch.empty(4, 3, 6, 5).requires_grad_()
            y = m(x)
            y.sum().backward()
            shapes.append((type(y).__name__, tuple(y.shape), tuple(x.grad.shape)))
    assert shapes[1] == shapes[0] == ("FakeTensor", (4, 3, 6, 5), (4, 3, 6, 5))


@pytest.mark.parametrize("training", [True, False])
def test_dispatch_mode_sees_torch_ops(training: bool) -> None:
    # a TorchDispatchMode (an op or memory tracer) sees the computation as torch ops
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    ref, ours = _pair()
    x = random_input((4, 3, 6, 5))
    outs = []
    for m in (ref, ours):
        m.train(training)
        with Record() as rec:
            outs.append(m(x))
        # arithmetic, not only the allocations an opaque kernel makes
        assert any(k in op for op in rec.ops for k in ("addcmul", "mul", "sub", "sum", "norm"))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["metatensor", "plain subclass"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: bnkit.GhostBatchNorm2d(3, virtual_batch_size=3),
        lambda: bnkit.BatchRenorm2d(3),
        lambda: bnkit.FrozenBatchNorm2d(3),
    ],
    ids=["ghost", "renorm", "frozen"],
)
def test_subclass_through_the_other_layer_kinds(kind, make) -> None:
    # the same layer on the plain tensor gives the values; the subclass keeps its type
    x = random_input((5, 3, 6, 5))
    m = make().train()
    plain = copy.deepcopy(m)(x)
    wrapped = _wrap(kind, x.clone())
    y = m(wrapped)
    assert type(y) is type(wrapped)
    if kind == "metatensor":
        assert y.meta["filename_or_obj"] == "scan.nii.gz"
    torch.testing.assert_close(y.as_subclass(torch.Tensor), plain)
