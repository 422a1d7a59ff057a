"""bnkit inspect on checkpoints written here, including corrupt and pickled-model ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from bnkit.cli import main
from bnkit.tools import checkpoints as bni
from tests.conftest import random_input
from tests.models import SmallResNet


def _trained(seed: int = 0) -> SmallResNet:
    torch.manual_seed(seed)
    m = SmallResNet()
    for s in range(2):
        m(random_input((8, 1, 16, 16), seed=s + seed))
    return m


def test_table_flags_and_formats(tmp_path: Path, capsys) -> None:
    model = _trained()
    with torch.no_grad():
        model.layer1.bn1.running_var[0] = float("nan")
        model.layer2.bn2.weight[:2] = 0.0
        model.layer1.bn2.running_var[1] = 1e-12
        model.layer2.short[1].reset_running_stats()
    sd_path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), sd_path)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"epoch": 3, "model": model.state_dict(), "optimizer": {}}, wrapped)
    for path in (sd_path, wrapped):
        assert main(["inspect", str(path), "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        layers = {row["name"]: row for row in data["layers"]}
        assert len(layers) == 7
        assert "NaN/Inf" in layers["layer1.bn1"]["flags"]
        assert any("dead channels" in f for f in layers["layer2.bn2"]["flags"])
        assert any("near-zero variance" in f for f in layers["layer1.bn2"]["flags"])
        assert any("initial values" in f for f in layers["layer2.short.1"]["flags"])
        assert layers["stem.1"]["flags"] == [] and layers["stem.1"]["num_batches_tracked"] == 2
        torch.testing.assert_close(
            torch.tensor(layers["stem.1"]["mean_mean"], dtype=torch.float64),
            model.stem[1].running_mean.double().mean(),
        )
    assert main(["inspect", str(sd_path)]) == 0
    out = capsys.readouterr().out
    assert "7 BatchNorm layer(s), 4 flagged" in out


def test_plot_is_a_real_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "m.pt"
    torch.save(_trained().state_dict(), path)
    png = tmp_path / "depth.png"
    assert main(["inspect", str(path), "--plot", str(png)]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 400 and height > 400
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_compare_shows_what_moved(tmp_path: Path, capsys) -> None:
    a, b = _trained(), _trained()
    b.train()
    b.head(torch.randn(8, 16 * 8 * 8) + 3)  # only the head's BN moves
    pa, pb = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(a.state_dict(), pa)
    torch.save(b.state_dict(), pb)
    assert main(["inspect", str(pa), "--compare", str(pb), "--json"]) == 0
    rows = {r["layer"]: r for r in json.loads(capsys.readouterr().out)["compare"]}
    assert rows["head.2"]["running_mean"] > 0.01 and rows["head.2"]["num_batches_tracked"] == 1
    assert rows["stem.1"]["running_mean"] == 0.0 and rows["stem.1"]["num_batches_tracked"] == 0


def test_whole_model_needs_trust(tmp_path: Path, capsys) -> None:
    path = tmp_path / "whole.pt"
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, momentum=0.99))
    torch.save(model, path)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "pickled Python objects" in err and "--trust" in err
    assert main(["inspect", str(path), "--trust", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert any("momentum 0.99" in f for f in data["layers"][0]["flags"])


def test_missing_corrupt_and_empty(tmp_path: Path, capsys) -> None:
    assert main(["inspect", str(tmp_path / "nope.pt")]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    torch.save(_trained().state_dict(), bad)
    bad.write_bytes(bad.read_bytes()[:200])
    assert main(["inspect", str(bad)]) == 2
    assert "corrupt or not a torch file" in capsys.readouterr().err
    text = tmp_path / "notes.pt"  # not a torch file at all: broken, not "needs --trust"
    text.write_text("garbage\n")
    assert main(["inspect", str(text)]) == 2
    err = capsys.readouterr().err
    assert "corrupt or not a torch file" in err and "--trust" not in err
    nobn = tmp_path / "nobn.pt"
    torch.save(nn.Linear(2, 2).state_dict(), nobn)
    assert main(["inspect", str(nobn)]) == 2
    assert "no BatchNorm layer" in capsys.readouterr().err
    other = tmp_path / "other.pt"
    torch.save({"a": 1}, other)
    with pytest.raises(ValueError, match="no state_dict found"):
        bni.find_state_dict(bni.load_checkpoint(other))


def test_corrupt_files_and_directories_are_one_line_errors(tmp_path: Path, capsys) -> None:
    """Every one-byte variation of a tiny file, and a directory: exit 2 with one line."""
    for b in range(256):
        p = tmp_path / f"f{b}.pt"
        p.write_bytes(bytes([b]) + b"ello world")
        assert main(["inspect", str(p)]) == 2, b
        err = capsys.readouterr().err.strip()
        assert err.startswith("bnkit inspect: error:") and "\n" not in err, (b, err)
    assert main(["inspect", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_pruned_and_parametrized_layers_in_a_checkpoint() -> None:
    # torch.nn.utils.prune stores weight_orig and weight_mask, parametrize the original
    # under parametrizations.weight.original: the summary shows the pruned weight as the
    # model uses it, and flags both
    import torch.nn.utils.parametrize as parametrize
    import torch.nn.utils.prune as prune

    class Double(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    )
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([0.5, 2.0, 0.1, 3.0]))
    net(random_input((4, 3, 8, 8)))
    prune.l1_unstructured(net[1], "weight", amount=0.5)
    parametrize.register_parametrization(net[3], "weight", Double())
    stats = {s.name: s for s in bni.summarize(net.state_dict())}
    assert stats["1"].weight_mean == pytest.approx((2.0 + 3.0) / 4)
    assert "weight pruned (2 of 4 kept)" in stats["1"].flags
    assert stats["3"].weight_mean is None
    assert any("parametrized" in f for f in stats["3"].flags)
