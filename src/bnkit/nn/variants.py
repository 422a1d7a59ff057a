"""BatchNorm for small and split batches: Batch Renormalization, Ghost BatchNorm, and
accumulation-aware running statistics.

All three are BatchNorms in eval mode (same buffers, same eval output) and subclasses of
``torch.nn.BatchNorm*d``, so ``fold``, ``freeze``, ``inspect``, ``convert`` and torch's own
helpers treat them as such (``update_bn`` recomputes their statistics,
``convert_sync_batchnorm`` turns them into torch's SyncBatchNorm, as it does any
BatchNorm subclass; export records a BatchNorm in eval mode), and they compute through
:mod:`bnkit.nn.functional` like every other layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from bnkit.nn import _family
from bnkit.nn import functional as F
from bnkit.nn._family import is_batchnorm
from bnkit.nn._running import track_batch
from bnkit.nn.batchnorm import BatchNormBase

__all__ = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "StatsAccumulator",
    "accumulate",
]


class _ScriptedInEvalOnly(BatchNormBase):
    """A layer that is BatchNorm in eval mode only: TorchScript gets torch's BatchNorm in
    eval mode, and a clear refusal in training mode."""

    def __prepare_scriptable__(self) -> nn.Module:
        if self.training:
            raise RuntimeError(
                f"{self._layer_name()}: torch.jit.script would compile a plain BatchNorm, "
                "which differs from this layer in training mode; script the model in eval "
                "mode (model.eval(): there it is BatchNorm), or use torch.export"
            )
        return super().__prepare_scriptable__()


class BatchRenormBase(_ScriptedInEvalOnly):
    r"""Batch Renormalization (Ioffe, 2017).

    .. math::
        \hat x = \frac{x - \mu_B}{\sigma_B} r + d,\quad
        r = \mathrm{clip}_{[1/r_{max}, r_{max}]}\left(\frac{\sigma_B}{\sigma}\right),\quad
        d = \mathrm{clip}_{[-d_{max}, d_{max}]}\left(\frac{\mu_B - \mu}{\sigma}\right)

    with ``sigma_B = sqrt(var_B + eps)`` (biased batch variance), ``mu``/``sigma`` from the
    running statistics, and ``r``, ``d`` held constant in backward. ``y = weight * xhat +
    bias``. The clips start closed (``r = 1``, ``d = 0``: plain BatchNorm) for
    ``warmup_steps`` training steps, then open linearly to ``rmax``/``dmax`` over
    ``relax_steps`` steps (the paper: 5k steps closed, then rmax 1 -> 3 and dmax 0 -> 5).
    Running statistics follow torch's BatchNorm rule (momentum, unbiased variance); eval is
    BatchNorm's eval. The state_dict is BatchNorm's plus ``renorm_steps`` (a BatchNorm
    checkpoint loads, the step count starting at 0).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.01,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_steps: int = 0,
        relax_steps: int = 0,
    ) -> None:
        if not track_running_stats:
            raise ValueError(
                f"{type(self).__name__}: Batch Renormalization corrects towards the running "
                "statistics, so track_running_stats must be True"
            )
        if rmax < 1 or dmax < 0:
            raise ValueError(
                f"{type(self).__name__}: need rmax >= 1 and dmax >= 0, got rmax={rmax}, dmax={dmax}"
            )
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.rmax, self.dmax = float(rmax), float(dmax)
        self.warmup_steps, self.relax_steps = int(warmup_steps), int(relax_steps)
        self.register_buffer("renorm_steps", torch.tensor(0, dtype=torch.long, device=device))

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", rmax={self.rmax}, dmax={self.dmax}, "
            f"warmup_steps={self.warmup_steps}, relax_steps={self.relax_steps}"
        )

    def clips(self) -> tuple[float, float]:
        """The current ``(rmax, dmax)`` of the warm-up schedule."""
        steps: Any = self.renorm_steps
        step = int(steps)
        if step < self.warmup_steps:
            return 1.0, 0.0
        if self.relax_steps <= 0:
            return self.rmax, self.dmax
        t = min(1.0, (step - self.warmup_steps) / self.relax_steps)
        return 1.0 + t * (self.rmax - 1.0), t * self.dmax

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        steps: Any = self.renorm_steps
        state_dict.setdefault(prefix + "renorm_steps", torch.zeros_like(steps))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return super().forward(input)
        self._validate(input, True)
        assert self.running_mean is not None and self.running_var is not None
        xhat, mean, var = F.normalize_train(input, None, None, self.eps)
        rmax, dmax = self.clips()
        with torch.no_grad():
            sigma = torch.sqrt(self.running_var.to(var.dtype) + self.eps)
            sigma_b = torch.sqrt(var + self.eps)
            r = (sigma_b / sigma).clamp(1.0 / rmax, rmax)
            d = ((mean - self.running_mean.to(mean.dtype)) / sigma).clamp(-dmax, dmax)
        shape = F.channel_shape(input)
        cdt = xhat.dtype if xhat.dtype == torch.float64 else torch.float32
        y = xhat.to(cdt) * r.to(cdt).view(shape) + d.to(cdt).view(shape)
        if self.weight is not None:
            y = y * self.weight.to(cdt).view(shape)
        if self.bias is not None:
            y = y + self.bias.to(cdt).view(shape)
        n = input.numel() // input.shape[1]
        track_batch(self, mean, var, n)
        steps: Any = self.renorm_steps
        steps.add_(1)
        return y.to(input.dtype)


class GhostBatchNormBase(_ScriptedInEvalOnly):
    """Ghost BatchNorm (Hoffer et al., 2017): each virtual batch of ``virtual_batch_size``
    samples is normalized with its own statistics (vectorised: all full virtual batches in
    one call, the remainder, if the batch size is not a multiple, in a second). Running
    statistics are updated once per forward with the exact statistics of the whole batch
    (the virtual batches' summaries merged), i.e. as a BatchNorm would; eval is BatchNorm's.
    """

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int = 32,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        if not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
            raise ValueError(
                f"{type(self).__name__}: virtual_batch_size must be a positive "
                f"int, got {virtual_batch_size!r}"
            )
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.virtual_batch_size = virtual_batch_size

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"

    def _ghost(self, x: Tensor) -> Tensor:
        """Normalize ``x`` (N = G * v) as G independent batches of v: (v, G * C, *)."""
        v = self.virtual_batch_size
        n, c = x.shape[0], x.shape[1]
        g = n // v
        rest = x.shape[2:]
        stacked = x.reshape(g, v, c, *rest).transpose(0, 1).reshape(v, g * c, *rest)
        w = None if self.weight is None else self.weight.repeat(g)
        b = None if self.bias is None else self.bias.repeat(g)
        y, _, _ = F.normalize_train(stacked, w, b, self.eps)
        return y.reshape(v, g, c, *rest).transpose(0, 1).reshape(n, c, *rest)

    def forward(self, input: Tensor) -> Tensor:
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        if not use_batch:
            return super().forward(input)
        self._validate(input, True)
        where = self._layer_name()
        v = self.virtual_batch_size
        n = input.shape[0]
        full = (n // v) * v
        for part in (input[:full], input[full:]):
            if part.shape[0]:
                F.check_batch_size(part.size(), f"{where} (virtual batch of {part.shape[0]})")
        pieces = []
        if full:
            pieces.append(self._ghost(input[:full]))
        if n > full:  # the last, smaller virtual batch
            y_rest, _, _ = F.normalize_train(input[full:], self.weight, self.bias, self.eps)
            pieces.append(y_rest)
        y = torch.cat(pieces) if len(pieces) > 1 else (pieces[0] if pieces else input * 1.0)
        if self.training and self.track_running_stats and input.numel() > 0:
            mean, var = F.batch_stats(input)
            track_batch(self, mean, var, input.numel() // input.shape[1])
        elif self.training and self.track_running_stats:
            track_batch(self, torch.zeros(0), torch.zeros(0), 0)
        return y


class StatsAccumulator:
    """Running statistics updated once for k micro-batches, as for their concatenation.

    Inside the context, BatchNorm layers normalize each micro-batch with its own statistics
    (or, with ``pooled=True``, with the statistics pooled over the micro-batches seen so far,
    the current one included and differentiable), their running statistics and counters are
    left alone, and each micro-batch's (count, mean, variance) is merged exactly. On a clean
    exit (or :meth:`commit`) every layer gets one update with the merged statistics: the
    running statistics then equal what one forward of the concatenated batch would give.
    """

    def __init__(self, model: nn.Module, *, pooled: bool = False) -> None:
        self.model = model
        self.pooled = pooled
        self.layers: list[tuple[str, Any]] = [
            (n, m) for n, m in model.named_modules() if is_batchnorm(m)
        ]
        if not self.layers:
            raise ValueError(f"accumulate: no BatchNorm layer in {type(model).__name__}")
        self._stats: dict[str, tuple[int, Tensor, Tensor]] = {}
        self._handles: list[Any] = []
        self._flags: list[tuple[Any, bool]] = []

    def __enter__(self) -> StatsAccumulator:
        for name, m in self.layers:
            self._flags.append((m, m.track_running_stats))
            self._handles.append(m.register_forward_hook(self._hook(name)))
            m.track_running_stats = False
        return self

    def _hook(self, name: str) -> Any:
        def hook(m: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor | None:
            if not m.training:
                return None
            x = args[0]
            if x.numel() == 0:
                return None
            n = x.numel() // x.shape[1]
            mean, var = F.batch_stats(x)
            prev = self._stats.get(name)
            if prev is None:
                self._stats[name] = (n, mean, var)
            else:
                count, pm, pv = F.merge_stats(prev[0], prev[1], prev[2], n, mean, var)
                self._stats[name] = (int(count), pm, pv)
            if not self.pooled or prev is None:
                return None
            return self._pooled_output(m, x, prev)

        return hook

    def _pooled_output(self, m: Any, x: Tensor, prev: tuple[int, Tensor, Tensor]) -> Tensor:
        # mean/var of the current micro-batch, differentiable, merged with the constant
        # summary of the earlier ones (Chan's formula), then the eval-form normalization.
        n = x.numel() // x.shape[1]
        mean, var = F.differentiable_stats(x.to(torch.float64))
        _, pm, pv = F.merge_stats(prev[0], prev[1].to(mean), prev[2].to(var), n, mean, var)
        return F.normalize_eval(x, pm, pv, m.weight, m.bias, m.eps)

    def commit(self) -> None:
        """Apply the one update with the merged statistics (done on a clean exit)."""
        for (name, m), (_, flag) in zip(self.layers, self._flags, strict=True):
            m.track_running_stats = flag
            if name in self._stats:
                n, mean, var = self._stats[name]
                track_batch(m, mean, var, n)
            m.track_running_stats = False  # still inside the context
        self._stats = {}

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        try:
            if exc_type is None:
                self.commit()
        finally:
            for h in self._handles:
                h.remove()
            for m, flag in self._flags:
                m.track_running_stats = flag
            self._handles, self._flags = [], []


@contextlib.contextmanager
def accumulate(model: nn.Module, *, pooled: bool = False) -> Iterator[StatsAccumulator]:
    """``with bnkit.accumulate(model): ...k micro-batch forwards/backwards...`` — the
    running statistics are updated once, as for the concatenated batch
    (see :class:`StatsAccumulator`)."""
    with StatsAccumulator(model, pooled=pooled) as acc:
        yield acc


def _make(base: type, kind: str, rank: int) -> type:
    torch_cls = _family.TORCH[rank]
    name = f"{base.__name__.removesuffix('Base')}{rank}d"
    attrs = {"__doc__": base.__doc__, "__module__": __name__, "__qualname__": name}
    return _family.member(kind, rank)(type(name, (base, torch_cls), attrs))


BatchRenorm1d = _make(BatchRenormBase, "renorm", 1)
BatchRenorm2d = _make(BatchRenormBase, "renorm", 2)
BatchRenorm3d = _make(BatchRenormBase, "renorm", 3)
GhostBatchNorm1d = _make(GhostBatchNormBase, "ghost", 1)
GhostBatchNorm2d = _make(GhostBatchNormBase, "ghost", 2)
GhostBatchNorm3d = _make(GhostBatchNormBase, "ghost", 3)
