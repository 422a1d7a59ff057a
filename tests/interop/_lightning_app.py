"""A small LightningModule on the embedded MNIST subset, for tests/interop/test_lightning.py
(and its 2-process DDP run: ``python -m tests.interop._lightning_app DIR``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bnkit
from bnkit.lab.data import load

N_TRAIN = 512


def dataset() -> TensorDataset:
    data = load("embedded")
    return TensorDataset(data.train_x[:N_TRAIN], data.train_y[:N_TRAIN])


def loader(shuffle: bool = True) -> DataLoader[Any]:
    return DataLoader(dataset(), batch_size=64, shuffle=shuffle)


class Net(pl.LightningModule):
    def __init__(self, kind: str = "bnkit", lr: float = 0.05) -> None:
        super().__init__()
        bn2 = bnkit.BatchNorm2d if kind == "bnkit" else nn.BatchNorm2d
        bn1 = bnkit.BatchNorm1d if kind == "bnkit" else nn.BatchNorm1d
        self.features = nn.Sequential(nn.Conv2d(1, 6, 5, stride=2), bn2(6), nn.ReLU())
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(6 * 12 * 12, 32), bn1(32), nn.ReLU(), nn.Linear(32, 10)
        )
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def trainer(**kw: Any) -> pl.Trainer:
    opts: dict[str, Any] = {
        "max_epochs": 2,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    opts.update(kw)
    return pl.Trainer(**opts)


def buffers(m: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone()
        for k, v in m.state_dict().items()
        if k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }


class _Save(pl.Callback):
    """Each rank's BatchNorm buffers (and rank 0's weights) after PreciseBatchNorm."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank = trainer.global_rank
        torch.save(buffers(pl_module), self.out / f"rank{rank}.pt")
        # the batches this rank recalibrated with (its shard, as Lightning's sampler cut it)
        torch.save([b[0] for b in trainer.train_dataloader], self.out / f"batches{rank}.pt")
        if rank == 0:
            torch.save(pl_module.state_dict(), self.out / "weights.pt")


def ddp_main(out: Path) -> None:
    from bnkit.lightning import PreciseBatchNorm

    torch.manual_seed(0)
    t = trainer(
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        limit_val_batches=0,
        callbacks=[PreciseBatchNorm(), _Save(out)],
    )
    t.fit(Net(), loader(shuffle=False))


if __name__ == "__main__":
    # through the importable module, so that the spawned ranks unpickle its classes
    from tests.interop._lightning_app import ddp_main as run

    run(Path(sys.argv[1]))
