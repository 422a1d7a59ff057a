"""Lightning callbacks for BatchNorm (``pip install 'bnkit[lightning]'``).

* :class:`BatchNormMonitor`: :func:`bnkit.watch` wired to the trainer's logger and global
  step, its warnings through Lightning's rank-zero warnings;
* :class:`PreciseBatchNorm`: exact population statistics (:func:`bnkit.recalibrate`) at the
  end of fit, or every ``every_n_epochs`` epochs, from the train dataloader or one given;
  under DDP every rank passes its shard and all get the global statistics; it runs after
  Lightning's ``StochasticWeightAveraging`` has swapped the averaged weights in;
* :class:`FreezeBatchNorm`: keeps chosen BatchNorms frozen (statistics and/or affine
  parameters) through every ``train()`` Lightning calls, beside ``BaseFinetuning``.

    trainer = L.Trainer(callbacks=[BatchNormMonitor(), PreciseBatchNorm()])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.fabric.utilities.apply_func import move_data_to_device
    from lightning.pytorch.utilities import rank_zero_warn
except ImportError as exc:  # pragma: no cover - exercised where Lightning is absent
    raise ImportError(
        "bnkit.lightning needs Lightning: pip install 'bnkit[lightning]' (or lightning)"
    ) from exc

from torch import nn

from bnkit.tools.freeze import LayerSelector, freeze
from bnkit.tools.recalibrate import recalibrate
from bnkit.tools.watch import Watch, watch

__all__ = ["BatchNormMonitor", "FreezeBatchNorm", "PreciseBatchNorm"]


class _LoggerWriter:
    """``add_scalar`` onto a Lightning logger (what :class:`Watch` writes to)."""

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        for logger in self.trainer.loggers:
            logger.log_metrics({tag: float(value)}, step=step)

    def flush(self) -> None:
        for logger in self.trainer.loggers:
            logger.save()


class BatchNormMonitor(pl.Callback):
    """:func:`bnkit.watch` during ``fit``: every BatchNorm's statistics every ``every``
    global steps to the trainer's loggers (``batchnorm/<layer>/<quantity>``), and its
    warnings (training forward under no_grad, same batch twice, frozen parameters with
    moving statistics, tiny batches, non-finite statistics, drift) as rank-zero warnings.
    ``history`` holds what was recorded."""

    def __init__(self, every: int = 50, drift: float = 3.0) -> None:
        self.every = every
        self.drift = drift
        self.handle: Watch | None = None
        self._told = 0

    @property
    def history(self) -> Any:
        return None if self.handle is None else self.handle.history

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.handle = watch(
            pl_module,
            every=self.every,
            drift=self.drift,
            writer=_LoggerWriter(trainer),
            warn=False,
            step=lambda: trainer.global_step,
        )
        self._told = 0

    def _tell(self) -> None:
        if self.handle is None:
            return
        found = self.handle.history.warnings
        for w in found[self._told :]:
            rank_zero_warn(f"bnkit.watch: {w['layer']} ({w['kind']}): {w['message']}")
        self._told = len(found)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *a: Any
    ) -> None:
        self._tell()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._tell()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._tell()
        if self.handle is not None:
            self.handle.close()


class PreciseBatchNorm(pl.Callback):
    """Exact population statistics for every BatchNorm, with :func:`bnkit.recalibrate`.

    Args:
        every_n_epochs: also recalibrate after every n-th training epoch (default: only at
            the end of fit).
        dataloader: the batches to use (default: the trainer's train dataloader; under DDP
            each rank's shard, the statistics made global across ranks).
        num_batches: use only the first ``num_batches`` batches.
        forward: ``forward(module, batch)`` for batches that are not a tensor or an
            ``(input, ...)`` tuple (default: ``module(batch[0])``).
    """

    def __init__(
        self,
        every_n_epochs: int | None = None,
        dataloader: Iterable[Any] | None = None,
        num_batches: int | None = None,
        forward: Callable[[nn.Module, Any], Any] | None = None,
    ) -> None:
        if every_n_epochs is not None and (
            isinstance(every_n_epochs, bool)
            or not isinstance(every_n_epochs, int)
            or every_n_epochs < 1
        ):
            raise ValueError(
                f"PreciseBatchNorm: every_n_epochs must be a positive int, got {every_n_epochs!r}"
            )
        self.every_n_epochs = every_n_epochs
        self.dataloader = dataloader
        self.num_batches = num_batches
        self.forward = forward
        self.counts: dict[str, int] = {}

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        data = self.dataloader if self.dataloader is not None else trainer.train_dataloader
        if data is None:
            raise ValueError("PreciseBatchNorm: no dataloader given and the trainer has none")
        device = pl_module.device
        user_forward = self.forward

        def forward(model: nn.Module, batch: Any) -> Any:
            batch = move_data_to_device(batch, device)
            if user_forward is not None:
                return user_forward(model, batch)
            return model(batch[0] if isinstance(batch, (tuple, list)) else batch)

        self.counts = recalibrate(
            pl_module, data, num_batches=self.num_batches, forward=forward, progress=False
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = self.every_n_epochs
        if n is not None and (trainer.current_epoch + 1) % n == 0:
            self._run(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run(trainer, pl_module)


class FreezeBatchNorm(pl.Callback):
    """Keep chosen BatchNorms frozen through the whole fit (:func:`bnkit.freeze`):
    ``stats`` (normalize with, and never update, the running statistics, whatever
    ``train()`` Lightning calls) and ``affine`` (weight and bias without gradients, set
    again before every batch, so a ``BaseFinetuning`` callback that unfreezes their
    parents does not make them trainable). ``layers``: as :func:`bnkit.freeze` takes it
    (a name, a class, or a list of them; default all)."""

    def __init__(
        self, layers: LayerSelector = None, *, stats: bool = True, affine: bool = True
    ) -> None:
        self.layers = layers
        self.stats = stats
        self.affine = affine
        self.frozen: list[str] = []
        self._params: list[Any] = []

    def _apply(self, pl_module: pl.LightningModule) -> None:
        self.frozen = freeze(pl_module, stats=self.stats, affine=False, layers=self.layers)
        chosen = set(self.frozen)
        self._params = [
            p
            for name, m in pl_module.named_modules()
            if name in chosen
            for p in m.parameters(recurse=False)
        ]
        self._refreeze()

    def _refreeze(self) -> None:
        if self.affine:
            for p in self._params:
                p.requires_grad_(False)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._refreeze()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *a: Any
    ) -> None:
        self._refreeze()  # (a BaseFinetuning unfreeze may have made them trainable again)
