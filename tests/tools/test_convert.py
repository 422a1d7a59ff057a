"""bnkit.convert between torch's and bnkit's BatchNorm, and a real training check."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnkit
from tests.conftest import random_input
from tests.models import SmallResNet


def _bns(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if "BatchNorm" in type(m).__name__]


def test_convert_round_trip_keeps_state_flags_and_outputs() -> None:
    torch.manual_seed(0)
    model = SmallResNet()
    model(random_input((8, 1, 16, 16)))  # move running statistics off their init
    model.layer1.bn2.eval()
    model.head[2].momentum = None
    ref = copy.deepcopy(model)
    conv = bnkit.convert(model, to="bnkit")
    assert all(type(m).__module__.startswith("bnkit") for m in _bns(conv))
    assert len(_bns(conv)) == len(_bns(ref)) == 7
    assert not conv.layer1.bn2.training and conv.layer1.bn1.training
    assert conv.head[2].momentum is None
    for (k1, v1), (k2, v2) in zip(ref.state_dict().items(), conv.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)
    ref.eval(), conv.eval()
    x = random_input((4, 1, 16, 16), seed=1)
    torch.testing.assert_close(conv(x), ref(x))
    back = bnkit.convert(conv, to="torch")
    assert all(type(m).__module__.startswith("torch") for m in _bns(back))
    torch.testing.assert_close(back(x), ref(x))


def test_convert_root_module_and_dtype() -> None:
    bn = nn.BatchNorm2d(3).double()
    new = bnkit.convert(bn, to="bnkit")
    assert isinstance(new, bnkit.BatchNorm2d) and new.weight.dtype == torch.float64
    bn2 = nn.BatchNorm1d(3, affine=False, track_running_stats=False)
    new2 = bnkit.convert(bn2)
    assert new2.weight is None and new2.running_mean is None


def test_convert_bad_target() -> None:
    with pytest.raises(ValueError, match="unknown target to='keras'"):
        bnkit.convert(nn.BatchNorm2d(3), to="keras")
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        bnkit.convert("model")  # type: ignore[arg-type]


def test_training_side_by_side_20_sgd_steps() -> None:
    """Same init, same batches: loss curves and final parameters agree.

    In float64: in float32 a rounding difference of 1e-7 flips the sign of some value at
    a ReLU now and then, and from that step on the two runs follow different (equally
    valid) paths, so the comparison would measure chaos, not BatchNorm. float64 keeps
    the runs on one path; 20 steps agree to 1e-9 (measured ~2e-15). float32 parity is
    checked layer by layer in tests/nn.
    """
    torch.manual_seed(0)
    ref = SmallResNet().double()
    mine = bnkit.convert(copy.deepcopy(ref), to="bnkit")
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    opt_m = torch.optim.SGD(mine.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    templates = torch.randn(10, 1, 16, 16, generator=g, dtype=torch.float64)
    losses_r, losses_m = [], []
    for _ in range(20):
        y = torch.randint(0, 10, (16,), generator=g)
        x = templates[y] + 0.5 * torch.randn(16, 1, 16, 16, generator=g, dtype=torch.float64) + 1
        for model, opt, losses in ((ref, opt_r, losses_r), (mine, opt_m, losses_m)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses_r[-1] < losses_r[0]  # it did learn something
    torch.testing.assert_close(torch.tensor(losses_m), torch.tensor(losses_r), rtol=1e-9, atol=0)
    for (k, a), (_, b) in zip(ref.state_dict().items(), mine.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-9, rtol=1e-9, msg=k)


def _bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 1))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-1, 1)
    return net


@pytest.mark.parametrize("training", [True, False])
def test_convert_keeps_hooks_and_pruning(training: bool) -> None:
    # hooks on a BatchNorm (a feature extractor's forward hook, a pre-hook, a full
    # backward hook, the forward pre-hook of torch.nn.utils.prune) run on the converted
    # layer too: the converted model computes the same function
    import torch.nn.utils.prune as prune

    seen: dict[str, list[torch.Tensor]] = {"out": [], "gin": []}
    x = random_input((4, 3, 9, 9))
    results = []
    for to in (None, "bnkit", "torch"):
        net = _bn_net()
        prune.l1_unstructured(net[1], "weight", amount=0.5)
        net[1].register_forward_pre_hook(lambda m, args: (args[0] * 2,))
        net[1].register_forward_hook(lambda m, args, out: seen["out"].append(out.detach()))
        net[1].register_full_backward_hook(lambda m, gi, go: seen["gin"].append(gi[0]))
        if to is not None:
            net = bnkit.convert(net, to="bnkit")
            if to == "torch":
                net = bnkit.convert(net, to="torch")
            assert type(net[1]).__module__.startswith("bnkit" if to == "bnkit" else "torch")
        net.train(training)
        xi = x.clone().requires_grad_()
        y = net(xi)
        y.square().sum().backward()
        results.append((y, xi.grad, net[1].weight_orig.grad, dict(net[1].state_dict())))
    assert len(seen["out"]) == len(seen["gin"]) == 3
    for got in results[1:]:
        torch.testing.assert_close(got[0], results[0][0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[1], results[0][1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[2], results[0][2], rtol=1e-4, atol=1e-4)
        assert got[3].keys() == results[0][3].keys()  # weight_orig, weight_mask, ...
        torch.testing.assert_close(got[3]["weight_mask"], results[0][3]["weight_mask"])
    for a, b in zip(seen["out"][1:], seen["out"][:1] * 2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_convert_names_a_parametrized_batchnorm_it_leaves() -> None:
    import torch.nn.utils.parametrize as parametrize

    class Double(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    net = _bn_net()
    parametrize.register_parametrization(net[1], "weight", Double())
    x = random_input((2, 3, 9, 9))
    before = net(x)
    with pytest.warns(UserWarning, match=r"convert: 1 .*parametrized"):
        out = bnkit.convert(net, to="bnkit")
    assert parametrize.is_parametrized(out[1])
    torch.testing.assert_close(out(x), before)
