"""bnkit.conform: passes torch's and bnkit's BatchNorm, names each shipped mistake."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import bnkit
from bnkit.cli import main
from bnkit.lab.scratch import bad_backward, d2l, keras_momentum, per_element
from bnkit.tools.conform import PROBES


def _status(report: bnkit.tools.conform.ConformReport) -> dict[str, tuple[str, str]]:
    return {p.id: (p.status, p.diagnosis) for p in report.probes}


@pytest.mark.parametrize(
    "target", [bnkit.BatchNorm1d, bnkit.BatchNorm2d, bnkit.BatchNorm3d, nn.BatchNorm2d]
)
def test_correct_implementations_pass_everything(target) -> None:
    report = bnkit.conform(target)
    assert report.ok and not any(p.status == "skipped" for p in report.probes), report.table()
    assert [p.id for p in report.probes] == list(PROBES)


def test_d2l_grad_mode_switch_and_biased_running_var() -> None:
    s = _status(bnkit.conform(d2l.BatchNorm))
    assert s["grad_mode"][0] == "fail"
    assert "is_grad_enabled" in s["grad_mode"][1]
    assert "biased batch variance" in s["running_var_unbiased"][1]
    assert "uses the batch's" in s["eval_output"][1]
    assert s["counter"][0] == "skipped"  # said, never a silent pass
    assert s["train_output"][0] == "pass"


def test_keras_momentum_detected_then_rest_checked_converted() -> None:
    report = bnkit.conform(keras_momentum.KerasStyleBatchNorm)
    s = _status(report)
    assert report.momentum_convention == "keras"
    assert "Keras/TF style" in s["momentum_convention"][1]
    out = s["train_output"][1]
    assert "unbiased variance" in out and "eps added outside" in out
    assert s["running_var_unbiased"][0] == "pass"  # checked with converted momentum
    # told the convention up front, it does not count it as a failure
    told = _status(bnkit.conform(keras_momentum.KerasStyleBatchNorm, momentum_convention="keras"))
    assert told["momentum_convention"][0] == "pass"


def test_per_element_axes_and_zero_running_var_init() -> None:
    s = _status(bnkit.conform(per_element.PerElementBatchNorm2d))
    assert "running_var initialised to 0" in s["init"][1]
    assert "wrong reduction axes" in s["train_output"][1]
    assert "still updates" in s["eval_no_update"][1]


def test_bad_backward_is_caught() -> None:
    s = _status(bnkit.conform(bad_backward.BadBackwardBatchNorm))
    assert s["backward"][0] == "fail"
    assert all(v[0] == "pass" for k, v in s.items() if k != "backward")


class _OddNames(nn.Module):
    """Correct BatchNorm1d with names the checker cannot guess."""

    def __init__(self, c: int, momentum: float | None = 0.1) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mu", torch.zeros(c))
        self.register_buffer("sigma2", torch.ones(c))
        self.register_buffer("seen", torch.tensor(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.momentum
        if self.training:
            self.seen += 1
            f = 1 / float(self.seen) if f is None else f
        return bnkit.functional.batch_norm(
            x, self.mu, self.sigma2, training=self.training, momentum=f or 0.0
        )


def test_attribute_hints_and_unprobed_properties_are_reported() -> None:
    blind = _status(bnkit.conform(_OddNames))
    assert blind["init"][0] == "skipped"
    hinted = bnkit.conform(
        _OddNames,
        attrs={"running_mean": "mu", "running_var": "sigma2", "num_batches_tracked": "seen"},
    )
    assert hinted.ok and not any(p.status == "skipped" for p in hinted.probes), hinted.table()


def test_cli_exit_status_json_and_file_targets(tmp_path: Path, capsys) -> None:
    assert main(["conform", "bnkit.nn.batchnorm:BatchNorm2d"]) == 0
    assert "10 passed, 0 failed, 0 skipped" in capsys.readouterr().out
    assert main(["conform", "bnkit.lab.scratch.d2l:BatchNorm", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["found"]["running_mean"] == "moving_mean"
    path = Path(per_element.__file__)
    assert main(["conform", f"{path}:PerElementBatchNorm2d"]) == 1
    capsys.readouterr()
    assert main(["conform", "nope"]) == 2
    assert "expected MODULE:CLASS" in capsys.readouterr().err
    assert main(["conform", "bnkit:NoSuchThing"]) == 2
    assert "no attribute 'NoSuchThing'" in capsys.readouterr().err
    assert main(["conform", "bnkit:BatchNorm2d", "--attr", "oops"]) == 2
