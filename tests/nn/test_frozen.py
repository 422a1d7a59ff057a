"""FrozenBatchNorm1d/2d/3d and convert(to="frozen")."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnkit
from tests.conftest import random_input, reference_eval


@pytest.mark.parametrize(
    "cls,shape",
    [
        (bnkit.FrozenBatchNorm1d, (4, 3)),
        (bnkit.FrozenBatchNorm2d, (4, 3, 2, 2)),
        (bnkit.FrozenBatchNorm3d, (2, 3, 2, 2, 2)),
    ],
)
def test_fresh_frozen_is_identity_and_all_buffers(cls, shape) -> None:
    f = cls(3)
    x = random_input(shape)
    assert torch.equal(f(x), x)
    assert list(f.parameters()) == []
    assert list(f.state_dict()) == list(nn.BatchNorm2d(3).state_dict())


def test_frozen_from_trained_batchnorm_matches_eval_in_train_mode() -> None:
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    bn(random_input((8, 3, 4, 4), seed=1))
    bn.eval()
    f = bnkit.FrozenBatchNorm2d(3)
    f.load_state_dict(bn.state_dict())
    f.train()
    x = random_input((4, 3, 4, 4), seed=2)
    y64 = reference_eval(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    torch.testing.assert_close(f(x).double(), y64, atol=1e-5, rtol=0)
    torch.testing.assert_close(f(x), bn(x))
    # and back into a BatchNorm
    bn2 = nn.BatchNorm2d(3)
    bn2.load_state_dict(f.state_dict())
    torch.testing.assert_close(bn2.running_var, bn.running_var)


def test_frozen_half_input_with_float32_buffers() -> None:
    f = bnkit.FrozenBatchNorm2d(3)
    x = random_input((2, 3, 4, 4)).half()
    assert f(x).dtype == torch.float16


def test_frozen_loads_affine_false_batchnorm() -> None:
    bn = nn.BatchNorm1d(3, affine=False)
    bn(random_input((6, 3)))
    f = bnkit.FrozenBatchNorm1d(3)
    f.load_state_dict(bn.state_dict())
    assert torch.equal(f.weight, torch.ones(3)) and torch.equal(f.bias, torch.zeros(3))


def test_convert_to_frozen_keeps_outputs() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(27, 4), bnkit.BatchNorm1d(4)
    )
    model(random_input((8, 1, 5, 5)))
    model.eval()
    x = random_input((3, 1, 5, 5), seed=4)
    want = model(x)
    frozen = bnkit.convert(model, to="frozen")
    assert isinstance(frozen[1], bnkit.FrozenBatchNorm2d)
    assert isinstance(frozen[4], bnkit.FrozenBatchNorm1d)
    frozen.train()
    torch.testing.assert_close(frozen(x), want)


def test_convert_to_frozen_warns_without_running_stats() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.warns(UserWarning, match="no running statistics"):
        out = bnkit.convert(model, to="frozen")
    assert isinstance(out[0], nn.BatchNorm1d)
