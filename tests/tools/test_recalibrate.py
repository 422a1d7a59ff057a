"""recalibrate: exact population statistics, against closed forms and update_bn."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

import bnkit
from tests.conftest import random_input


def _batches(sizes: list[int], c: int = 3, seed: int = 0) -> list[torch.Tensor]:
    return [random_input((n, c, 2, 2), torch.float64, seed=seed + i) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("cls", [nn.BatchNorm2d, bnkit.BatchNorm2d])
def test_single_layer_equals_concatenated_statistics_uneven_batches(cls) -> None:
    bn = cls(3, momentum=0.1).double()
    data = _batches([5, 2, 7, 3])
    counts = bnkit.recalibrate(bn, data, progress=False)
    cat = torch.cat(data)
    torch.testing.assert_close(bn.running_mean, cat.mean((0, 2, 3)), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        bn.running_var, cat.var((0, 2, 3), unbiased=True), atol=1e-12, rtol=0
    )
    assert counts == {"": 17 * 4}
    assert int(bn.num_batches_tracked) == 4 and bn.momentum == 0.1 and bn.training


def test_deep_model_matches_hooked_activations_and_keeps_params_and_modes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Conv2d(4, 5, 1),
        bnkit.BatchNorm2d(5),
    ).double()
    model.eval()
    params = [p.clone() for p in model.parameters()]
    data = _batches([4, 6, 3], seed=5)
    # The activations each BN sees when only BNs are in train mode (dropout off),
    # BN outputs normalized by batch statistics: recomputed here by hand.
    acts1, acts2 = [], []
    for x in data:
        h = model[0](x)
        acts1.append(h)
        mean, var = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
        h = (h - mean) / torch.sqrt(var + 1e-5) * model[1].weight.view(1, -1, 1, 1)
        h = h + model[1].bias.view(1, -1, 1, 1)
        acts2.append(model[4](torch.relu(h)))
    bnkit.recalibrate(model, data, progress=False)
    for bn, acts in ((model[1], acts1), (model[5], acts2)):
        cat = torch.cat(acts)
        torch.testing.assert_close(bn.running_mean, cat.mean((0, 2, 3)), atol=1e-10, rtol=0)
        torch.testing.assert_close(bn.running_var, cat.var((0, 2, 3)), atol=1e-10, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert not any(m.training for m in model.modules())


def test_closer_to_population_than_update_bn_for_small_batches() -> None:
    g = torch.Generator().manual_seed(0)
    # batches of 2 drawn from channels whose means differ batch to batch (data order)
    data = [torch.randn(2, 3, generator=g, dtype=torch.float64) * 2 + 5 + i % 3 for i in range(60)]
    cat = torch.cat(data)
    true_mean, true_var = cat.mean(0), cat.var(0)
    ours = nn.BatchNorm1d(3).double()
    bnkit.recalibrate(ours, data, progress=False)
    theirs = nn.BatchNorm1d(3).double()
    update_bn(data, theirs)
    err_ours = (ours.running_var - true_var).abs().max().item()
    err_theirs = (theirs.running_var - true_var).abs().max().item()
    assert err_ours < 1e-12 < 0.1 < err_theirs
    torch.testing.assert_close(ours.running_mean, true_mean)


def test_custom_forward_and_num_batches() -> None:
    bn = nn.BatchNorm1d(3).double()
    data = [{"x": random_input((4, 3), torch.float64, seed=i)} for i in range(5)]
    bnkit.recalibrate(bn, data, num_batches=2, forward=lambda m, b: m(b["x"]), progress=False)
    cat = torch.cat([d["x"] for d in data[:2]])
    torch.testing.assert_close(bn.running_var, cat.var(0))


def test_errors_leave_statistics_unchanged() -> None:
    bn = nn.BatchNorm1d(3)
    before = copy.deepcopy(bn.state_dict())
    with pytest.raises(ValueError, match="yielded 2 batch.*asked for 5"):
        bnkit.recalibrate(bn, [random_input((4, 3))] * 2, num_batches=5, progress=False)
    with pytest.raises(TypeError, match="yielded a dict"):
        bnkit.recalibrate(bn, [{"x": 1}], progress=False)
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        bnkit.recalibrate(nn.Linear(3, 3), [random_input((4, 3))], progress=False)
    with pytest.raises(ValueError, match="yielded 0 batch"):
        bnkit.recalibrate(bn, [], progress=False)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k])
    assert bn.training and bn.track_running_stats


class _UnusedBranch(nn.Module):
    """a BatchNorm the forward never reaches (DPT's unused residual_layer1), and one that a
    batch of one sample reaches with a single value per channel"""

    def __init__(self) -> None:
        super().__init__()
        self.a = bnkit.BatchNorm1d(3)
        self.b = nn.BatchNorm1d(3)
        self.c = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.c(y[:1]) if x.shape[0] == 1 else y


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_a_layer_never_reached_is_named_and_left_as_it_was() -> None:
    m = _UnusedBranch()
    with torch.no_grad():
        m.b.running_mean.fill_(0.25)
    before = _state(m)
    data = [random_input((8, 3), seed=1) + 5, random_input((6, 3), seed=2) + 5]
    with pytest.warns(UserWarning, match=r"never reached 2 BatchNorm layer\(s\): 'b', 'c'"):
        counts = bnkit.recalibrate(m, data, progress=False)
    assert counts == {"a": 14, "b": 0, "c": 0}
    cat = torch.cat(data)
    torch.testing.assert_close(m.a.running_mean, cat.mean(0))
    for key in ("b.running_mean", "b.running_var", "c.running_var", "b.num_batches_tracked"):
        assert torch.equal(m.state_dict()[key], before[key]), key


def test_strict_refuses_before_writing_anything() -> None:
    m = _UnusedBranch()
    before = _state(m)
    with pytest.raises(ValueError, match="never reached 2 BatchNorm layer.*'b', 'c'.*unchanged"):
        bnkit.recalibrate(m, [random_input((8, 3)) + 5], progress=False, strict=True)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_a_failing_batch_writes_nothing() -> None:
    """the second batch holds one sample (one value per channel: the training-mode layer
    refuses it): the first batch's statistics are not written either."""
    m = _UnusedBranch()
    before = _state(m)
    data = [random_input((8, 3)) + 5, random_input((1, 3)) + 5]
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bnkit.recalibrate(m, data, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert all(x.training for x in m.modules())  # the modes are restored
