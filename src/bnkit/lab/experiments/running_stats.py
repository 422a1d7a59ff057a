"""Running statistics: momentum 0.1, 0.01, None (cumulative) and bnkit.recalibrate."""

from __future__ import annotations

import copy
from typing import Any

import matplotlib.pyplot as plt
import torch
from torch import nn

from bnkit.lab import models
from bnkit.lab.context import Context, Section
from bnkit.lab.train import accuracy, fit
from bnkit.nn import is_batchnorm
from bnkit.tools.recalibrate import recalibrate
from bnkit.tools.watch import watch

NAME = "running_stats"
TITLE = "Running statistics: momentum, cumulative average and recalibration"
LR = 0.5
MOMENTA: list[float | None] = [0.1, 0.01, None]


def _bns(model: nn.Module) -> list[Any]:
    return [m for m in model.modules() if is_batchnorm(m)]


def _distance(model: nn.Module, x: torch.Tensor) -> float:
    """Mean over layers of the relative distance of (running mean, running var) to the
    exact population statistics of the training set for the current weights."""
    truth = copy.deepcopy(model)
    recalibrate(truth, [x[i : i + 500] for i in range(0, len(x), 500)], progress=False)
    dists = []
    for a, b in zip(_bns(model), _bns(truth), strict=True):
        dm = (a.running_mean - b.running_mean).norm() / (b.running_mean.norm() + 1e-12)
        dv = (a.running_var - b.running_var).norm() / (b.running_var.norm() + 1e-12)
        dists.append(float(dm + dv) / 2)
    return sum(dists) / len(dists)


def _measure(model: nn.Module, x: torch.Tensor, out: list[float], watched: Any) -> None:
    with watched.paused():  # recalibrate's forwards are not the training loop's
        out.append(_distance(model, x))


def run(ctx: Context) -> Section:
    x, y = ctx.train
    res: dict[str, dict[str, object]] = {}
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for momentum in MOMENTA:
        label = f"momentum={momentum}"
        torch.manual_seed(ctx.seed)
        model = models.mlp("bnkit", momentum=momentum)
        dist: list[float] = []
        every = max(1, ctx.epochs * (len(y) // ctx.batch_size) // 60)
        with watch(model, every=every, warn=False) as watched:
            fit(
                model,
                x,
                y,
                epochs=ctx.epochs,
                lr=LR,
                batch_size=ctx.batch_size,
                seed=ctx.seed,
                desc=f"mlp ({label})",
                progress=ctx.progress,
                on_epoch=lambda _e, m=model, d=dist, w=watched: _measure(m, x, d, w),
            )
        if momentum == MOMENTA[0]:  # each layer's running statistics over the steps
            layers_plot = "running_stats_layers.png"
            watched.history.plot(ctx.out / layers_plot, title=f"MLP, {label}: per layer")
        res[label] = {"distance_per_epoch": dist, "test_acc_eval": accuracy(model, *ctx.test)}
        ax.plot(range(1, len(dist) + 1), dist, marker="o", label=label)
        if momentum == 0.01:
            recal = copy.deepcopy(model)
            recalibrate(recal, [x[i : i + 500] for i in range(0, len(x), 500)], progress=False)
            res["momentum=0.01 + recalibrate"] = {
                "distance_per_epoch": [_distance(recal, x)],
                "test_acc_eval": accuracy(recal, *ctx.test),
            }
    ax.set(
        xlabel="epoch",
        ylabel="relative distance to population stats",
        yscale="log",
        title="running statistics vs the truth (MLP, 2 BatchNorm layers)",
    )
    ax.legend()
    plot = ctx.figure("running_stats_distance", fig)
    rows = [[k, v["distance_per_epoch"][-1], v["test_acc_eval"]] for k, v in res.items()]  # type: ignore[index]
    plain = {k: v for k, v in res.items() if "recalibrate" not in k}
    slow_key = max(plain, key=lambda k: plain[k]["distance_per_epoch"][-1])  # type: ignore[index]
    slow = res[slow_key]
    fixed = res["momentum=0.01 + recalibrate"]
    summary = (
        "Running statistics are estimates of a moving target: the weights change every step. "
        f"Of the three, {slow_key} ends furthest from the true population statistics "
        f"(distance {slow['distance_per_epoch'][-1]:.3f}, eval accuracy "  # type: ignore[index]
        f"{slow['test_acc_eval']:.1%}); bnkit.recalibrate sets the exact population "
        f"statistics (distance {fixed['distance_per_epoch'][-1]:.1e}, eval accuracy "  # type: ignore[index]
        f"{fixed['test_acc_eval']:.1%})."
    )
    return Section(
        NAME,
        TITLE,
        summary,
        {k: v for k, v in res.items()},
        [plot, layers_plot],
        [("At the end of training", ["statistics", "distance", "test acc (eval)"], rows)],
    )
