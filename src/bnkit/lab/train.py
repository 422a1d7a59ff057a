"""The training and evaluation loops every experiment shares."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from bnkit.nn import is_batchnorm
from bnkit.tools.freeze import no_stats_update

__all__ = [
    "History",
    "SMALL_STEP",
    "accuracy",
    "bar",
    "fit",
    "per_class_accuracy",
    "predict",
    "threads_for",
]

# Input values per training step below which one intra-op thread is faster than torch's
# default: the threads' wake-up and join cost more than the small ops they split, and a
# step waits for its slowest thread, so one busy core stalls every op (docs/performance.md,
# "The report's threads").
SMALL_STEP = 32 * 28 * 28


@contextlib.contextmanager
def threads_for(values_per_step: int) -> Iterator[int]:
    """torch's intra-op threads for a loop whose steps each take about ``values_per_step``
    input values: one below :data:`SMALL_STEP`, else as they were; restored afterwards.
    A thread count the user chose (``OMP_NUM_THREADS``, or torch already on one thread)
    is kept. Yields the count in effect."""
    before = torch.get_num_threads()
    chosen = "OMP_NUM_THREADS" in os.environ or "MKL_NUM_THREADS" in os.environ
    n = 1 if values_per_step < SMALL_STEP and not chosen else before
    if n != before:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        if n != before:
            torch.set_num_threads(before)


def bar(total: int, desc: str, enabled: bool = True) -> tqdm:
    """A progress bar on stderr (silent when ``enabled`` is False)."""
    return tqdm(
        total=total,
        desc=desc,
        file=sys.stderr,
        leave=False,
        disable=not enabled,
        dynamic_ncols=True,
    )


@dataclass
class History:
    """Per-step training losses, per-epoch test accuracies, and the BatchNorm buffers at
    the end of each epoch (for the running-statistics plots). Speed is not recorded here:
    a training loop's timing follows whatever else the machine does (see
    ``lab/experiments/throughput.py``)."""

    losses: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    bn_states: list[dict[str, torch.Tensor]] = field(default_factory=list)


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    desc: str = "train",
    progress: bool = True,
    on_epoch: object = None,
    params: list[torch.Tensor] | None = None,
) -> History:
    """Plain SGD on shuffled mini-batches (the last short batch is dropped)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(params if params is not None else model.parameters(), lr=lr)
    hist = History()
    steps = len(y) // batch_size
    per_step = batch_size * (x[0].numel() if len(x) else 0)
    with threads_for(per_step), bar(epochs * steps, desc, progress) as pbar:
        for epoch in range(epochs):
            model.train()
            perm = torch.randperm(len(y), generator=gen)
            for i in range(steps):
                idx = perm[i * batch_size : (i + 1) * batch_size]
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
                hist.losses.append(loss.item())
                pbar.update(1)
            if test is not None:
                hist.test_acc.append(accuracy(model, *test))
            hist.bn_states.append(
                {
                    k: v.detach().clone()
                    for k, v in model.state_dict().items()
                    if k.endswith(("running_mean", "running_var", "num_batches_tracked"))
                }
            )
            if callable(on_epoch):
                on_epoch(epoch)
    return hist


@torch.no_grad()
def predict(
    model: nn.Module, x: torch.Tensor, batch_size: int = 500, train_mode: bool = False
) -> torch.Tensor:
    """Predicted classes; ``train_mode`` normalizes with each batch's own statistics
    (running statistics untouched)."""
    was = model.training
    model.train(train_mode)
    try:
        has_bn = any(is_batchnorm(m) for m in model.modules())
        with no_stats_update(model) if train_mode and has_bn else contextlib.nullcontext():
            out = [model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]
    finally:
        model.train(was)
    return torch.cat(out)


def accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 500,
    train_mode: bool = False,
) -> float:
    """Fraction of ``x`` classified as ``y``."""
    return float((predict(model, x, batch_size, train_mode) == y).float().mean())


def per_class_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Accuracy on each class 0..9 in eval mode."""
    pred = predict(model, x)
    return [
        float((pred[y == k] == k).float().mean()) if (y == k).any() else float("nan")
        for k in range(10)
    ]
