"""fold and diagnose on real model code that installs without torchvision (MONAI's
networks, efficientnet_pytorch), against torch's own fx fuser
(``torch.fx.experimental.optimization.fuse``) on the same models.

Per model: bnkit folds at least as many BatchNorms as torch's fuser, strictly more where
the whole model cannot be traced; every BatchNorm left has a reason; the folded model
matches the original to float rounding; fold takes seconds; diagnose finds no error on
the correctly used (eval-mode) model."""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable

import monai.networks.nets as mn
import pytest
import torch
from efficientnet_pytorch import EfficientNet
from torch import nn

import bnkit

ZOO: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "monai-resnet18": (
        lambda: mn.resnet18(spatial_dims=2, n_input_channels=3, num_classes=4),
        (2, 3, 64, 64),
    ),
    "monai-densenet121": (
        lambda: mn.DenseNet121(spatial_dims=2, in_channels=3, out_channels=4),
        (2, 3, 64, 64),
    ),
    "monai-efficientnet-b0": (
        lambda: mn.EfficientNetBN(
            "efficientnet-b0", pretrained=False, spatial_dims=2, in_channels=3, num_classes=4
        ),
        (2, 3, 64, 64),
    ),
    "monai-unet": (
        lambda: mn.UNet(2, 1, 2, channels=(8, 16, 32), strides=(2, 2), norm="batch"),
        (2, 1, 32, 32),
    ),
    "monai-attention-unet": (
        lambda: mn.AttentionUnet(2, 1, 2, channels=(8, 16, 32), strides=(2, 2)),
        (2, 1, 32, 32),
    ),
    "monai-basicunet": (
        lambda: mn.BasicUNet(2, 1, 2, features=(8, 8, 16, 32, 64, 8), norm="batch"),
        (2, 1, 32, 32),
    ),
    "monai-dynunet": (
        lambda: mn.DynUNet(2, 1, 2, [3, 3, 3], [1, 2, 2], [2, 2], norm_name="batch"),
        (2, 1, 32, 32),
    ),
    "monai-segresnet": (
        lambda: mn.SegResNet(2, init_filters=8, in_channels=1, out_channels=2, norm="batch"),
        (2, 1, 32, 32),
    ),
    "monai-vnet-3d": (lambda: mn.VNet(3, 1, 2), (2, 1, 32, 32, 32)),
    "monai-highresnet-3d": (lambda: mn.HighResNet(3, 1, 2), (2, 1, 16, 16, 16)),
    "efficientnet_pytorch-b0-static": (
        lambda: EfficientNet.from_name("efficientnet-b0", image_size=64),
        (2, 3, 64, 64),
    ),
    "efficientnet_pytorch-b0-dynamic": (
        lambda: EfficientNet.from_name("efficientnet-b0"),
        (2, 3, 64, 64),
    ),
}


def _bns(m: nn.Module) -> int:
    return sum(bnkit.nn.is_batchnorm(x) for x in m.modules())


def _torch_fuser_count(model: nn.Module) -> tuple[int, bool]:
    from torch.fx.experimental.optimization import fuse

    try:
        fused = fuse(copy.deepcopy(model))
    except Exception:  # the whole model cannot be traced: torch's fuser folds nothing
        return 0, False
    return _bns(model) - _bns(fused), True


def _trained(name: str) -> tuple[nn.Module, torch.Tensor]:
    make, shape = ZOO[name]
    torch.manual_seed(0)
    model = make()
    with torch.no_grad():
        for m in model.modules():
            if bnkit.nn.is_batchnorm(m) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        g = torch.Generator().manual_seed(1)
        for _ in range(2):
            model(torch.randn(shape, generator=g) * 2 + 1)
    return model.eval(), torch.randn(shape, generator=g) * 2 + 1


@pytest.mark.parametrize("name", list(ZOO))
def test_fold_and_diagnose_on_real_models(name: str) -> None:
    model, x = _trained(name)
    total = _bns(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, whole_traceable = _torch_fuser_count(model)
        t0 = time.perf_counter()
        folded, report = bnkit.fold(model, x)
        seconds = time.perf_counter() - t0
    ours = len(report.folded)
    print(f"{name}: {total} BatchNorms, bnkit folds {ours}, torch's fuser {theirs}")
    assert len(report.layers) == total  # every BatchNorm is reported
    assert ours >= theirs
    if not whole_traceable:
        assert ours > theirs
    assert all(reason for reason in report.not_folded.values())
    assert _bns(folded) == total - ours
    assert report.max_rel_error < 1e-4, report
    assert seconds < 60
    findings = bnkit.diagnose(model, x)
    assert not [f for f in findings if f.severity == "error"], findings


def test_efficientnet_b0_folds_all_49_through_conv_subclasses() -> None:
    model, x = _trained("efficientnet_pytorch-b0-static")
    folded, report = bnkit.fold(model, x)
    assert len(report.folded) == 49 and report.max_rel_error < 1e-5
    kinds = {type(folded.get_submodule(f.into)).__name__ for f in report.layers if f.into}
    assert "Conv2dStaticSamePadding" in kinds


class _Standardized(nn.Conv2d):
    """Weight standardization: not linear in its weight, so not foldable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


def test_conv_subclass_that_is_not_linear_in_its_weight_is_left_alone() -> None:
    model = nn.Sequential(_Standardized(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    x = torch.randn(2, 3, 8, 8)
    model.train()(x * 2 + 1)
    model.eval()
    folded, report = bnkit.fold(model, x)
    assert report.folded == []
    assert "not linear in its weight and bias" in report.not_folded["1"]
    torch.testing.assert_close(folded(x), model(x))


class _Untraceable(nn.Module):
    """A block whose forward branches on a tensor value: fx cannot trace it whole."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        if float(y.mean()) > -1e9:  # data-dependent control flow
            y = self.b(y)
        return y


def test_untraceable_model_folds_inside_its_traceable_parts() -> None:
    model = _Untraceable()
    x = torch.randn(2, 3, 8, 8)
    model.train()(x)
    model.eval()
    folded, report = bnkit.fold(model, x)
    assert not report.traced and sorted(report.folded) == ["a.1", "b.1"]
    assert sorted(report.subgraphs) == ["a", "b"]
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


class _BatchSizeRounding(nn.Module):
    """Emulates what oneDNN does: another algorithm (here: another rounding) when the
    batch size changes; the difference is float32 rounding, gone in float64."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 1e4) - 1e4 if x.shape[0] > 1 else x


def test_diagnose_tells_float_noise_from_batch_mixing() -> None:
    noisy = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), _BatchSizeRounding(), nn.Tanh())
    noisy.train()(torch.randn(8, 3, 8, 8))
    noisy.eval()
    x = torch.randn(4, 3, 8, 8) * 3
    with torch.no_grad():  # in float32 the noise is well above 1e-4 relative
        full, one = noisy(x), noisy(x[:1])
        assert ((full[:1] - one).abs().max() / full.abs().max()).item() > 1e-4
    assert not [f for f in bnkit.diagnose(noisy, x) if f.severity == "error"]
    noisy.train()  # real misuse is still caught
    kinds = [f.kind for f in bnkit.diagnose(noisy, x, audit_steps=0)]
    assert "inference in training mode" in kinds


@pytest.mark.parametrize("name", ["monai-resnet18", "monai-segresnet", "monai-densenet121"])
def test_fuse_activations_on_real_models(name: str) -> None:
    """The fused model computes the converted model, outputs and gradients, training mode."""
    make, shape = ZOO[name]
    torch.manual_seed(0)
    ref = make().train()
    x = torch.randn(shape) * 2 + 1
    unfused = bnkit.convert(copy.deepcopy(ref), to="bnkit")
    fused = bnkit.fuse_activations(copy.deepcopy(ref), x)
    assert bnkit.fused_sites(fused)
    ya, yb = unfused(x), fused(x)
    torch.testing.assert_close(yb, ya, rtol=1e-6, atol=1e-6)
    ya.square().mean().backward()
    yb.square().mean().backward()
    grads = dict(fused.named_parameters())
    for k, p in unfused.named_parameters():
        torch.testing.assert_close(grads[k].grad, p.grad, rtol=1e-4, atol=1e-6)


def test_fuse_activations_refuses_a_trace_that_is_not_the_model() -> None:
    """torch.fx traces MONAI's BasicUNet into a graph that fails on the input (torch's own
    symbolic_trace too): a clear error naming the model, not a broken GraphModule."""
    make, shape = ZOO["monai-basicunet"]
    with pytest.raises(ValueError, match="trace of BasicUNet is not the model"):
        bnkit.fuse_activations(make(), torch.randn(shape))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_converted_training_step_matches_float64_at_full_resolution(channels_last: bool) -> None:
    """A training step of MONAI's BasicUNet through ``convert`` at 96x96: its first
    BatchNorms have NCHW runs long enough for the kernel that sums and writes each block of
    channels in one sweep, and channels_last rows that take the four-row output loop. The
    output, input gradient, parameter gradients and running statistics are no further from
    the float64 model than torch's own float32 layer's."""
    torch.manual_seed(0)
    ref = mn.BasicUNet(2, 1, 2, features=(8, 8, 16, 32, 64, 8), norm="batch").train()
    x = torch.randn(2, 1, 96, 96) * 2 + 1
    models = {
        "torch": ref,
        "bnkit": bnkit.convert(copy.deepcopy(ref), to="bnkit"),
        "f64": copy.deepcopy(ref).double(),
    }
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = {}
    for name, m in models.items():
        m = m.to(memory_format=fmt)
        xi = x.to(next(m.parameters()).dtype, copy=True).contiguous(memory_format=fmt)
        xi.requires_grad_()
        y = m(xi)
        y.square().mean().backward()
        out[name] = [y, xi.grad, *(p.grad for p in m.parameters()), *m.buffers()]

    def err(k: str) -> float:
        return max(
            ((a.double() - b).abs().max() / (1 + b.abs().max())).item()
            for a, b in zip(out[k], out["f64"], strict=True)
        )

    assert err("bnkit") <= 2 * err("torch") + 1e-6, (err("bnkit"), err("torch"))
