"""bnkit.lightning's callbacks in real Lightning fits on the CPU (the embedded MNIST
subset, a small CNN): BatchNormMonitor to TensorBoard and through rank-zero warnings,
PreciseBatchNorm's exact statistics (after SWA, and global under 2-process DDP),
FreezeBatchNorm beside BaseFinetuning."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

import bnkit  # noqa: E402
from bnkit.lightning import BatchNormMonitor, FreezeBatchNorm, PreciseBatchNorm  # noqa: E402
from tests.interop._lightning_app import Net, buffers, loader, trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _ours(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "bnkit.watch" in str(w.message)]


def test_monitor_logs_to_tensorboard_and_a_correct_fit_is_silent(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    monitor = BatchNormMonitor(every=2)
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(logger=logger, callbacks=[monitor], limit_val_batches=2).fit(
            Net(), loader(), loader(shuffle=False)
        )
    assert _ours(caught) == []
    assert monitor.history is not None
    steps = sorted({r.step for r in monitor.history.records})
    assert steps and all(s % 2 == 0 for s in steps)  # global steps, every 2
    assert {r.layer for r in monitor.history.records} == {"features.1", "head.2"}
    acc = EventAccumulator(str(tmp_path / "run" / "version_0"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "batchnorm/features.1/running_mean" in tags and "batchnorm/head.2/gap" in tags
    logged = [e.step for e in acc.Scalars("batchnorm/features.1/running_var")]
    assert logged == steps


class _FrozenBackbone(Net):
    """The classic mistake: the backbone's BatchNorm "frozen" with requires_grad_(False),
    while Lightning puts the model in training mode every epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.features[1].requires_grad_(False)


def test_monitor_warns_through_lightning_on_the_frozen_backbone() -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(callbacks=[BatchNormMonitor(every=5)], limit_val_batches=0).fit(
            _FrozenBackbone(), loader()
        )
    said = _ours(caught)
    assert len(said) == 1 and "features.1 (frozen parameters, moving statistics)" in said[0]


def _exact(model: torch.nn.Module, data: Any = None) -> dict[str, torch.Tensor]:
    """recalibrate on a copy, over the same batches (a deeper layer's population depends
    on how the data was batched: the layers before it normalize with batch statistics)."""
    ref = copy.deepcopy(model)
    bnkit.recalibrate(ref, data if data is not None else loader(shuffle=False), progress=False)
    return buffers(ref)


def _assert_stats(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for k, v in want.items():
        if k.endswith("num_batches_tracked"):
            continue
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_precise_batchnorm_sets_the_population_statistics_at_the_end() -> None:
    torch.manual_seed(0)
    model = Net()
    cb = PreciseBatchNorm()
    trainer(callbacks=[cb], limit_val_batches=0).fit(model, loader(shuffle=False))
    assert set(cb.counts) == {"features.1", "head.2"}
    assert cb.counts["head.2"] == 512
    _assert_stats(buffers(model), _exact(model))


def test_precise_batchnorm_every_epoch_and_after_swa() -> None:
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    torch.manual_seed(0)
    model = Net()
    calls: list[int] = []

    class Count(PreciseBatchNorm):
        def _run(self, trainer: Any, pl_module: Any) -> None:
            calls.append(trainer.current_epoch)
            super()._run(trainer, pl_module)

    swa = StochasticWeightAveraging(swa_lrs=0.02, swa_epoch_start=1)
    trainer(max_epochs=3, callbacks=[swa, Count(every_n_epochs=1)], limit_val_batches=0).fit(
        model, loader(shuffle=False)
    )
    assert len(calls) >= 4  # after each of the 3 epochs, and at the end of fit
    _assert_stats(buffers(model), _exact(model))  # the averaged weights' statistics


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_precise_batchnorm_under_ddp_gives_the_global_statistics_on_every_rank(
    tmp_path: Path,
) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "src")]))
    run = subprocess.run(
        [sys.executable, "-m", "tests.interop._lightning_app", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # equal on both ranks
    model = Net()
    model.load_state_dict(torch.load(tmp_path / "weights.pt"))
    shards = torch.load(tmp_path / "batches0.pt") + torch.load(tmp_path / "batches1.pt")
    assert sum(len(b) for b in shards) == 512  # two disjoint halves
    _assert_stats(r0, _exact(model, shards))  # the whole data's, not one shard's


class _Unfreeze(pl.callbacks.BaseFinetuning):  # type: ignore[misc,name-defined]
    """Freezes the backbone, then unfreezes it (BatchNorm included) at epoch 1."""

    def freeze_before_training(self, pl_module: Any) -> None:
        self.freeze(pl_module.features, train_bn=True)

    def finetune_function(self, pl_module: Any, epoch: int, optimizer: Any) -> None:
        if epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.features, optimizer, train_bn=True)


@pytest.mark.parametrize("with_finetuning", [False, True])
def test_freeze_batchnorm_keeps_the_layer_bit_identical(with_finetuning: bool) -> None:
    torch.manual_seed(0)
    model = Net()
    bn = model.features[1]
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    cbs: list[Any] = [FreezeBatchNorm(layers="features.1")]
    if with_finetuning:
        cbs.append(_Unfreeze())
    conv_before = model.features[0].weight.detach().clone()
    trainer(max_epochs=3, callbacks=cbs, limit_val_batches=2).fit(
        model, loader(), loader(shuffle=False)
    )
    after = bn.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    other = model.head[2]
    assert int(other.num_batches_tracked) > 0  # the other BatchNorm trained
    if with_finetuning:  # the backbone's conv was unfrozen and trained
        assert not torch.equal(model.features[0].weight, conv_before)
