"""Recompute running statistics as exact population statistics of some data.

After weight averaging (SWA/EMA), pruning or quantization the running statistics no longer
match the weights, and eval accuracy collapses. :func:`recalibrate` runs the data through
the model with only the BatchNorm layers in training mode and sets each layer's
``running_mean``/``running_var`` to the mean and *unbiased* variance of all the values the
layer saw, as if the batches had been concatenated: per-batch (count, mean, variance)
summaries are merged exactly (Chan et al.), so unequal batch sizes are fine and nothing
is biased by small batches. ``torch.optim.swa_utils.update_bn`` instead averages
per-batch unbiased variances, which misses the spread of the batch means.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bnkit.nn import functional as F
from bnkit.tools.freeze import is_stats_frozen, no_stats_update, select_batchnorms

__all__ = ["recalibrate"]


class _Population:
    """Running (count, mean, biased variance) of the values one layer has seen."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.var: Tensor | None = None

    def all_merge(self, group: Any, channels: int, device: torch.device) -> None:
        """Merge the summaries of every rank (one all_gather), in rank order."""
        packed = torch.zeros(1 + 2 * channels, dtype=torch.float64, device=device)
        if self.mean is not None and self.var is not None:
            packed[0] = self.count
            packed[1 : 1 + channels] = self.mean
            packed[1 + channels :] = self.var
        parts = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, packed, group=group)
        self.count, self.mean, self.var = 0, None, None
        for part in parts:
            n = int(part[0].item())
            if n == 0:
                continue
            mean, var = part[1 : 1 + channels], part[1 + channels :]
            if self.mean is None or self.var is None:
                self.count, self.mean, self.var = n, mean, var
            else:
                count, self.mean, self.var = F.merge_stats(
                    self.count, self.mean, self.var, n, mean, var
                )
                self.count = int(count)

    def add(self, x: Tensor) -> None:
        if x.numel() == 0:
            return
        n = x.numel() // x.shape[1]
        mean, var = F.batch_stats(x)
        if self.mean is None or self.var is None:
            self.count, self.mean, self.var = n, mean, var
            return
        count, self.mean, self.var = F.merge_stats(self.count, self.mean, self.var, n, mean, var)
        self.count = int(count)


def _default_forward(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Tensor):
        model(batch)
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        model(batch[0])  # (input, target, ...) as most loaders yield
    else:
        raise TypeError(
            f"recalibrate: the data yielded a {type(batch).__name__}; expected a Tensor or a "
            "tuple/list whose first item is the input Tensor. Pass forward=lambda model, "
            "batch: model(...) for other batch types"
        )


def _progress(it: Iterable[Any], total: int | None, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional extra: no bar without it
        return it
    return tqdm(it, total=total, desc="recalibrate", unit="batch", file=sys.stderr)


@torch.no_grad()
def recalibrate(
    model: nn.Module,
    data: Iterable[Any],
    *,
    num_batches: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = True,
    process_group: Any = None,
    strict: bool = False,
) -> dict[str, int]:
    """Set every BatchNorm's running statistics to the exact population statistics.

    Args:
        model: the model; its parameters are not changed. Layers frozen with
            :func:`bnkit.freeze` (statistics) are left as they are.
        data: an iterable of batches (a DataLoader, a list of tensors, ...).
        num_batches: use the first ``num_batches`` batches; an error if fewer come.
            Default: all of ``data``.
        forward: ``forward(model, batch)`` for batches that are not a tensor or an
            ``(input, ...)`` tuple.
        progress: show a progress bar (needs ``tqdm``, from the ``report`` extra).
        process_group: under torch.distributed (initialized, world size > 1) every rank
            passes its own shard of the data and gets the *global* population statistics
            (one all_gather per layer); ``process_group`` picks the group (default: world).
        strict: a BatchNorm the forward never reaches (a branch unused on this data) is an
            error; by default it is left as it was, named in a warning.

    Returns:
        ``{layer name: number of values per channel seen}`` (0 for a layer never reached).

    Nothing is written unless every reached layer can be recalibrated: an error leaves the
    whole model as it was.

    Afterwards each layer's ``running_var`` is the unbiased variance (``n - 1``) of all the
    values it saw, ``num_batches_tracked`` the number of batches, and every module's
    training flag and momentum are what they were.
    """
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"recalibrate: num_batches must be a positive int, got {num_batches!r}")
    layers = [
        (n, m)
        for n, m in select_batchnorms(model)
        if m.running_mean is not None and not is_stats_frozen(m)
    ]
    if not layers:
        raise ValueError(
            "recalibrate: every BatchNorm layer is frozen or has no running statistics "
            "(track_running_stats=False); nothing to recalibrate"
        )
    run = forward or _default_forward
    pops = {name: _Population() for name, _ in layers}
    flags = {m: m.training for m in model.modules()}
    handles = []
    for name, m in layers:

        def hook(mod: nn.Module, args: tuple[Any, ...], pop: _Population = pops[name]) -> None:
            pop.add(args[0])

        handles.append(m.register_forward_pre_hook(hook))
    seen = 0
    try:
        model.eval()  # dropout and friends off ...
        for _, m in layers:
            m.train()  # ... only the BatchNorms normalize with batch statistics
        batches: Iterator[Any] = iter(data)
        if num_batches is not None:
            batches = itertools.islice(batches, num_batches)
        with no_stats_update(model), contextlib.ExitStack():
            for batch in _progress(batches, num_batches or _len(data), progress):
                run(model, batch)
                seen += 1
    finally:
        for h in handles:
            h.remove()
        for mod, flag in flags.items():
            mod.train(flag)
    if seen == 0 or (num_batches is not None and seen < num_batches):
        raise ValueError(
            f"recalibrate: the data yielded {seen} batch(es), "
            f"{'asked for ' + str(num_batches) if num_batches else 'need at least 1'}; "
            "running statistics were left unchanged"
        )
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
        device: Any = None
        for name, m in layers:
            rm: Any = m.running_mean
            device = rm.device
            pops[name].all_merge(process_group, rm.numel(), device)
        seen_t = torch.tensor([seen], dtype=torch.float64, device=device)
        dist.all_reduce(seen_t, group=process_group)
        seen = int(seen_t.item())
    # Everything is checked before anything is written: the model is recalibrated whole or
    # not at all. A layer the forward never reached is left as it was (named; an error with
    # strict=True); one that saw a single value per channel is an error.
    unreached = [name for name, _ in layers if pops[name].count == 0]
    if unreached and strict:
        raise ValueError(
            f"recalibrate: the forward never reached {_names(unreached)}; running statistics "
            "were left unchanged (strict=False recalibrates the others and leaves these)"
        )
    for name, _ in layers:
        if pops[name].count == 1:
            raise ValueError(
                f"recalibrate: layer {name!r} saw 1 value per channel; need at least 2 for an "
                "unbiased variance; running statistics were left unchanged"
            )
    if unreached:
        warnings.warn(
            f"recalibrate: the forward never reached {_names(unreached)}; left as they were",
            stacklevel=2,
        )
    counts = {}
    for name, m in layers:
        pop = pops[name]
        counts[name] = pop.count
        if pop.mean is None or pop.var is None:
            continue
        unbiased = pop.var * (pop.count / (pop.count - 1))
        rm, rv, nbt = m.running_mean, m.running_var, m.num_batches_tracked
        assert isinstance(rm, Tensor) and isinstance(rv, Tensor)
        rm.copy_(pop.mean.to(rm.dtype))
        rv.copy_(unbiased.to(rv.dtype))
        if isinstance(nbt, Tensor):
            nbt.fill_(seen)
    return counts


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:5])
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return f"{len(names)} BatchNorm layer(s): {shown}{more}"


def _len(data: Iterable[Any]) -> int | None:
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None
