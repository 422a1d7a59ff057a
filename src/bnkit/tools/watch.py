"""``bnkit.watch``: BatchNorm in the training loop, watched as it runs.

``watch(model)`` puts forward hooks on every BatchNorm of a model (torch's and bnkit's,
SyncBatchNorm, the variants, any device) and, every ``every`` steps (a step is a forward of
the whole model), records per layer: the batch's mean and variance against the running
ones (the train/eval gap, in running standard deviations), the weight and bias (channels
whose weight went to about 0), the values per channel, non-finite statistics and the
momentum in effect. It warns once per layer and kind, naming the layer, what it saw and
the fix, when

* a training-mode forward runs under ``torch.no_grad()``/``inference_mode`` (validation
  without ``model.eval()``), or the same batch is seen in training mode twice in a row;
* the running statistics move while the layer's parameters are frozen
  (``requires_grad=False``, the model left in training mode: frozen-backbone drift);
* a batch has 1-2 values per channel, or statistics go non-finite (the first such layer);
* the running statistics drift away from the recent batch statistics (``drift`` running
  standard deviations, averaged over channels, after the running average has had
  ``warmup`` batches).

The history (:class:`History`) goes to JSON/CSV, to a
``torch.utils.tensorboard.SummaryWriter`` when one is given, and to a per-layer plot.
Statistics use :func:`bnkit.functional.batch_stats` (the layers' own scheme, float64).

    with bnkit.watch(model, every=10) as w:
        for x, y in loader:
            ...
    w.history.plot("bn.png"); w.history.to_json("bn.json")
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bnkit.nn import is_batchnorm
from bnkit.nn.functional import batch_stats
from bnkit.tools.freeze import is_stats_frozen

__all__ = ["BatchNormWarning", "History", "Record", "Watch", "watch"]


class BatchNormWarning(UserWarning):
    """A BatchNorm misuse seen while training (see :func:`watch`)."""


@dataclass
class Record:
    """One layer at one recorded step (means over channels unless said)."""

    step: int
    layer: str
    training: bool
    values_per_channel: int
    batch_mean: float
    batch_var: float
    running_mean: float | None
    running_var: float | None
    gap: float | None  # mean |batch mean - running mean| / sqrt(running var + eps)
    weight_mean: float | None
    weight_abs_min: float | None
    dead_channels: int  # |weight| < 1e-3
    bias_mean: float | None
    momentum: float | None  # the weight of this batch in the running average
    finite: bool


@dataclass
class History:
    """What :class:`Watch` recorded."""

    records: list[Record] = field(default_factory=list)
    warnings: list[dict[str, str]] = field(default_factory=list)

    def layers(self) -> list[str]:
        return list(dict.fromkeys(r.layer for r in self.records))

    def series(self, layer: str, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one field for one layer (None values skipped)."""
        pts = [(r.step, getattr(r, key)) for r in self.records if r.layer == layer]
        pts = [(s, v) for s, v in pts if v is not None]
        return [s for s, _ in pts], [float(v) for _, v in pts]

    def to_json(self, path: str | os.PathLike[str]) -> None:
        _atomic(path, json.dumps(self.as_dict(), indent=1, default=_clean))

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": [{k: _clean(v) for k, v in asdict(r).items()} for r in self.records],
            "warnings": self.warnings,
        }

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        names = [f.name for f in Record.__dataclass_fields__.values()]
        out = Path(path)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            with tmp.open("w", newline="") as fh:
                wr = csv.writer(fh)
                wr.writerow(names)
                for r in self.records:
                    wr.writerow([getattr(r, n) for n in names])
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)

    def plot(self, path: str | os.PathLike[str], title: str = "") -> None:
        """Per layer over the recorded steps: running and batch mean, running and batch
        variance, and the gap (PNG, atomic write; the look of ``bnkit inspect --plot``)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise ImportError("History.plot needs matplotlib: pip install 'bnkit[report]'") from exc
        layers = self.layers()
        if not layers:
            raise ValueError("History.plot: nothing recorded (no BatchNorm ran a forward)")
        if not Path(path).parent.is_dir():
            raise FileNotFoundError(f"{path}: the directory {Path(path).parent} does not exist")
        fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
        for i, name in enumerate(layers):
            color = f"C{i % 10}"
            for ax, run, bat in (
                (axes[0], "running_mean", "batch_mean"),
                (axes[1], "running_var", "batch_var"),
            ):
                s, v = self.series(name, run)
                ax.plot(s, v, color=color, label=name if ax is axes[0] else None)
                s, v = self.series(name, bat)
                ax.plot(s, v, color=color, linestyle=":", alpha=0.6)
            s, v = self.series(name, "gap")
            axes[2].plot(s, v, color=color)
        axes[0].set(
            ylabel="mean (solid: running, dotted: batch)", title=title or "BatchNorm over training"
        )
        axes[1].set(ylabel="variance", yscale="log")
        axes[2].set(ylabel="gap (running std)", xlabel="step")
        if len(layers) <= 12:
            axes[0].legend(fontsize=7)
        out = Path(path)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
        try:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
            os.replace(tmp, out)
        finally:
            plt.close(fig)
            tmp.unlink(missing_ok=True)


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _atomic(path: str | os.PathLike[str], text: str) -> None:
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _fingerprint(x: Tensor) -> tuple[Any, ...]:
    """Shape and the per-channel statistics of all the values (the layers' own one-pass
    kernel where it runs): the same batch, not a reused buffer or a new batch that happens
    to agree on a few values (images with blank borders)."""
    if x.dim() < 2 or x.numel() == 0 or not x.is_floating_point():
        return (tuple(x.shape), x.dtype)
    mean, var = batch_stats(x.detach())
    sums = torch.stack([mean.sum(), var.sum()])
    return (tuple(x.shape), x.dtype, str(x.device), tuple(sums.tolist()))


class Watch:
    """The handle :func:`watch` returns (also a context manager: hooks off on exit)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        every: int = 10,
        drift: float = 3.0,
        warmup: int | None = None,
        writer: Any = None,
        warn: bool = True,
        step: Callable[[], int] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"watch: expected an nn.Module, got {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"watch: every must be a positive int (steps), got {every!r}")
        if not (isinstance(drift, (int, float)) and drift > 0):
            raise ValueError(f"watch: drift must be a positive number, got {drift!r}")
        self.model = model
        self.every = every
        self.drift = float(drift)
        self.warmup = warmup
        self.writer = writer
        self.warn = warn
        self.step = 0
        self._step_fn = step
        self._recorded: set[tuple[str, int]] = set()
        self.history = History()
        self._warned: set[tuple[str, str]] = set()
        self._last: dict[str, tuple[Any, ...]] = {}
        self._fp_layer: str | None = None
        self._handles: list[Any] = []
        self._paused = 0
        self._nonfinite_named = False
        self.layers = [(n, m) for n, m in model.named_modules() if is_batchnorm(m)]
        if not self.layers:
            warnings.warn(
                f"watch: {type(model).__name__} has no BatchNorm layer; nothing to watch",
                BatchNormWarning,
                stacklevel=3,
            )
        self._handles.append(model.register_forward_pre_hook(self._count))
        for name, m in self.layers:
            self._handles.append(m.register_forward_pre_hook(self._pre(name)))
            self._handles.append(m.register_forward_hook(self._post(name)))

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Remove the hooks (the history stays)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.writer is not None and hasattr(self.writer, "flush"):
            self.writer.flush()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Neither record nor warn inside (a deliberate training-mode forward under
        ``no_grad``, such as :func:`bnkit.recalibrate`)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    # ------------------------------------------------------------------ hooks
    def _count(self, module: nn.Module, args: Any) -> None:
        if self._step_fn is not None:
            self.step = int(self._step_fn())
        elif not self._paused:
            self.step += 1

    def _recording(self, layer: str) -> bool:
        if self._step_fn is not None:
            self.step = int(self._step_fn())
            return self.step % self.every == 0 and (layer, self.step) not in self._recorded
        return (self.step - 1) % self.every == 0

    def _pre(self, name: str) -> Any:
        def hook(m: nn.Module, args: Any) -> None:
            if self._paused or not args or not isinstance(args[0], Tensor):
                return
            if m.training:
                self._check_training_call(name, m, args[0])

        return hook

    def _post(self, name: str) -> Any:
        def hook(m: nn.Module, args: Any, output: Any) -> None:
            if self._paused or not args or not isinstance(args[0], Tensor):
                return
            if self._recording(name):
                self._recorded.add((name, self.step))
                self._record(name, m, args[0])

        return hook

    # ------------------------------------------------------------------ checks
    def _check_training_call(self, name: str, m: nn.Module, x: Tensor) -> None:
        if not torch.is_grad_enabled():
            where = (
                "torch.inference_mode()" if torch.is_inference_mode_enabled() else "torch.no_grad()"
            )
            self._warn(
                name,
                "no-grad training forward",
                f"a training-mode forward under {where}: the batch statistics normalize "
                "this output and the running statistics move, as in training. Validation "
                "without model.eval()? Call model.eval() before evaluating (and model.train() "
                "after); bnkit.recalibrate does this on purpose (use watch.paused() there)",
            )
        # the first BatchNorm to run a training forward is the one fingerprinted: two
        # float64 sums a step, whatever the depth
        if self._fp_layer is None:
            self._fp_layer = name
        fp = _fingerprint(x) if name == self._fp_layer else None
        if fp is not None and self._last.get(name) == fp:
            self._warn(
                name,
                "same batch twice",
                "the same batch ran through this layer in training mode twice in a row: its "
                "running statistics counted it twice (a forward for logging before the "
                "training forward?). Run the extra forward in eval mode or under "
                "bnkit.no_stats_update(model)",
            )
        if fp is not None:
            self._last[name] = fp
        w = getattr(m, "weight", None)
        params = [p for p in (w, getattr(m, "bias", None)) if isinstance(p, Tensor)]
        tracks = (
            getattr(m, "track_running_stats", False)
            and getattr(m, "running_mean", None) is not None
        )
        if (
            params
            and tracks
            and not is_stats_frozen(m)
            and not any(p.requires_grad for p in params)
        ):
            self._warn(
                name,
                "frozen parameters, moving statistics",
                "weight and bias have requires_grad=False but the layer is in training "
                "mode, so its running statistics keep moving (frozen-backbone drift: "
                "model.train() put it back in training mode). Fix: bnkit.freeze(model, "
                "layers=...) keeps it frozen through model.train(), or call .eval() on it "
                "after every model.train()",
            )
        n = x.numel() // max(x.shape[1], 1) if x.dim() >= 2 else x.numel()
        if 0 < n <= 2:
            self._warn(
                name,
                "tiny batch",
                f"{n} value(s) per channel in a training batch of shape {tuple(x.shape)}: "
                "the batch statistics are noise (1 is an error). Use a larger batch, "
                "bnkit.GhostBatchNorm/accumulate, or GroupNorm for such batches",
            )

    def _record(self, name: str, m: nn.Module, x: Tensor) -> None:
        if x.dim() < 2 or x.numel() == 0 or not x.is_floating_point():
            return
        with torch.no_grad():
            bm, bv = batch_stats(x.detach())
            rm, rv = _running(m)
            eps = float(getattr(m, "eps", 1e-5))
            finite = bool(torch.isfinite(bm).all() and torch.isfinite(bv).all())
            if rm is not None and rv is not None:
                finite = finite and bool(torch.isfinite(rm).all() and torch.isfinite(rv).all())
            gap = None
            if rm is not None and rv is not None:
                gap = float(((bm - rm.double()).abs() / (rv.double() + eps).sqrt()).mean())
            w = getattr(m, "weight", None)
            b = getattr(m, "bias", None)
            wd = w.detach().double() if isinstance(w, Tensor) else None
            mom = getattr(m, "momentum", None)
            count = getattr(m, "num_batches_tracked", None)
            if mom is None and isinstance(count, Tensor) and int(count) > 0:
                mom = 1.0 / int(count)
            rec = Record(
                step=self.step,
                layer=name,
                training=m.training,
                values_per_channel=x.numel() // x.shape[1],
                batch_mean=float(bm.mean()),
                batch_var=float(bv.mean()),
                running_mean=None if rm is None else float(rm.double().mean()),
                running_var=None if rv is None else float(rv.double().mean()),
                gap=gap,
                weight_mean=None if wd is None else float(wd.mean()),
                weight_abs_min=None if wd is None else float(wd.abs().min()),
                dead_channels=0 if wd is None else int((wd.abs() < 1e-3).sum()),
                bias_mean=None if not isinstance(b, Tensor) else float(b.detach().double().mean()),
                momentum=None if mom is None else float(mom),
                finite=finite,
            )
        self.history.records.append(rec)
        self._to_writer(rec)
        if not finite and not self._nonfinite_named:
            self._nonfinite_named = True
            self._warn(
                name,
                "non-finite statistics",
                "batch or running statistics are NaN/Inf here (the first BatchNorm in forward "
                "order where they are): look at the layers before it, the learning rate, or "
                "the input; bnkit.recalibrate(model, loader) rebuilds running statistics",
            )
        warm = self.warmup
        if warm is None:
            mom = getattr(m, "momentum", 0.1)
            warm = int(3 / mom) if mom else 30
        count = getattr(m, "num_batches_tracked", None)
        counted = int(count) if isinstance(count, Tensor) else 0
        if gap is not None and m.training and counted >= warm and gap > self.drift and finite:
            self._warn(
                name,
                "drift",
                f"the running statistics are {gap:.2g} running standard deviations (mean over "
                "channels) away from this batch's: eval-mode outputs will differ from "
                "training's. Causes: a changing input distribution, too small a momentum, "
                "weights moving fast; bnkit.recalibrate(model, loader) sets the exact "
                "population statistics",
            )

    def _to_writer(self, rec: Record) -> None:
        if self.writer is None:
            return
        for key in ("batch_mean", "batch_var", "running_mean", "running_var", "gap", "weight_mean"):
            v = getattr(rec, key)
            if v is not None and math.isfinite(v):
                self.writer.add_scalar(f"batchnorm/{rec.layer}/{key}", v, rec.step)
        self.writer.add_scalar(f"batchnorm/{rec.layer}/dead_channels", rec.dead_channels, rec.step)

    def _warn(self, layer: str, kind: str, text: str) -> None:
        if (layer, kind) in self._warned:
            return
        self._warned.add((layer, kind))
        self.history.warnings.append(
            {"step": str(self.step), "layer": layer, "kind": kind, "message": text}
        )
        if self.warn:
            warnings.warn(
                f"bnkit.watch: {layer or 'model'} ({kind}): {text}", BatchNormWarning, stacklevel=4
            )


def _running(m: nn.Module) -> tuple[Tensor | None, Tensor | None]:
    rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
    return (
        rm.detach() if isinstance(rm, Tensor) else None,
        rv.detach() if isinstance(rv, Tensor) else None,
    )


def watch(
    model: nn.Module,
    *,
    every: int = 10,
    drift: float = 3.0,
    warmup: int | None = None,
    writer: Any = None,
    warn: bool = True,
    step: Callable[[], int] | None = None,
) -> Watch:
    """Watch every BatchNorm of ``model`` while it trains (see the module docstring).

    Args:
        model: the model (its forwards count the steps).
        every: record every ``every`` steps (warnings are checked every step).
        drift: warn when the running statistics are this many running standard deviations
            (mean over channels) from a batch's, once the average has had ``warmup``
            batches (default ``3 / momentum``).
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (or anything with
            ``add_scalar(tag, value, step)``) to log every record to.
        warn: issue :class:`BatchNormWarning` warnings (else only collect them in
            ``history.warnings``).
        step: the current step (a trainer's global step, say); default: the forwards of
            ``model`` are counted.
    """
    return Watch(
        model, every=every, drift=drift, warmup=warmup, writer=writer, warn=warn, step=step
    )
