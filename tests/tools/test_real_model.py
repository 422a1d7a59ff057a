"""Each tool on a BatchNorm-heavy model from a package no one here wrote (MONAI's ResNet)."""

from __future__ import annotations

import copy

import pytest
import torch

import bnkit
from tests.conftest import random_input

nets = pytest.importorskip("monai.networks.nets")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return nets.resnet18(spatial_dims=2, n_input_channels=1, num_classes=4)


def _bns(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if "BatchNorm" in type(m).__name__]


def test_convert_monai_resnet_keeps_outputs_and_gradients() -> None:
    ref = _model()
    x = random_input((4, 1, 32, 32), seed=1)
    ref(x)  # move the statistics
    mine = bnkit.convert(copy.deepcopy(ref), to="bnkit")
    assert len(_bns(mine)) == 20 and all(isinstance(m, bnkit.BatchNorm2d) for m in _bns(mine))
    yr, ym = ref(x), mine(x)
    torch.testing.assert_close(ym, yr, atol=1e-4, rtol=1e-4)
    yr.sum().backward()
    ym.sum().backward()
    # Parameters after the stem's max-pool only: float rounding may flip the max-pool's
    # choice among near-equal values (zeros after ReLU), which reroutes gradients upstream.
    for name in ("fc.weight", "layer4.1.bn2.weight", "layer2.0.conv1.weight"):
        a = mine.get_parameter(name).grad
        b = ref.get_parameter(name).grad
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3, msg=name)
    ref.eval(), mine.eval()
    torch.testing.assert_close(mine(x), ref(x), atol=1e-4, rtol=1e-4)


def test_freeze_and_recalibrate_on_monai_resnet() -> None:
    model = _model()
    x = random_input((4, 1, 32, 32), seed=2)
    bnkit.freeze(model, layers="layer1.*")
    model.train()
    model(x)
    frozen = [m for n, m in model.named_modules() if n.startswith("layer1") and "bn" in n]
    assert frozen and all(int(m.num_batches_tracked) == 0 for m in frozen)
    assert int(model.bn1.num_batches_tracked) == 1
    bnkit.unfreeze(model)
    data = [random_input((4, 1, 32, 32), seed=s) for s in range(3)]
    counts = bnkit.recalibrate(model, data, progress=False)
    assert len(counts) == 20
    assert all(torch.isfinite(m.running_var).all() for m in _bns(model))
    with bnkit.no_stats_update(model):
        before = model.bn1.running_mean.clone()
        model(x)
        assert torch.equal(model.bn1.running_mean, before)
    frozen_model = bnkit.convert(copy.deepcopy(model), to="frozen")
    model.eval()
    frozen_model.train()
    torch.testing.assert_close(frozen_model(x), model(x), atol=1e-5, rtol=1e-5)
