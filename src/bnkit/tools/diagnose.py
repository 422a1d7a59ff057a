"""What is wrong with this model's BatchNorm: findings with severity, layer, evidence, fix.

:func:`diagnose` works on a deep copy of the model (the model itself is never run, so its
running statistics do not move) and checks:

* inference in training mode: each of a few samples is run alone and inside the batch; the
  first module (in execution order) whose output for a sample depends on the rest of the
  batch is named, and a train-mode BatchNorm is told apart from float noise by a relative
  tolerance far above float32 rounding;
* the train/eval gap per layer: the batch's statistics against the running statistics
  (variance ratio, standardized mean shift), naming the first layer where they part;
* non-finite or degenerate running statistics, and momenta that look like Keras values;
* batches that will hit "one value per channel": a dataset length that leaves a last batch
  of 1 for the loader's batch size (per rank, with a DistributedSampler's split);
* parameters frozen while the statistics still move (an audit over a few train steps).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bnkit.nn import functional as F
from bnkit.nn import is_batchnorm
from bnkit.tools._seeded import seeded
from bnkit.tools.freeze import is_stats_frozen

__all__ = ["Finding", "diagnose"]

# Batch dependence is judged in float64 (a float64 copy of the model on the float64 batch):
# float32 convolutions pick algorithms by batch size, and their rounding differences, ~1e-7,
# grow through deep models to 1e-4 and more; in float64 they are ~1e-16 and grow to ~1e-12,
# while a module that really mixes samples differs by O(1e-3..1) in either precision.
_NOISE = {torch.float64: 1e-7, torch.float32: 1e-4}
_VAR_RATIO = 2.0
_MEAN_SHIFT = 1.0


@dataclass
class Finding:
    """One problem: ``severity`` is "error" or "warning"."""

    severity: str
    kind: str
    layer: str
    evidence: str
    fix: str

    def __str__(self) -> str:
        where = self.layer or "<model>"
        return f"[{self.severity}] {self.kind} at {where}: {self.evidence}. Fix: {self.fix}"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _first_tensor(out: Any) -> Tensor | None:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return None


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if not list(m.children()) or is_batchnorm(m)]


class _Recorder:
    """Records each leaf module's output (in call order), and which module was running."""

    def __init__(self, model: nn.Module) -> None:
        self.outputs: dict[str, Tensor] = {}
        self.order: list[str] = []
        self.current: list[str] = []
        self.handles = []
        for name, m in _leaves(model):
            self.handles.append(m.register_forward_pre_hook(self._pre(name)))
            self.handles.append(m.register_forward_hook(self._post(name)))

    def _pre(self, name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: Any) -> None:
            self.current.append(name)

        return hook

    def _post(self, name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            self.current.pop()
            t = _first_tensor(out)
            if t is not None and name not in self.outputs:
                self.outputs[name] = t.detach()
                self.order.append(name)

        return hook

    def reset(self) -> None:
        self.outputs, self.order, self.current = {}, [], []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _in_float64(
    model: nn.Module, batch: Tensor, run: Callable[[nn.Module, Tensor], Any]
) -> tuple[nn.Module, Tensor]:
    """A float64 copy of the model and the batch, when the model runs so (floating
    batches only); else a plain copy and the batch as it is (float32 noise level)."""
    if not batch.is_floating_point() or batch.device.type == "mps":
        return copy.deepcopy(model), batch
    work, x = copy.deepcopy(model).double(), batch.double()
    try:
        with torch.no_grad(), seeded():
            run(copy.deepcopy(work), x[:2])
    except Exception:  # e.g. a model that builds float32 tensors inside its forward
        return copy.deepcopy(model), batch
    return work, x


def _check_batch_invariance(
    model: nn.Module, batch: Tensor, run: Callable[[nn.Module, Tensor], Any], samples: int
) -> list[Finding]:
    work, batch = _in_float64(model, batch, run)
    noise = _NOISE[torch.float64] if batch.dtype == torch.float64 else _NOISE[torch.float32]
    rec = _Recorder(work)
    findings: list[Finding] = []
    failure: tuple[str, Exception] | None = None
    try:
        with torch.no_grad():
            # every forward under one random state: a model that draws random numbers in
            # eval (sampled attention) compares its sample with its batch, not two draws
            with seeded():
                run(work, batch)
            full = dict(rec.outputs)
            order = list(rec.order)
            n = batch.shape[0]
            worst: dict[str, float] = {}
            for i in range(min(samples, n)):
                rec.reset()
                try:
                    with seeded():
                        run(work, batch[i : i + 1])
                except ValueError as exc:  # compare what ran before the failing layer
                    failure = (rec.current[-1] if rec.current else "", exc)
                for name in rec.order:
                    a, b = full.get(name), rec.outputs.get(name)
                    if a is None or b is None or a.dim() == 0 or a.shape[0] != n:
                        continue
                    ref = a[i : i + 1]
                    if ref.shape != b.shape:
                        continue
                    scale = max(ref.abs().max().item(), 1e-12)
                    rel = (ref.double() - b.double()).abs().max().item() / scale
                    worst[name] = max(worst.get(name, 0.0), rel)
                if failure is not None:
                    break
    finally:
        rec.remove()
    for name in order:
        rel = worst.get(name, 0.0)
        if rel > noise or not math.isfinite(rel):
            mod = work.get_submodule(name) if name else work
            if is_batchnorm(mod) and mod.training:
                fix = (
                    "call model.eval() before inference: a train-mode BatchNorm normalizes "
                    "each sample with the statistics of the rest of its batch"
                )
                kind = "inference in training mode"
            else:
                fix = (
                    "this module mixes samples of a batch; if that is not intended, look for "
                    "train-mode normalization or batch-wise operations in it"
                )
                kind = "output depends on the batch"
            findings.append(
                Finding(
                    "error",
                    kind,
                    name,
                    f"a sample's output differs alone vs inside its batch of {batch.shape[0]} by "
                    f"{rel:.2e} (relative, compared in {str(batch.dtype)[6:]}, where float "
                    f"noise is below {noise:g})",
                    fix,
                )
            )
            return findings
    if failure is not None:
        findings.append(
            Finding(
                "error",
                "inference in training mode",
                failure[0],
                f"a single sample fails: {failure[1]}",
                "call model.eval() before inference (train-mode BatchNorm cannot normalize one "
                "value per channel)",
            )
        )
    return findings


def _bn_inputs(
    model: nn.Module, batch: Tensor, run: Callable[[nn.Module, Tensor], Any]
) -> dict[str, Tensor]:
    work = copy.deepcopy(model).eval()
    captured: dict[str, Tensor] = {}
    handles = []
    for name, m in work.named_modules():
        if is_batchnorm(m):

            def hook(mod: nn.Module, args: Any, name: str = name) -> None:
                captured.setdefault(name, args[0].detach())

            handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad(), seeded():
            run(work, batch)
    finally:
        for h in handles:
            h.remove()
    return captured


def _check_gap(model: nn.Module, inputs: dict[str, Tensor]) -> list[Finding]:
    mods = dict(model.named_modules())
    for name, x in inputs.items():
        m = mods[name]
        rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
        if rm is None or rv is None or x.numel() // max(x.shape[1], 1) < 2:
            continue
        if not (torch.isfinite(rm).all() and torch.isfinite(rv).all()):
            continue  # reported as non-finite statistics
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            return [
                Finding(
                    "error",
                    "non-finite input",
                    name,
                    f"the batch reaching this layer holds {bad} inf/NaN value(s) of "
                    f"{x.numel()}: in training mode they make this channel's statistics "
                    "(and running statistics) NaN, as in torch",
                    "find where the inf/NaN first appears (a diverging loss, a division by "
                    "zero, bad data); bnkit.StatsGuard keeps such batches out of the running "
                    "statistics meanwhile",
                )
            ]
        mean, var = F.batch_stats(x)
        rv64 = rv.double().clamp_min(1e-12)
        ratio = (var / rv64).median().item()
        shift = ((mean - rm.double()).abs() / torch.sqrt(rv64 + m.eps)).mean().item()
        if not (1 / _VAR_RATIO <= ratio <= _VAR_RATIO) or shift > _MEAN_SHIFT:
            return [
                Finding(
                    "warning",
                    "train/eval gap",
                    name,
                    f"on this data the batch variance is {ratio:.3g}x the running variance "
                    f"(median over channels) and the mean is {shift:.3g} running std away (mean "
                    "over channels): eval-mode outputs from here on differ from what training saw",
                    "recalibrate the statistics on representative data (bnkit.recalibrate); if it "
                    "was trained with small batches, use larger ones, Batch Renormalization or "
                    "GroupNorm; if the data differs from training, recalibrate on it",
                )
            ]
    return []


def _check_stats(model: nn.Module) -> list[Finding]:
    out = []
    for name, m in model.named_modules():
        if not is_batchnorm(m):
            continue
        rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
        if rm is not None and rv is not None:
            if not (torch.isfinite(rm).all() and torch.isfinite(rv).all()):
                out.append(
                    Finding(
                        "error",
                        "non-finite running statistics",
                        name,
                        "running_mean/running_var hold NaN or Inf",
                        "recalibrate (bnkit.recalibrate); in training, guard updates "
                        "with bnkit.StatsGuard (AMP overflow poisons them)",
                    )
                )
            elif bool((rv < 1e-8).any()):
                out.append(
                    Finding(
                        "warning",
                        "degenerate running variance",
                        name,
                        f"{int((rv < 1e-8).sum())} channel(s) with running_var < 1e-8",
                        "dead or constant channels: check the preceding layer, or recalibrate",
                    )
                )
        mom = getattr(m, "momentum", None)
        if mom is not None and mom > 0.5:
            out.append(
                Finding(
                    "warning",
                    "Keras-looking momentum",
                    name,
                    f"momentum={mom}: torch weights the new batch by momentum",
                    f"use {1 - mom:.3g} (torch's momentum is 1 - Keras's)",
                )
            )
    return out


def _check_one_value(
    inputs: dict[str, Tensor],
    dataset_len: int | None,
    batch_size: int | None,
    drop_last: bool,
    world_size: int,
) -> list[Finding]:
    if dataset_len is None or batch_size is None or drop_last:
        return []
    per_rank = math.ceil(dataset_len / world_size)
    last = per_rank % batch_size
    if last != 1:
        return []
    vulnerable = [
        n
        for n, x in inputs.items()
        if x.dim() >= 2 and x.numel() // max(x.shape[0] * x.shape[1], 1) == 1
    ]
    if not vulnerable:
        return []
    where = f" per rank (world size {world_size})" if world_size > 1 else ""
    return [
        Finding(
            "error",
            "one value per channel",
            vulnerable[0],
            f"{dataset_len} samples with batch size {batch_size} leave a last batch of 1{where}; "
            f"{len(vulnerable)} BatchNorm layer(s) see one value per channel for such a batch "
            "and raise in training",
            "set drop_last=True on the DataLoader, or choose a batch size that does not leave 1",
        )
    ]


def _check_frozen_audit(
    model: nn.Module, batch: Tensor, run: Callable[[nn.Module, Tensor], Any], steps: int
) -> list[Finding]:
    if steps <= 0:
        return []
    work = copy.deepcopy(model)
    bns = {n: m for n, m in work.named_modules() if is_batchnorm(m)}
    suspects = {
        n: m
        for n, m in bns.items()
        if list(m.parameters(recurse=False))
        and not any(p.requires_grad for p in m.parameters(recurse=False))
        and m.running_mean is not None
        and not is_stats_frozen(m)
    }
    if not suspects:
        return []
    before = {n: m.running_mean.clone() for n, m in suspects.items()}
    work.train()
    with torch.no_grad(), seeded():  # the caller's random state is left as it was
        for _ in range(steps):
            run(work, batch)
    moved = [n for n, m in suspects.items() if not torch.equal(m.running_mean, before[n])]
    if not moved:
        return []
    return [
        Finding(
            "warning",
            "statistics move while parameters are frozen",
            moved[0],
            f"{len(moved)} BatchNorm layer(s) with requires_grad=False parameters still update "
            f"their running statistics in train mode (audited over {steps} step(s))",
            "freeze them with bnkit.freeze(model, layers=...), which survives model.train()",
        )
    ]


def diagnose(
    model: nn.Module,
    batch: Tensor,
    *,
    forward: Callable[[nn.Module, Tensor], Any] | None = None,
    loader: Any = None,
    dataset_len: int | None = None,
    batch_size: int | None = None,
    world_size: int = 1,
    samples: int = 4,
    audit_steps: int = 2,
) -> list[Finding]:
    """Findings about the BatchNorm layers of ``model`` on ``batch``; empty when healthy.

    Args:
        model: never run itself (a copy is), so nothing in it changes.
        batch: a representative input batch (several samples).
        forward: ``forward(model, batch)`` when the model is not called as ``model(batch)``.
        loader: a DataLoader, to read ``len(dataset)``, ``batch_size`` and ``drop_last``;
            or give ``dataset_len`` and ``batch_size``.
        world_size: number of data-parallel ranks (a DistributedSampler splits the dataset).
        samples: how many samples to run alone in the batch-invariance check.
        audit_steps: train-mode steps of the frozen-parameters audit (0 to skip).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"diagnose: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(batch, Tensor) or batch.dim() < 1 or batch.shape[0] < 2:
        raise ValueError(
            "diagnose: batch must be a tensor with at least 2 samples in dim 0, got "
            f"{type(batch).__name__}{tuple(getattr(batch, 'shape', ()))}"
        )
    if not any(is_batchnorm(m) for m in model.modules()):
        raise ValueError(f"diagnose: no BatchNorm layer in {type(model).__name__}")
    run = forward or (lambda m, x: m(x))
    drop_last = False
    if loader is not None:
        dataset_len = len(loader.dataset)
        batch_size = loader.batch_size
        drop_last = bool(getattr(loader, "drop_last", False))
    findings = _check_stats(model)
    findings += _check_batch_invariance(model, batch, run, samples)
    inputs = _bn_inputs(model, batch, run)
    findings += _check_gap(model, inputs)
    findings += _check_one_value(inputs, dataset_len, batch_size, drop_last, world_size)
    findings += _check_frozen_audit(model, batch, run, audit_steps)
    return findings
