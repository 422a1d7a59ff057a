"""SyncBatchNorm on torch.distributed: one set of statistics across every process.

Any backend that implements ``all_gather`` and ``all_reduce`` works (gloo on CPU, NCCL on
GPU). Forward: one packed ``all_gather`` of ``[layer id, call index, C, count, mean(C),
var(C)]`` per call, merged on every rank in rank order with Chan's pairwise formula (so
every rank computes bit-identical statistics, and no ``E[x^2] - E[x]^2`` cancellation);
the header lets ranks that disagree (a skipped call, a different layer or channel count)
fail with an error that names the layer and call index instead of hanging, and a
``timeout`` bounds the wait. Backward: one ``all_reduce`` of ``[sum(g), sum(g * xhat)]``.
Uneven and empty per-rank batches are exact: each rank contributes its count.

Without an initialized process group (or with world size 1) it is a plain BatchNorm.
"""

from __future__ import annotations

import datetime
import itertools
import weakref
import zlib
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from bnkit.nn import functional as F
from bnkit.nn._family import member
from bnkit.nn._running import track_batch
from bnkit.nn.batchnorm import BatchNormBase

__all__ = ["SyncBatchNorm", "check_consistency", "resync"]

_HEADER = 4  # layer id, call index, channels, count


def _group_size(group: Any) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size(group))


class _SyncNorm(torch.autograd.Function):
    """Training-mode normalization with statistics of the union of every rank's batch."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        module: SyncBatchNorm,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c = x.shape[1]
        n_local = x.numel() // c if c else 0
        acc = torch.float64
        if n_local > 0:
            mean, var = F.batch_stats(x)
        else:
            mean = torch.zeros(c, dtype=acc, device=x.device)
            var = torch.zeros(c, dtype=acc, device=x.device)
        packed = torch.empty(_HEADER + 2 * c, dtype=acc, device=x.device)
        packed[0] = float(module._layer_id)
        packed[1] = float(module._calls)
        packed[2] = float(c)
        packed[3] = float(n_local)
        packed[_HEADER : _HEADER + c] = mean
        packed[_HEADER + c :] = var
        gathered = module._gather(packed)
        count: int = 0
        g_mean, g_var = torch.zeros_like(mean), torch.zeros_like(var)
        for part in gathered:  # rank order: the same result on every rank
            n_r = int(part[3].item())
            if n_r > 0:
                m_r, v_r = part[_HEADER : _HEADER + c], part[_HEADER + c :]
                cnt, g_mean, g_var = F.merge_stats(count, g_mean, g_var, n_r, m_r, v_r)
                count = int(cnt)
        if count == 1:
            raise ValueError(
                f"{module._where()}: Expected more than 1 value per channel when training, got "
                "1 value per channel over all ranks"
            )
        count_t = torch.tensor(count, device=x.device)
        if count == 0 or n_local == 0:
            y = torch.empty_like(x)
        else:
            y = F.normalize_eval(x, g_mean, g_var, weight, bias, eps)
        invstd = F.inv_std(g_var, eps)
        ctx.save_for_backward(x, weight, g_mean, invstd)
        ctx.count = count
        ctx.module = module
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(g_mean, g_var, count_t)
        return y, g_mean, g_var, count_t

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, *_: Any) -> Any:  # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        module: SyncBatchNorm = ctx.module
        needs = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            ctx.needs_input_grad[2] and ctx.has_bias,
        )
        if ctx.count == 0:
            gw = None if weight is None else torch.zeros_like(weight)
            return torch.zeros_like(x), gw, (gw if ctx.has_bias else None), None, None
        gx, gw, gb = F.train_backward(
            grad_out, x, weight, mean, invstd, needs, n=ctx.count, reduce=module._all_reduce
        )
        return gx, gw, gb, None, None


_serial = itertools.count()
# sync_name -> the layer that last ran under it, to catch two layers sharing one name
_by_name: weakref.WeakValueDictionary[str, SyncBatchNorm] = weakref.WeakValueDictionary()


@member("sync", None)
class SyncBatchNorm(BatchNormBase):
    r"""BatchNorm whose training statistics are those of every process's batch together.

    Same constructor as :class:`torch.nn.SyncBatchNorm` (``process_group`` after ``dtype``),
    plus ``timeout``: how long a forward waits for the other ranks before raising an error
    that names the layer and call index, and ``sync_name``: what the ranks compare to make
    sure they are merging the same layer (default: ``SyncBatchNorm#k(C)``, k counting the
    SyncBatchNorms this process has built, which agrees across ranks that build their
    models the same way; ``convert(to="sync")`` uses the module's path). Two layers of one
    process that run under one name raise an error.

    It is a ``torch.nn.modules.batchnorm._BatchNorm`` (torch's helpers see a BatchNorm) but
    deliberately not a ``torch.nn.SyncBatchNorm``: DistributedDataParallel refuses that
    class on CPU ("SyncBatchNorm layers only work with GPU modules"), and this one is meant
    to work there.

    Works on CPU (gloo) as well as GPU (NCCL), with equal, uneven or empty per-rank
    batches; accepts 2D to 5D input. The forward output, input gradient and running
    statistics equal those of one BatchNorm on the concatenated global batch; weight/bias
    gradients are each rank's share (DDP averages them).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        timeout: float = 300.0,
        sync_name: str | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.process_group = process_group
        self.timeout = timeout
        self.sync_name = sync_name or f"SyncBatchNorm#{next(_serial)}({num_features})"
        self._calls = 0

    @property
    def _layer_id(self) -> int:
        return zlib.crc32(self.sync_name.encode())

    def _where(self) -> str:
        return f"SyncBatchNorm {self.sync_name!r} call #{self._calls}"

    def _gather(self, packed: Tensor) -> list[Tensor]:
        world = _group_size(self.process_group)
        parts = [torch.empty_like(packed) for _ in range(world)]
        try:
            work = dist.all_gather(parts, packed, group=self.process_group, async_op=True)
            assert work is not None
            work.wait(timeout=datetime.timedelta(seconds=self.timeout))
        except RuntimeError as exc:
            raise RuntimeError(
                f"{self._where()}: the ranks did not all reach this call with the same shape "
                f"within {self.timeout:g} s (a rank skipped a BatchNorm call, or its input has "
                f"another channel count): {exc}"
            ) from exc
        mine = packed[:_HEADER].tolist()
        for r, part in enumerate(parts):
            theirs = part[:_HEADER].tolist()
            if theirs[:3] != mine[:3]:
                raise RuntimeError(
                    f"{self._where()} on this rank meets rank {r} at layer id "
                    f"{int(theirs[0])} call #{int(theirs[1])} with {int(theirs[2])} channels "
                    f"(this layer: id {int(mine[0])}, {int(mine[2])} channels): the ranks run "
                    "different BatchNorm calls (a skipped call, or a different model)"
                )
        return parts

    def _all_reduce(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        packed = torch.cat([a, b])
        work = dist.all_reduce(packed, group=self.process_group, async_op=True)
        assert work is not None
        work.wait(timeout=datetime.timedelta(seconds=self.timeout))
        return packed[: a.numel()], packed[a.numel() :]

    def _check_name(self) -> None:
        other = _by_name.get(self.sync_name)
        if other is not None and other is not self:
            raise RuntimeError(
                f"{self._where()}: another SyncBatchNorm of this process already runs as "
                f"{self.sync_name!r}; the ranks could merge the wrong layers. Give each "
                "layer its own sync_name (convert(model, to='sync') names them by path)"
            )
        _by_name[self.sync_name] = self

    def forward(self, input: Tensor) -> Tensor:
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        if not use_batch or _group_size(self.process_group) == 1:
            return super().forward(input)
        # the global batch may hold more than one value per channel: checked after the merge
        self._validate(input, False)
        F.check_eps(self.eps, True, self._where())
        self._check_name()
        self._calls += 1
        y, mean, var, count_t = _SyncNorm.apply(input, self.weight, self.bias, self.eps, self)
        if self.training:
            track_batch(self, mean, var, int(count_t))
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", sync_name={self.sync_name!r}"


def _sync_layers(model: torch.nn.Module) -> list[tuple[str, Any]]:
    return [
        (n, m) for n, m in model.named_modules() if getattr(m, "running_mean", None) is not None
    ]


def check_consistency(model: torch.nn.Module, group: Any = None, atol: float = 0.0) -> list[str]:
    """Names of BatchNorm layers whose running statistics differ between ranks (all
    ranks get the same list). One all_gather of every layer's statistics."""
    layers = _sync_layers(model)
    if not layers or _group_size(group) == 1:
        return []
    flat = torch.cat(
        [
            torch.cat(
                [
                    m.running_mean.double().flatten(),
                    m.running_var.double().flatten(),
                ]
            )
            for _, m in layers
        ]
    )
    parts = [torch.empty_like(flat) for _ in range(_group_size(group))]
    dist.all_gather(parts, flat, group=group)
    bad, offset = [], 0
    for name, m in layers:
        size = 2 * m.running_mean.numel()
        ref = parts[0][offset : offset + size]
        if any((p[offset : offset + size] - ref).abs().max().item() > atol for p in parts[1:]):
            bad.append(name)
        offset += size
    return bad


def resync(model: torch.nn.Module, src: int = 0, group: Any = None) -> None:
    """Copy every BatchNorm buffer (running statistics, counter) from rank ``src`` to all."""
    if _group_size(group) == 1:
        return
    for _, m in _sync_layers(model):
        for buf in m.buffers(recurse=False):
            dist.broadcast(buf, src=src, group=group)
