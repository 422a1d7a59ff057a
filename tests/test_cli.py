"""The bnkit console command."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import bnkit
from bnkit.cli import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert bnkit.__version__ in capsys.readouterr().out


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert "info" in capsys.readouterr().out


def test_unknown_argument_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--frobnicate"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --frobnicate" in capsys.readouterr().err


def test_console_script_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bnkit", "info"], capture_output=True, text=True, check=True
    )
    assert "torch" in out.stdout


def test_diagnose_batch_size_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["diagnose", "model.pt", "--batch-size", "-3"])
    assert exc.value.code == 2
    assert "--batch-size: expected a positive integer, got -3" in capsys.readouterr().err


def test_diagnose_data_error_names_every_form(tmp_path, capsys) -> None:
    model = tmp_path / "m.pt"
    torch.save(torch.nn.Sequential(torch.nn.BatchNorm1d(3)), model)
    assert main(["diagnose", str(model), "--trust", "--data", "bogus"]) == 2
    assert "'embedded', 'idx:DIR' or 'tensor:FILE.pt'" in capsys.readouterr().err


def test_info_lists_backends(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "plain: available" in out and "cpp:" in out


def test_conform_rank_the_class_refuses_is_a_usage_error(capsys) -> None:
    assert main(["conform", "torch.nn:BatchNorm2d", "--rank", "3"]) == 2
    assert "rank=3: BatchNorm2d does not run on 3D input" in capsys.readouterr().err


def test_plot_into_a_missing_directory_and_unimportable_target(tmp_path, capsys) -> None:
    sd = tmp_path / "sd.pt"
    torch.save(torch.nn.BatchNorm2d(3).state_dict(), sd)
    assert main(["inspect", str(sd), "--plot", str(tmp_path / "no" / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and ".tmp-" not in err
    assert main(["conform", "no_such_module_xyz:X"]) == 2
    assert "cannot import module 'no_such_module_xyz'" in capsys.readouterr().err
