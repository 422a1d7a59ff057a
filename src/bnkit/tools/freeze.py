"""Running statistics that do what the user meant: freeze, no_stats_update, StatsGuard.

``requires_grad_(False)`` does not stop a BatchNorm's running statistics from moving, and
``bn.eval()`` is undone by the next ``model.train()``. :func:`freeze` installs a forward
pre-hook that puts the layer in eval mode for each call (and a post-hook that puts the
flag back), so the freeze survives any number of ``model.train()`` calls; :func:`unfreeze`
removes the hooks and restores ``requires_grad`` as it was.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bnkit.nn import is_batchnorm

__all__ = [
    "LayerSelector",
    "StatsGuard",
    "freeze",
    "frozen_layers",
    "no_stats_update",
    "select_batchnorms",
    "unfreeze",
]

LayerSelector = str | type | Sequence[str | type] | None
_STATE = "_bnkit_freeze"


def select_batchnorms(
    model: nn.Module, layers: LayerSelector = None
) -> list[tuple[str, nn.Module]]:
    """The BatchNorm layers of ``model`` (name, module) that ``layers`` selects.

    ``layers`` is None (all), a glob pattern on the qualified name (``"backbone.*"``), a
    module type (``nn.BatchNorm2d``), or a sequence of those. A pattern or type that
    selects nothing is an error that lists the BatchNorm layers there are.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    bns = [(name, m) for name, m in model.named_modules() if is_batchnorm(m)]
    if not bns:
        raise ValueError(
            f"no BatchNorm layer in {type(model).__name__}: nothing to act on "
            "(torch's and bnkit's BatchNorm1d/2d/3d and SyncBatchNorm are recognised)"
        )
    if layers is None:
        return bns
    selectors = [layers] if isinstance(layers, (str, type)) else list(layers)
    chosen: dict[str, nn.Module] = {}
    for sel in selectors:
        if isinstance(sel, str):
            hits = [(n, m) for n, m in bns if fnmatch.fnmatchcase(n, sel)]
        elif isinstance(sel, type):
            hits = [(n, m) for n, m in bns if isinstance(m, sel)]
        else:
            raise TypeError(f"layers: expected a name pattern (str) or a module type, got {sel!r}")
        if not hits:
            names = ", ".join(n or "<root>" for n, _ in bns[:12])
            more = f" (+{len(bns) - 12} more)" if len(bns) > 12 else ""
            raise ValueError(
                f"layers: {sel!r} selects no BatchNorm layer; the BatchNorm layers are: "
                f"{names}{more}"
            )
        chosen.update(hits)
    return [(n, m) for n, m in bns if n in chosen]


def _frozen_pre_hook(module: nn.Module, args: Any) -> None:
    state = module.__dict__[_STATE]
    if state["stats"]:
        state["was_training"] = module.training
        module.training = False


def _frozen_post_hook(module: nn.Module, args: Any, output: Any) -> None:
    state = module.__dict__[_STATE]
    if state["stats"]:
        module.training = state.pop("was_training", module.training)


def freeze(
    model: nn.Module,
    *,
    stats: bool = True,
    affine: bool = True,
    layers: LayerSelector = None,
) -> list[str]:
    """Freeze BatchNorm layers so that they stay frozen through ``model.train()``.

    Args:
        model: any module containing BatchNorm layers (torch's, bnkit's, SyncBatchNorm).
        stats: frozen layers normalize with their running statistics and never update
            them or ``num_batches_tracked``, whatever the training flag.
        affine: ``weight`` and ``bias`` get ``requires_grad=False``.
        layers: which layers (see :func:`select_batchnorms`); default all.

    Returns:
        The names of the layers frozen. Freezing a frozen layer again updates its options.
    """
    chosen = select_batchnorms(model, layers)
    for _, m in chosen:
        state = m.__dict__.get(_STATE)
        if state is None:
            state = {"requires_grad": {}, "stats": False, "affine": False}
            m.__dict__[_STATE] = state
            m.register_forward_pre_hook(_frozen_pre_hook)
            m.register_forward_hook(_frozen_post_hook)
        state["stats"] = stats
        if affine and not state["affine"]:
            for pname, p in m.named_parameters(recurse=False):
                state["requires_grad"][pname] = p.requires_grad
                p.requires_grad_(False)
        elif not affine and state["affine"]:
            _restore_grad(m, state)
        state["affine"] = affine
    return [n for n, _ in chosen]


def _restore_grad(m: nn.Module, state: dict[str, Any]) -> None:
    for pname, p in m.named_parameters(recurse=False):
        p.requires_grad_(state["requires_grad"].get(pname, p.requires_grad))
    state["requires_grad"] = {}


def unfreeze(model: nn.Module, *, layers: LayerSelector = None) -> list[str]:
    """Undo :func:`freeze` on the selected layers; returns the names unfrozen."""
    done = []
    for name, m in select_batchnorms(model, layers):
        state = m.__dict__.pop(_STATE, None)
        if state is None:
            continue
        for hooks, fn in (
            (m._forward_pre_hooks, _frozen_pre_hook),
            (m._forward_hooks, _frozen_post_hook),
        ):
            for key in [k for k, h in hooks.items() if h is fn]:
                del hooks[key]
        _restore_grad(m, state)
        done.append(name)
    return done


def frozen_layers(model: nn.Module) -> list[str]:
    """Names of the layers of ``model`` that :func:`freeze` has frozen."""
    return [n for n, m in model.named_modules() if _STATE in m.__dict__]


def is_stats_frozen(module: nn.Module) -> bool:
    """Whether :func:`freeze` froze this layer's statistics."""
    state = module.__dict__.get(_STATE)
    return bool(state and state["stats"])


@contextlib.contextmanager
def no_stats_update(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, train-mode forwards use batch statistics but change no running
    statistic and no ``num_batches_tracked`` (extra forward passes, activation
    checkpointing recomputation, evaluating a loss twice). Eval mode is unaffected.
    """
    saved = []
    for _, m in select_batchnorms(model):
        saved.append((m, m.track_running_stats))
        setattr(m, "track_running_stats", False)  # noqa: B010 (nn.Module's typing)
    try:
        yield model
    finally:
        for m, flag in saved:
            setattr(m, "track_running_stats", flag)  # noqa: B010


class StatsGuard:
    """Guarded running-statistic updates (opt-in).

    * ``skip_nonfinite=True``: a batch whose statistics are not finite (NaN/Inf, e.g.
      under AMP overflow) leaves that layer's running statistics and counter untouched;
      the first layer that saw one is kept in :attr:`first_nonfinite` and every event in
      :attr:`events`. Costs one device sync per layer and forward.
    * ``deferred=True``: updates are provisional until :meth:`commit`; :meth:`rollback`
      restores the statistics as they were at the last commit. Use it with GradScaler,
      which may skip an optimizer step::

          guard = bnkit.StatsGuard(model, deferred=True)
          with guard:
              ...forward, backward...
              scale = scaler.get_scale(); scaler.step(opt); scaler.update()
              guard.commit() if scaler.get_scale() >= scale else guard.rollback()

    Works as a context manager (hooks removed on exit) or with :meth:`attach`/:meth:`detach`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        skip_nonfinite: bool = True,
        deferred: bool = False,
        layers: LayerSelector = None,
    ) -> None:
        self.model = model
        self.skip_nonfinite = skip_nonfinite
        self.deferred = deferred
        self.layers = select_batchnorms(model, layers)
        self.events: list[str] = []
        self.first_nonfinite: str | None = None
        self._handles: list[Any] = []
        self._pending: dict[str, dict[str, Tensor]] = {}
        self._committed: dict[str, dict[str, Tensor]] = {}

    @staticmethod
    def _snapshot(m: nn.Module) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in m.named_buffers(recurse=False)}

    @staticmethod
    def _restore(m: nn.Module, snap: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for k, v in m.named_buffers(recurse=False):
                v.copy_(snap[k])

    def attach(self) -> StatsGuard:
        """Install the hooks; statistics as they are now count as committed."""
        if self._handles:
            return self
        for name, m in self.layers:
            self._committed[name] = self._snapshot(m)
            self._handles.append(m.register_forward_pre_hook(self._make_pre(name)))
            self._handles.append(m.register_forward_hook(self._make_post(name)))
        return self

    def detach(self) -> None:
        """Remove the hooks (pending deferred updates are kept as they are)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> StatsGuard:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def _make_pre(self, name: str) -> Any:
        def pre(m: nn.Module, args: Any) -> None:
            if self.skip_nonfinite and m.training:
                self._pending[name] = self._snapshot(m)

        return pre

    def _make_post(self, name: str) -> Any:
        def post(m: nn.Module, args: Any, output: Any) -> None:
            before = self._pending.pop(name, None)
            if before is None:
                return
            rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
            stats = [t for t in (rm, rv) if t is not None]
            if stats and not all(bool(torch.isfinite(t).all()) for t in stats):
                self._restore(m, before)
                self.events.append(name)
                if self.first_nonfinite is None:
                    self.first_nonfinite = name

        return post

    def commit(self) -> None:
        """Accept the statistics as they are now (the optimizer step went through)."""
        for name, m in self.layers:
            self._committed[name] = self._snapshot(m)

    def rollback(self) -> None:
        """Restore the statistics of the last :meth:`commit` (the step was skipped)."""
        if not self.deferred:
            raise RuntimeError("StatsGuard.rollback() needs deferred=True")
        for name, m in self.layers:
            self._restore(m, self._committed[name])
