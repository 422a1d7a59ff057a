"""Look inside a checkpoint's BatchNorm layers: tables, flags, plots, comparisons.

A checkpoint may be a state_dict, a dict holding one under a common key (``model``,
``state_dict``, ``model_state_dict``, ``net``, ``ema``, ...), or a whole pickled model.
Loading uses ``torch.load(weights_only=True)`` first, which cannot run code from the file;
a whole pickled model needs ``weights_only=False``, which runs code from the file, so it is
done only when the caller says the file is trusted.
"""

from __future__ import annotations

import math
import os
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "LayerStats",
    "as_dict",
    "bn_layers",
    "compare",
    "find_state_dict",
    "format_compare",
    "format_table",
    "load_checkpoint",
    "plot_depth",
    "summarize",
]

_COMMON_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "net",
    "network",
    "ema",
    "model_ema",
    "module",
    "weights",
)
_NEAR_ZERO_VAR = 1e-8
_DEAD_WEIGHT = 1e-6


def load_checkpoint(path: str | os.PathLike[str], *, trust: bool = False) -> Any:
    """Load a checkpoint file, safely where possible.

    Raises ``FileNotFoundError`` for a missing file, ``ValueError`` for a corrupt one or one
    that needs ``trust=True`` (a pickled model: loading it runs code from the file).
    """
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"checkpoint {p}: is a directory, expected a file from torch.save")
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p}: no such file")
    try:
        with warnings.catch_warnings():  # torch warns on some broken files: one line is ours
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names the classes it refuses ("Unsupported global"); anything else (e.g.
        # "Unsupported operand" for bytes that are no pickle at all) is a broken file
        if "Unsupported global" not in str(exc):
            first = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
            raise ValueError(f"checkpoint {p}: corrupt or not a torch file ({first})") from exc
        if not trust:
            raise ValueError(
                f"checkpoint {p} holds pickled Python objects (a whole model, not just "
                "tensors), so it cannot be loaded with weights_only=True; loading it runs code "
                "from the file. If you trust it, pass --trust (trust=True)"
            ) from exc
    except Exception as exc:  # a broken file fails in many ways (IndexError, KeyError, ...)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ValueError(
            f"checkpoint {p}: corrupt or not a torch file ({type(exc).__name__}: {first})"
        ) from exc
    try:
        return torch.load(p, map_location="cpu", weights_only=False)
    except Exception as exc:  # any failure of an arbitrary pickle
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ValueError(
            f"checkpoint {p}: could not be unpickled ({type(exc).__name__}: {first})"
        ) from exc


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def find_state_dict(obj: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The state_dict inside ``obj`` and what else is known (``{"momentum": {...}}`` from a
    whole model, ``{"key": ...}`` where it was found)."""
    info: dict[str, Any] = {}
    if isinstance(obj, nn.Module):
        info["momentum"] = {
            n: m.momentum for n, m in obj.named_modules() if hasattr(m, "running_mean")
        }
        info["key"] = "<whole model>"
        return dict(obj.state_dict()), info
    if _is_state_dict(obj):
        return dict(obj), info
    if isinstance(obj, Mapping):
        for key in (*_COMMON_KEYS, *[k for k in obj if k not in _COMMON_KEYS]):
            inner = obj.get(key)
            if isinstance(inner, nn.Module) or _is_state_dict(inner):
                sd, inner_info = find_state_dict(inner)
                inner_info.setdefault("key", key)
                return sd, inner_info
    raise ValueError(
        "no state_dict found: expected a dict of tensors, a dict holding one under "
        f"{list(_COMMON_KEYS)}, or a whole model; got {type(obj).__name__}"
        + (f" with keys {list(obj)[:10]}" if isinstance(obj, Mapping) else "")
    )


@dataclass
class LayerStats:
    """One BatchNorm layer of a checkpoint, summarized."""

    name: str
    channels: int
    mean_mean: float
    mean_min: float
    mean_max: float
    var_mean: float
    var_min: float
    var_max: float
    num_batches_tracked: int | None
    weight_mean: float | None
    weight_min_abs: float | None
    bias_mean: float | None
    flags: list[str] = field(default_factory=list)


def bn_layers(sd: Mapping[str, Tensor]) -> list[str]:
    """Prefixes (layer names) that have both running_mean and running_var, in order."""
    names = []
    for k in sd:
        if k.endswith("running_mean"):
            prefix = k[: -len("running_mean")]
            if prefix + "running_var" in sd:
                names.append(prefix.rstrip("."))
    return names


def _f(t: Tensor) -> tuple[float, float, float]:
    t = t.double()
    return float(t.mean()), float(t.min()), float(t.max())


def _stored(sd: Mapping[str, Tensor], pre: str, name: str, flags: list[str]) -> Tensor | None:
    """The layer's ``name`` tensor as the model uses it: a pruned one
    (``torch.nn.utils.prune``: ``name_orig`` times ``name_mask``) with a flag; a
    parametrized one (``parametrizations.name.original``, whose function the checkpoint
    does not hold) flagged, its original not taken for the tensor."""
    t = sd.get(pre + name)
    if t is not None:
        return t.detach()
    orig, mask = sd.get(pre + name + "_orig"), sd.get(pre + name + "_mask")
    if orig is not None and mask is not None:
        kept = int(mask.count_nonzero())
        flags.append(f"{name} pruned ({kept} of {mask.numel()} kept)")
        return (orig * mask).detach()
    if pre + f"parametrizations.{name}.original" in sd:
        flags.append(f"{name} parametrized (its value is not in the checkpoint)")
    return None


def summarize(
    sd: Mapping[str, Tensor], momentum: Mapping[str, Any] | None = None
) -> list[LayerStats]:
    """A :class:`LayerStats` per BatchNorm layer, with flags for what looks wrong."""
    out = []
    for name in bn_layers(sd):
        pre = f"{name}." if name else ""
        rm, rv = sd[pre + "running_mean"].detach(), sd[pre + "running_var"].detach()
        flags: list[str] = []
        w, b = _stored(sd, pre, "weight", flags), _stored(sd, pre, "bias", flags)
        nbt = sd.get(pre + "num_batches_tracked")
        tensors = [t for t in (rm, rv, w, b) if t is not None]
        if any(not bool(torch.isfinite(t).all()) for t in tensors):
            flags.append("NaN/Inf")
        finite_rv = rv[torch.isfinite(rv)]
        if finite_rv.numel() and bool((finite_rv < _NEAR_ZERO_VAR).any()):
            flags.append(
                f"near-zero variance in {int((finite_rv < _NEAR_ZERO_VAR).sum())} channel(s)"
            )
        if bool((rv < 0).any()):
            flags.append("negative variance")
        if w is not None and bool((w.abs() < _DEAD_WEIGHT).any()):
            flags.append(f"dead channels (|weight| ~ 0): {int((w.abs() < _DEAD_WEIGHT).sum())}")
        if bool((rm == 0).all()) and bool((rv == 1).all()):
            flags.append("statistics at their initial values (never updated in training?)")
        elif nbt is not None and int(nbt) == 0:
            flags.append("num_batches_tracked is 0 but the statistics moved")
        mom = (momentum or {}).get(name)
        if mom is not None and mom > 0.5:
            flags.append(f"momentum {mom} > 0.5 (a Keras value? torch's is 1 - m)")
        mm, mmin, mmax = _f(rm)
        vm, vmin, vmax = _f(rv)
        out.append(
            LayerStats(
                name or "<root>",
                rm.numel(),
                mm,
                mmin,
                mmax,
                vm,
                vmin,
                vmax,
                None if nbt is None else int(nbt),
                None if w is None else float(w.double().mean()),
                None if w is None else float(w.double().abs().min()),
                None if b is None else float(b.double().mean()),
                flags,
            )
        )
    return out


def compare(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> list[dict[str, Any]]:
    """Per BatchNorm layer present in both: relative change of running mean and variance
    (``||b - a|| / ||a||``), and the change of ``num_batches_tracked``; layers only in one
    are listed as such."""
    la, lb = bn_layers(a), bn_layers(b)
    rows: list[dict[str, Any]] = []
    for name in la + [n for n in lb if n not in la]:
        pre = f"{name}." if name else ""
        if name not in la or name not in lb:
            rows.append({"layer": name, "only_in": "first" if name in la else "second"})
            continue
        row: dict[str, Any] = {"layer": name}
        for key in ("running_mean", "running_var"):
            x, y = a[pre + key].double(), b[pre + key].double()
            if x.shape != y.shape:
                row[key] = f"shape {tuple(x.shape)} -> {tuple(y.shape)}"
                continue
            row[key] = float((y - x).norm() / max(float(x.norm()), 1e-12))
        na, nb = a.get(pre + "num_batches_tracked"), b.get(pre + "num_batches_tracked")
        row["num_batches_tracked"] = None if na is None or nb is None else int(nb) - int(na)
        rows.append(row)
    return rows


def plot_depth(stats: list[LayerStats], path: str | os.PathLike[str], title: str = "") -> None:
    """Per-layer running mean and variance across depth, as a PNG (atomic write)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install 'bnkit[report]'") from exc
    if not stats:
        raise ValueError("no BatchNorm layer to plot")
    if not Path(path).parent.is_dir():
        raise FileNotFoundError(f"--plot {path}: the directory {Path(path).parent} does not exist")
    x = list(range(len(stats)))
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(6.0, 0.25 * len(stats)), 6), sharex=True)
    a1.fill_between(
        x,
        [s.mean_min for s in stats],
        [s.mean_max for s in stats],
        alpha=0.25,
        label="min..max over channels",
    )
    a1.plot(x, [s.mean_mean for s in stats], marker="o", label="mean over channels")
    a1.set(ylabel="running_mean", title=title or "BatchNorm running statistics across depth")
    a1.legend(fontsize=8)
    a2.fill_between(
        x, [max(s.var_min, 1e-12) for s in stats], [s.var_max for s in stats], alpha=0.25
    )
    a2.plot(x, [s.var_mean for s in stats], marker="o", color="C1")
    a2.set(ylabel="running_var", yscale="log", xlabel="BatchNorm layer (depth order)")
    a2.set_xticks(x, [s.name for s in stats], rotation=90, fontsize=7)
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def as_dict(stats: list[LayerStats]) -> list[dict[str, Any]]:
    """JSON-ready rows (NaN/Inf as None)."""

    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v

    return [{k: clean(v) for k, v in asdict(s).items()} for s in stats]


def format_table(stats: list[LayerStats]) -> str:
    """The ``bnkit inspect`` table: a row per BatchNorm layer, its flags, and a summary."""

    def num(v: float | None, w: int = 9) -> str:
        return f"{'-':>{w}}" if v is None else f"{v:>{w}.3g}"

    lines = [
        f"{'layer':<28} {'C':>5} {'mean(rm)':>9} {'min(rm)':>9} {'max(rm)':>9} {'mean(rv)':>9} "
        f"{'min(rv)':>9} {'max(rv)':>9} {'batches':>8} {'mean(w)':>8} {'mean(b)':>8}  flags"
    ]
    for s in stats:
        lines.append(
            f"{s.name[-28:]:<28} {s.channels:>5} {num(s.mean_mean)} {num(s.mean_min)} "
            f"{num(s.mean_max)} {num(s.var_mean)} {num(s.var_min)} {num(s.var_max)} "
            f"{'-' if s.num_batches_tracked is None else s.num_batches_tracked:>8} "
            f"{num(s.weight_mean, 8)} {num(s.bias_mean, 8)}  {'; '.join(s.flags)}"
        )
    flagged = sum(1 for s in stats if s.flags)
    lines.append(f"{len(stats)} BatchNorm layer(s), {flagged} flagged")
    return "\n".join(lines)


def format_compare(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`compare` as text, one layer a line."""
    lines = []
    for row in rows:
        if "only_in" in row:
            lines.append(f"  {row['layer']}: only in the {row['only_in']} checkpoint")
            continue
        rm, rv = (
            f"{v:.3g}" if isinstance(v, float) else str(v)
            for v in (row["running_mean"], row["running_var"])
        )
        lines.append(
            f"  {row['layer']:<28} mean {rm:>10} var {rv:>10} batches {row['num_batches_tracked']}"
        )
    return "\n".join(lines)
