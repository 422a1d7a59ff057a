"""fold by the recorded data flow, where torch.fx cannot trace: synthetic modules for each
rule (and each refusal), Hugging Face transformers' vision models built from small configs,
and the ``bnkit fold`` command."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import bnkit


def _randomize(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters (a fresh BatchNorm is the
    identity in eval mode, which would fold into anything)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if bnkit.nn.is_batchnorm(m):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(c, generator=g) - 0.5)
    return model.eval()


class SamePadConv(nn.Module):
    """Conv -> BN -> ReLU with TF-style "same" padding computed from the input's shape and
    a data-dependent branch: fx cannot trace it."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=2)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pad_h, pad_w = max(3 - 2 + (h % 2 == 0), 0), max(3 - 2 + (w % 2 == 0), 0)
        x = nn.functional.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        if float(x.abs().sum()) < 0:  # data-dependent control flow
            x = -x
        return torch.relu(self.bn(self.conv(x)))


class LinearFlattenBN(nn.Module):
    """LeViT's MLPLayerWithBN: Linear over (B, N, C), BatchNorm1d over the flattened tokens,
    reshaped back; with a data-dependent branch."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.linear = nn.Linear(c, c, bias=False)
        self.bn = nn.BatchNorm1d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) != float(x.sum()):
            return x
        h = self.linear(x)
        return self.bn(h.flatten(0, 1)).reshape_as(h)


class UsedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) != float(x.sum()):
            return x
        y = self.conv(x)
        return self.bn(y) + y  # the conv's output is used by the add too


class ChannelMix(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) != float(x.sum()):
            return x
        y = self.linear(x).reshape(x.shape[0], 2, 4)  # BN channel 0 = features 0..3
        return self.bn(y)


class BNThenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(6)
        self.linear = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) != float(x.sum()):
            return x
        return self.linear(self.bn(x))


def _fold(model: nn.Module, x: torch.Tensor) -> Any:
    model = _randomize(model)
    want = model(x)
    folded, report = bnkit.fold(model, x)
    torch.testing.assert_close(folded(x), want, rtol=1e-5, atol=1e-5)
    return folded, report


def test_a_conv_in_an_untraceable_module_folds_by_data_flow() -> None:
    model = nn.Sequential(SamePadConv(3, 8), SamePadConv(8, 4))
    folded, report = _fold(model, torch.randn(2, 3, 17, 16))
    assert report.folded == ["0.bn", "1.bn"]
    assert [f.into for f in report.layers] == ["0.conv", "1.conv"]
    assert not any(bnkit.nn.is_batchnorm(m) for m in folded.modules())


def test_a_linear_through_flatten_folds() -> None:
    model = nn.Sequential(LinearFlattenBN(5), LinearFlattenBN(5))
    _, report = _fold(model, torch.randn(3, 7, 5) + 1)
    assert report.folded == ["0.bn", "1.bn"] and report.layers[0].position == "after"


def test_an_output_used_elsewhere_is_not_folded() -> None:
    _, report = _fold(nn.Sequential(UsedTwice()), torch.randn(2, 3, 5, 5))
    assert report.folded == []
    assert "the output of 0.conv is used elsewhere too" in report.not_folded["0.bn"]


def test_shape_ops_that_mix_channels_are_refused() -> None:
    _, report = _fold(nn.Sequential(ChannelMix()), torch.randn(4, 6))
    assert report.folded == []
    assert "do not keep each of its channels" in report.not_folded["0.bn"]


def test_a_batchnorm_before_a_linear_folds_before_it() -> None:
    _, report = _fold(nn.Sequential(BNThenLinear()), torch.randn(4, 6) * 2 + 1)
    assert report.folded == ["0.bn"]
    assert report.layers[0].into == "0.linear" and report.layers[0].position == "before"


def _hf_models() -> dict[str, tuple[Any, tuple[int, ...]]]:
    tf = pytest.importorskip("transformers")
    return {
        "MobileNetV1": (
            lambda: tf.MobileNetV1Model(tf.MobileNetV1Config(depth_multiplier=0.25, image_size=64)),
            (1, 3, 64, 64),
        ),
        "MobileNetV2": (
            lambda: tf.MobileNetV2Model(tf.MobileNetV2Config(depth_multiplier=0.35, image_size=64)),
            (1, 3, 64, 64),
        ),
        "LeViT": (
            lambda: tf.LevitModel(
                tf.LevitConfig(
                    image_size=64,
                    hidden_sizes=[32, 48, 64],
                    num_attention_heads=[1, 2, 2],
                    depths=[1, 1, 1],
                    key_dim=[8, 8, 8],
                    mlp_ratio=[2, 2, 2],
                    attention_ratio=[2, 2, 2],
                )
            ),
            (2, 3, 64, 64),
        ),
        "Segformer": (
            lambda: tf.SegformerForSemanticSegmentation(
                tf.SegformerConfig(
                    hidden_sizes=[8, 16, 24, 32],
                    num_attention_heads=[1, 1, 1, 1],
                    depths=[1, 1, 1, 1],
                    decoder_hidden_size=32,
                )
            ),
            (1, 3, 64, 64),
        ),
        "EfficientNet": (
            lambda: tf.EfficientNetModel(
                tf.EfficientNetConfig(
                    width_coefficient=0.25, depth_coefficient=0.25, image_size=64, hidden_dim=320
                )
            ),
            (1, 3, 64, 64),
        ),
    }


@pytest.mark.parametrize(
    "name", ["MobileNetV1", "MobileNetV2", "LeViT", "Segformer", "EfficientNet"]
)
def test_transformers_vision_models_fold_every_batchnorm(name: str) -> None:
    make, shape = _hf_models()[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _randomize(make())
    x = torch.randn(shape)
    folded, report = bnkit.fold(model, x)
    assert report.layers and report.not_folded == {}, str(report)
    assert report.max_rel_error < 1e-5
    assert not any(bnkit.nn.is_batchnorm(m) for m in folded.modules())


def test_the_fold_command_writes_the_folded_model(tmp_path: Path) -> None:
    model = _randomize(nn.Sequential(SamePadConv(3, 4), nn.Flatten(), nn.LazyLinear(2)))
    x = torch.randn(1, 3, 16, 16)
    want = model(x)
    torch.save(model, tmp_path / "m.pt")
    cmd = [sys.executable, "-m", "bnkit", "fold", str(tmp_path / "m.pt"), "--out"]
    run = subprocess.run(
        [*cmd, str(tmp_path / "f.pt"), "--input", "1,3,16,16", "--trust"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "folded 1 of 1 BatchNorm layer(s)" in run.stdout
    folded = torch.load(tmp_path / "f.pt", weights_only=False)
    torch.testing.assert_close(folded(x), want, rtol=1e-5, atol=1e-5)
    refused = subprocess.run(
        [*cmd, str(tmp_path / "g.pt"), "--input", "1,3,16,16"], capture_output=True, text=True
    )
    assert refused.returncode == 2 and "--trust" in refused.stderr
    assert not (tmp_path / "g.pt").exists()
    bad = subprocess.run(
        [*cmd, str(tmp_path / "g.pt"), "--input", "x", "--trust"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--input 'x'" in bad.stderr
