"""What experiments share: data, settings, plotting, and models trained once."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn

from bnkit.lab import models
from bnkit.lab.data import Dataset
from bnkit.lab.train import History, fit

__all__ = ["Context", "Section"]


@dataclass
class Section:
    """One experiment's part of the report."""

    name: str
    title: str
    summary: str  # plain words: what it shows
    results: dict[str, Any] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)  # PNG file names in the output dir
    tables: list[tuple[str, list[str], list[list[Any]]]] = field(default_factory=list)
    available: bool = True


@dataclass
class Context:
    data: Dataset
    out: Path  # staging directory the plots are written to
    seed: int
    epochs: int
    quick: bool
    progress: bool = True
    batch_size: int = 64
    _cache: dict[str, tuple[nn.Module, History]] = field(default_factory=dict)

    @property
    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.quick:  # half the training set keeps --quick well under a minute
            n = min(2000, len(self.data.train_y))
            return self.data.train_x[:n], self.data.train_y[:n]
        return self.data.train_x, self.data.train_y

    @property
    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.test_x, self.data.test_y

    def trained(
        self, arch: str, kind: str, lr: float, **bn_kwargs: Any
    ) -> tuple[nn.Module, History]:
        """Train ``arch`` ("mlp"/"lenet") with BatchNorm ``kind`` once; later calls reuse it.

        Returns a deep copy, so an experiment may change the model freely.
        """
        key = f"{arch}/{kind}/{lr}/{sorted(bn_kwargs.items())}"
        if key not in self._cache:
            torch.manual_seed(self.seed)
            model = getattr(models, arch)(kind, **bn_kwargs)
            hist = fit(
                model,
                *self.train,
                epochs=self.epochs,
                lr=lr,
                batch_size=self.batch_size,
                seed=self.seed,
                test=self.test,
                desc=f"{arch} ({kind} BN)",
                progress=self.progress,
            )
            self._cache[key] = (model, hist)
        model, hist = self._cache[key]
        return copy.deepcopy(model), hist

    def figure(self, name: str, fig: Any) -> str:
        """Save a matplotlib figure as ``name``.png in the output dir; returns the file name."""
        fname = f"{name}.png"
        fig.savefig(self.out / fname, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return fname


def smooth(values: list[float], k: int = 5) -> list[float]:
    """Running mean over ``k`` steps, for readable loss curves."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out
