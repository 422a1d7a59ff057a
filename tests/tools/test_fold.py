"""fold: every layer type and BN position against the unfolded model on random data."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

import bnkit
from tests.conftest import random_input


def _rand_bn(bn: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        if bn.weight is not None:
            bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        if bn.bias is not None:
            bn.bias.copy_(torch.randn(c, generator=g))
    return bn.eval()


BN_OPTS = [{}, {"affine": False}, {"bias": False}]

CASES = [  # (layer, BN dims, input shape)
    (lambda: nn.Conv1d(4, 6, 3, groups=2, dilation=2), 1, (3, 4, 11)),
    (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), 2, (3, 4, 7, 7)),
    (lambda: nn.Conv3d(2, 4, 2, bias=False), 3, (2, 2, 4, 4, 4)),
    (lambda: nn.ConvTranspose1d(4, 6, 3, groups=2), 1, (3, 4, 5)),
    (lambda: nn.ConvTranspose2d(4, 6, 3, groups=2, dilation=2, stride=2), 2, (2, 4, 5, 5)),
    (lambda: nn.ConvTranspose3d(2, 4, 2, bias=False), 3, (2, 2, 3, 3, 3)),
    (lambda: nn.Linear(5, 6), 1, (7, 5)),
]


def _bn(dims: int, c: int, kind: str, **kw: object) -> nn.Module:
    mod = bnkit if kind == "bnkit" else nn
    return getattr(mod, f"BatchNorm{dims}d")(c, **kw)


@pytest.mark.parametrize("opts", BN_OPTS, ids=["affine", "no-affine", "no-bias"])
@pytest.mark.parametrize("kind", ["torch", "bnkit"])
@pytest.mark.parametrize("make,dims,shape", CASES)
def test_fold_bn_after_layer(make, dims, shape, kind, opts) -> None:
    torch.manual_seed(0)
    layer = make()
    out_c = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    model = nn.Sequential(layer, _rand_bn(_bn(dims, out_c, kind, **opts))).eval()
    x = random_input(shape, seed=1)
    folded, report = bnkit.fold(model, x)
    assert report.folded == ["1"] and report.layers[0].position == "after"
    assert not any("BatchNorm" in type(m).__name__ for m in folded.modules())
    want, got = model(x).double(), folded(x).double()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert report.max_rel_error <= 1e-5


@pytest.mark.parametrize("opts", BN_OPTS, ids=["affine", "no-affine", "no-bias"])
@pytest.mark.parametrize(
    "make,dims,shape",
    [
        (lambda: nn.Linear(6, 4), 1, (7, 6)),
        (lambda: nn.Conv2d(6, 4, 3, groups=2), 2, (2, 6, 6, 6)),
        (lambda: nn.Conv1d(6, 3, 1), 1, (2, 6, 9)),
    ],
)
def test_fold_bn_before_layer_where_exact(make, dims, shape, opts) -> None:
    model = nn.Sequential(_rand_bn(_bn(dims, 6, "torch", **opts)), make()).eval()
    x = random_input(shape, seed=2)
    folded, report = bnkit.fold(model, x)
    assert report.folded == ["0"] and report.layers[0].position == "before"
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_fold_keeps_float64_and_leaves_input_untouched() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3), _rand_bn(nn.BatchNorm2d(3))).double().eval()
    before = copy.deepcopy(model.state_dict())
    x = random_input((2, 2, 5, 5), torch.float64)
    folded, report = bnkit.fold(model, x)
    assert folded.get_submodule("0").weight.dtype == torch.float64
    assert report.max_rel_error < 1e-13
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_fold_reports_why_not() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn_twice_used = _rand_bn(nn.BatchNorm2d(4))
            self.relu = nn.ReLU()
            self.bn_after_relu = _rand_bn(nn.BatchNorm2d(4))
            self.bn_train = nn.BatchNorm2d(4)
            self.bn_nostats = nn.BatchNorm2d(4, track_running_stats=False).eval()
            self.pad_conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            z = self.bn_twice_used(y) + y  # conv output used twice
            z = self.bn_after_relu(self.relu(z))
            z = self.pad_conv(z)
            return self.bn_nostats(self.bn_train(z))

    net = Net().eval()
    net.bn_train.train()
    x = random_input((2, 3, 6, 6))
    folded, report = bnkit.fold(net, x)
    why = report.not_folded
    assert "used elsewhere" in why["bn_twice_used"]
    assert "preceded by ReLU" in why["bn_after_relu"] and "padded Conv" in why["bn_after_relu"]
    assert "training mode" in why["bn_train"]
    assert "track_running_stats=False" in why["bn_nostats"]
    assert report.folded == []
    assert report.max_abs_error == 0.0
    assert "not folded" in str(report)


def test_fold_falls_back_to_module_structure_when_untraceable() -> None:
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 3, 3), _rand_bn(nn.BatchNorm2d(3)), nn.ReLU())
            self.head_bn = _rand_bn(nn.BatchNorm1d(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.body(x)
            if y.sum() > 0:  # data-dependent control flow: fx cannot trace it
                y = y * 2
            return self.head_bn(y.mean((2, 3)))

    net = Dynamic().eval()
    x = random_input((2, 1, 6, 6))
    folded, report = bnkit.fold(net, x)
    assert not report.traced and report.trace_error
    assert report.folded == ["body.1"]
    assert "could not be traced" in report.not_folded["head_bn"]
    torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=1e-5)


def test_fold_untraceable_sequential_keeps_its_layers() -> None:
    # the Sequential cannot be traced (a data-dependent block after the BN): its Conv is
    # traced alone, found to hold no BatchNorm and kept as it is, so the BN still folds
    # into it (this raised AttributeError on a GraphModule in place of the Conv)
    class Dynamic(nn.Module):
        def forward(self, y: torch.Tensor) -> torch.Tensor:
            return y if float(y.mean()) > -100 else -y

    net = nn.Sequential(nn.Conv2d(3, 6, 3), _rand_bn(nn.BatchNorm2d(6)), Dynamic()).eval()
    x = random_input((2, 3, 8, 8))
    folded, report = bnkit.fold(net, x)
    assert report.folded == ["1"]
    assert [type(m) for m in folded] == [nn.Conv2d, nn.Identity, Dynamic]
    torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("where", ["bn", "conv"])
def test_fold_leaves_layers_with_hooks(where: str) -> None:
    # a BatchNorm's hooks would vanish with it, and a layer's hooks would see the folded
    # output: such pairs are not folded, and the report says why
    net = nn.Sequential(nn.Conv2d(3, 6, 3), _rand_bn(nn.BatchNorm2d(6)), nn.ReLU()).eval()
    net[1 if where == "bn" else 0].register_forward_hook(lambda m, args, out: out * 3)
    x = random_input((2, 3, 8, 8))
    folded, report = bnkit.fold(net, x)
    assert report.folded == []
    assert "forward hooks" in report.not_folded["1"]
    torch.testing.assert_close(folded(x), net(x))


def test_where_torch_fuse_fails_bnkit_does_not() -> None:
    convt = nn.ConvTranspose2d(4, 6, 3, groups=2).eval()
    bn = _rand_bn(nn.BatchNorm2d(6))
    with pytest.raises(RuntimeError):
        fuse_conv_bn_eval(convt, bn, transpose=True)
    lin, bn1 = nn.Linear(3, 4).eval(), _rand_bn(nn.BatchNorm1d(4, affine=False))
    with pytest.raises(TypeError):
        fuse_linear_bn_eval(lin, bn1)
    for model, x in (
        (nn.Sequential(convt, bn), random_input((2, 4, 5, 5))),
        (nn.Sequential(lin, bn1), random_input((5, 3))),
    ):
        folded, report = bnkit.fold(model.eval(), x)
        assert len(report.folded) == 1
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_fold_bad_input() -> None:
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        bnkit.fold("model", torch.zeros(1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fails on example_inputs"):
        bnkit.fold(nn.Sequential(nn.Linear(3, 2)), random_input((2, 5)))


def test_fold_error_of_a_model_drawing_random_numbers_is_the_fold_error() -> None:
    """fold's report compares the folded model with the original under one random state: a
    model that samples in eval (Informer's ProbSparse attention) gets float32 rounding as its
    error, not the difference of two draws."""

    class Sampled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            keep = torch.randint(0, x.shape[-1], (x.shape[-1],))
            return self.bn(self.conv(x))[..., keep]

    torch.manual_seed(0)
    m = Sampled()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
    folded, report = bnkit.fold(m.eval(), random_input((4, 3, 16)))
    assert report.max_rel_error < 1e-5, report
    assert not any(isinstance(x, nn.BatchNorm1d) for x in folded.modules())
