"""Training throughput, measured as a benchmark: one LeNet SGD step with bnkit's fast path,
bnkit's plain path, torch's BatchNorm, and Dive into Deep Learning's from-scratch
BatchNorm, timed in turn."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import bnkit.nn
from bnkit.lab import models
from bnkit.lab.context import Context, Section
from bnkit.lab.scratch import d2l
from bnkit.lab.timing import interleaved_times

NAME = "throughput"
TITLE = "Training throughput: bnkit, torch and a from-scratch BatchNorm, timed in turn"
BATCH = 256  # Dive into Deep Learning's LeNet batch size


def d2l_lenet() -> nn.Sequential:
    """LeNet with Dive into Deep Learning's BatchNorm (the shipped copy, as people use it)."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), d2l.BatchNorm(6, num_dims=4), nn.Sigmoid(), nn.AvgPool2d(2, 2),
        nn.Conv2d(6, 16, 5), d2l.BatchNorm(16, num_dims=4), nn.Sigmoid(), nn.AvgPool2d(2, 2),
        nn.Flatten(),
        nn.Linear(256, 120), d2l.BatchNorm(120, num_dims=2), nn.Sigmoid(),
        nn.Linear(120, 84), d2l.BatchNorm(84, num_dims=2), nn.Sigmoid(),
        nn.Linear(84, 10),
    )  # fmt: skip


def _step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, backend: str | None
) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()

    def step() -> None:
        if backend is not None:
            bnkit.nn.set_backend(backend)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def configurations(seed: int) -> dict[str, tuple[nn.Module, str | None]]:
    torch.manual_seed(seed)
    configs: dict[str, tuple[nn.Module, str | None]] = {
        "torch BatchNorm": (models.lenet("torch"), None),
    }
    if bnkit.nn.fast_path_available():
        configs["bnkit, C++ fast path"] = (models.lenet("bnkit"), "cpp")
    configs["bnkit, plain PyTorch path"] = (models.lenet("bnkit"), "plain")
    configs["Dive into Deep Learning's BatchNorm"] = (d2l_lenet(), None)
    return configs


def measure(ctx: Context, repeats: int, warmup: int) -> dict[str, list[float]]:
    x, y = ctx.train
    x, y = x[:BATCH], y[:BATCH]
    before = bnkit.nn.backend()
    try:
        steps = {
            name: _step(model, x, y, backend)
            for name, (model, backend) in configurations(ctx.seed).items()
        }
        return interleaved_times(steps, repeats=repeats, warmup=warmup)
    finally:
        bnkit.nn.set_backend(before)


def run(ctx: Context) -> Section:
    repeats, warmup = (20, 3) if ctx.quick else (60, 5)
    times = measure(ctx, repeats, warmup)
    res: dict[str, Any] = {
        "what": (
            f"one SGD step (forward, backward, update) of LeNet on a batch of {BATCH} MNIST "
            f"images, {repeats} repeats after {warmup} warm-up rounds, the configurations "
            "timed in turn within each repeat, order alternating"
        ),
        "threads": torch.get_num_threads(),
    }
    rows = []
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=10)
        med = statistics.median(ts)
        res[name] = {
            "median_ms": med * 1e3,
            "p10_ms": q[0] * 1e3,
            "p90_ms": q[-1] * 1e3,
            "examples_per_s": BATCH / med,
            # paired: the median over repeats of this repeat's time / torch's, both timed
            # back to back, so a load that comes and goes cancels in each pair
            "time_vs_torch": statistics.median(
                t / t0 for t, t0 in zip(ts, times["torch BatchNorm"], strict=True)
            ),
        }
        rows.append(
            [
                name,
                med * 1e3,
                f"{q[0] * 1e3:.2f}-{q[-1] * 1e3:.2f}",
                BATCH / med,
                res[name]["time_vs_torch"],
            ]
        )
    fast = res.get("bnkit, C++ fast path")
    d2l_ratio = res["Dive into Deep Learning's BatchNorm"]["time_vs_torch"]
    summary = (
        f"Measured as a benchmark, not taken from the training loops: {res['what']}. Step "
        f"time relative to torch's BatchNorm (median; below 1 is faster): "
        + (f"bnkit's fast path {fast['time_vs_torch']:.2f}x, " if fast else "")
        + f"bnkit's plain path {res['bnkit, plain PyTorch path']['time_vs_torch']:.2f}x, "
        f"Dive into Deep Learning's from-scratch BatchNorm {d2l_ratio:.2f}x "
        f"(its throughput is {1 / d2l_ratio:.2f}x the built-in's). The 10th-90th percentile "
        "column is the spread over repeats; a machine busy during part of the run widens it "
        "for every row alike instead of biasing one. BatchNorm is a small part of LeNet's "
        "step (the convolutions dominate), so differences here are smaller than for the "
        "layer alone (see the cost section)."
    )
    return Section(
        NAME,
        TITLE,
        summary,
        res,
        [],
        [
            (
                f"LeNet training step, batch {BATCH}, {res['threads']} thread(s)",
                ["configuration", "median ms", "p10-p90 ms", "examples/s", "time vs torch"],
                rows,
            )
        ],
    )
