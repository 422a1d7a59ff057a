"""freeze / unfreeze / no_stats_update / StatsGuard: reproduce each failure, then its fix."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import bnkit
from tests.conftest import random_input
from tests.models import SmallResNet


def _finetune_epoch(model: SmallResNet, seed: int) -> None:
    """One 'epoch' of head fine-tuning: model.train(), a few SGD steps on the head."""
    model.train()
    opt = torch.optim.SGD([p for p in model.head.parameters() if p.requires_grad], lr=0.05)
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        x = torch.rand(8, 1, 16, 16, generator=g) * 2 + 0.5
        y = torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _trunk_output(model: SmallResNet, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.layer2(model.layer1(model.stem(x))).clone()


@pytest.mark.parametrize("kind", ["torch", "bnkit"])
def test_requires_grad_false_alone_drifts_and_freeze_does_not(kind: str) -> None:
    torch.manual_seed(0)
    base = SmallResNet()
    if kind == "bnkit":
        base = bnkit.convert(base, to="bnkit")
    x = random_input((4, 1, 16, 16), seed=3)

    # The failure: trunk "frozen" with requires_grad_(False) only.
    naive = copy.deepcopy(base)
    for part in (naive.stem, naive.layer1, naive.layer2):
        part.requires_grad_(False)
    outs = []
    for epoch in range(2):
        _finetune_epoch(naive, epoch)
        outs.append(_trunk_output(naive, x))
    assert (outs[0] - outs[1]).abs().max() > 1e-3  # the same input drifts

    # The fix.
    fixed = copy.deepcopy(base)
    frozen = bnkit.freeze(fixed, layers=["stem.*", "layer*"])
    assert "head.2" not in frozen and "stem.1" in frozen
    for part in (fixed.stem, fixed.layer1, fixed.layer2):
        part.requires_grad_(False)
    before = _trunk_output(fixed, x)
    head_bn_before = fixed.head[2].running_mean.clone()
    for epoch in range(2):
        _finetune_epoch(fixed, epoch)
        assert torch.equal(_trunk_output(fixed, x), before)  # drift exactly 0
    fixed.train()
    assert fixed.stem[1].training  # the flag still says train: the freeze is in the hook
    assert not torch.equal(fixed.head[2].running_mean, head_bn_before)  # the head still trains


def test_freeze_affine_and_unfreeze_restores_exactly() -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.BatchNorm2d(3))
    model[2].bias.requires_grad_(False)  # a user choice that unfreeze must keep
    bnkit.freeze(model, layers=nn.BatchNorm2d)
    assert not model[1].weight.requires_grad and not model[2].weight.requires_grad
    assert bnkit.frozen_layers(model) == ["1", "2"]
    bnkit.unfreeze(model)
    assert model[1].weight.requires_grad and model[1].bias.requires_grad
    assert model[2].weight.requires_grad and not model[2].bias.requires_grad
    assert bnkit.frozen_layers(model) == []
    assert not model[1]._forward_pre_hooks and not model[1]._forward_hooks
    model.train()
    x = random_input((4, 1, 5, 5))
    model(x)
    assert int(model[1].num_batches_tracked) == 1  # back to normal training behaviour


def test_freeze_stats_only_keeps_affine_trainable() -> None:
    bn = bnkit.BatchNorm2d(3)
    bnkit.freeze(bn, affine=False)
    assert bn.weight.requires_grad
    bn.train()
    bn(random_input((4, 3, 2, 2)))
    assert int(bn.num_batches_tracked) == 0


def test_frozen_model_survives_deepcopy_and_pickle() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3))
    bnkit.freeze(model)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        clone.train()
        clone(random_input((4, 3)))
        assert int(clone[0].num_batches_tracked) == 0


def test_freeze_bad_selectors() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match=r"'backbone\.\*' selects no BatchNorm layer.*: 1"):
        bnkit.freeze(model, layers="backbone.*")
    with pytest.raises(TypeError, match="name pattern"):
        bnkit.freeze(model, layers=[3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="no BatchNorm layer in Linear"):
        bnkit.freeze(nn.Linear(2, 2))


@pytest.mark.parametrize("cls", [nn.BatchNorm2d, bnkit.BatchNorm2d])
def test_no_stats_update_uses_batch_stats_and_changes_nothing(cls) -> None:
    model = nn.Sequential(cls(3))
    x = random_input((4, 3, 2, 2), seed=2)
    model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with bnkit.no_stats_update(model):
        y = model(x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    ref = nn.BatchNorm2d(3, track_running_stats=False)
    torch.testing.assert_close(y, ref(x))
    assert model[0].track_running_stats
    model(x)
    assert int(model[0].num_batches_tracked) == 2


def test_guard_skips_nonfinite_batches_and_names_first_layer() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.BatchNorm1d(4))
    x = random_input((8, 3))
    model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bad = x.clone()
    bad[0, 0] = float("inf")
    # the failure without the guard: the running stats are poisoned
    poisoned = copy.deepcopy(model)
    poisoned(bad)
    assert not torch.isfinite(poisoned[1].running_mean).all()
    with bnkit.StatsGuard(model) as guard:
        model(bad)
    assert guard.first_nonfinite == "1" and guard.events == ["1", "3"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    with bnkit.StatsGuard(model) as guard:
        model(x)
    assert guard.events == [] and int(model[1].num_batches_tracked) == 2


def test_guard_deferred_commit_and_rollback() -> None:
    model = nn.Sequential(bnkit.BatchNorm1d(3))
    guard = bnkit.StatsGuard(model, deferred=True).attach()
    model(random_input((8, 3), seed=1))
    guard.commit()
    committed = model[0].running_mean.clone()
    model(random_input((8, 3), seed=2))  # the step that GradScaler then skips
    assert not torch.equal(model[0].running_mean, committed)
    guard.rollback()
    assert torch.equal(model[0].running_mean, committed)
    assert int(model[0].num_batches_tracked) == 1
    guard.detach()
    with pytest.raises(RuntimeError, match="deferred=True"):
        bnkit.StatsGuard(model).rollback()
