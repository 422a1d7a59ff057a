"""bnkit.diagnose: each finding built deliberately, naming the right layer; healthy = none."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bnkit
from bnkit.cli import main
from tests.conftest import random_input


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )


def _healthy() -> tuple[nn.Sequential, torch.Tensor]:
    model = _net()
    data = [random_input((16, 1, 8, 8), seed=s) for s in range(8)]
    bnkit.recalibrate(model, data, progress=False)
    return model.eval(), random_input((32, 1, 8, 8), seed=100)


def test_healthy_model_has_no_findings() -> None:
    model, batch = _healthy()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert bnkit.diagnose(model, batch) == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])  # the model itself never ran


def test_forgotten_eval_names_first_batchnorm() -> None:
    model, batch = _healthy()
    model.train()
    findings = bnkit.diagnose(model, batch, audit_steps=0)
    inf = [f for f in findings if f.kind == "inference in training mode"]
    assert len(inf) == 1 and inf[0].layer == "1" and "model.eval()" in inf[0].fix


def test_train_mode_bn1d_single_sample_fails_and_is_named() -> None:
    model, batch = _healthy()
    model[5].train()  # only the BatchNorm1d left in training mode
    findings = bnkit.diagnose(model, batch, audit_steps=0)
    assert findings[0].layer == "5" and "single sample fails" in findings[0].evidence


def test_batch_mixing_module_other_than_bn() -> None:
    class MeanCentre(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x - x.mean(0, keepdim=True)

    model, batch = _healthy()
    model.insert(3, MeanCentre())
    findings = bnkit.diagnose(model, batch)
    assert findings[0].kind == "output depends on the batch" and findings[0].layer == "3"


def test_train_eval_gap_names_first_diverging_layer() -> None:
    model, batch = _healthy()
    with torch.no_grad():
        model[5].running_var.mul_(25.0)  # stale statistics in the second BN only
    findings = bnkit.diagnose(model, batch)
    gap = [f for f in findings if f.kind == "train/eval gap"]
    assert len(gap) == 1 and gap[0].layer == "5" and "recalibrate" in gap[0].fix


def test_domain_shift_shows_at_first_layer() -> None:
    model, _ = _healthy()
    shifted = random_input((32, 1, 8, 8), seed=5) * 10 + 20
    gap = [f for f in bnkit.diagnose(model, shifted) if f.kind == "train/eval gap"]
    assert gap and gap[0].layer == "1"


def test_nonfinite_and_keras_momentum() -> None:
    model, batch = _healthy()
    with torch.no_grad():
        model[1].running_mean[0] = float("nan")
    model[5].momentum = 0.99
    kinds = {(f.kind, f.layer) for f in bnkit.diagnose(model, batch)}
    assert ("non-finite running statistics", "1") in kinds
    assert ("Keras-looking momentum", "5") in kinds


def test_last_batch_of_one() -> None:
    model, batch = _healthy()
    ds = TensorDataset(torch.zeros(33, 1, 8, 8))
    findings = bnkit.diagnose(model, batch, loader=DataLoader(ds, batch_size=16))
    one = [f for f in findings if f.kind == "one value per channel"]
    assert len(one) == 1 and one[0].layer == "5"  # BatchNorm1d; BatchNorm2d sees 6x6 values
    assert bnkit.diagnose(model, batch, loader=DataLoader(ds, batch_size=16, drop_last=True)) == []
    per_rank = bnkit.diagnose(model, batch, dataset_len=65, batch_size=16, world_size=2)
    assert any(f.kind == "one value per channel" and "per rank" in f.evidence for f in per_rank)


def test_frozen_parameters_with_moving_statistics() -> None:
    model, batch = _healthy()
    model[:3].requires_grad_(False)  # conv + its BN "frozen" the naive way
    found = [f for f in bnkit.diagnose(model, batch) if f.kind.startswith("statistics move")]
    assert len(found) == 1 and found[0].layer == "1" and "bnkit.freeze" in found[0].fix
    bnkit.freeze(model, layers="1")
    assert not [f for f in bnkit.diagnose(model, batch) if f.kind.startswith("statistics move")]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        bnkit.diagnose(nn.Linear(2, 2), torch.randn(4, 2))
    with pytest.raises(ValueError, match="at least 2 samples"):
        bnkit.diagnose(_net(), torch.randn(1, 1, 8, 8))


def test_cli_diagnose(tmp_path: Path, capsys) -> None:
    model, batch = _healthy()
    model.train()
    mpath, bpath = tmp_path / "model.pt", tmp_path / "batch.pt"
    torch.save(model, mpath)
    torch.save(batch, bpath)
    assert main(["diagnose", str(mpath), "--data", f"tensor:{bpath}"]) == 2
    assert "--trust" in capsys.readouterr().err
    assert main(["diagnose", str(mpath), "--trust", "--data", f"tensor:{bpath}"]) == 1
    assert "inference in training mode at 1" in capsys.readouterr().out


def test_non_finite_batch_is_named_as_such() -> None:
    model, batch = _healthy()
    batch = batch.clone()
    batch[3, 0, 2, 2] = float("nan")
    findings = bnkit.diagnose(model, batch)
    kinds = [f.kind for f in findings]
    assert "non-finite input" in kinds, kinds
    f = findings[kinds.index("non-finite input")]
    assert f.layer == "1" and "inf/NaN value(s)" in f.evidence
    assert not any("x the running variance" in g.evidence for g in findings)


class _SampledAttention(nn.Module):
    """Draws random numbers in eval, per position and not per sample (as Informer's
    ProbSparse attention samples its keys): each sample's output does not depend on the
    batch, given the same draws."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = torch.randint(0, x.shape[-1], (x.shape[-1],))
        return x + x[..., keep]


def test_a_model_drawing_random_numbers_in_eval_is_compared_under_one_seed() -> None:
    model, batch = _healthy()
    model = nn.Sequential(model, _SampledAttention()).eval()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    assert bnkit.diagnose(model, batch, audit_steps=0) == []
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is kept
    # the check still sees a layer that really mixes the batch
    model[0][1].train()
    kinds = [f.kind for f in bnkit.diagnose(model, batch, audit_steps=0)]
    assert "output depends on the batch" in kinds or "inference in training mode" in kinds
