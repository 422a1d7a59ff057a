"""A conformance checker for anyone's BatchNorm: where does it depart from torch, and why?

:func:`conform` builds the implementation, finds its parameters and statistics
(:mod:`.adapter`), runs one probe per property of torch's semantics against float64
references (:mod:`.probes`, :mod:`bnkit.testing`), and names the classic mistakes by their
numerical signature (:mod:`.mistakes`). A property it cannot probe is reported as
"skipped" with the reason, never as a pass (:mod:`.report`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bnkit.testing import reference_train
from bnkit.tools.conform.adapter import Adapter, C
from bnkit.tools.conform.probes import Checker, probe_data
from bnkit.tools.conform.report import PROBES, ConformReport, Probe

__all__ = ["PROBES", "ConformReport", "Probe", "closed_form", "conform"]


def closed_form(
    x: Tensor,
    w: Tensor | None,
    b: Tensor | None,
    eps: float,
    unbiased: bool = False,
    eps_outside: bool = False,
    dims: tuple[int, ...] | None = None,
) -> Tensor:
    """Deprecated: :func:`bnkit.testing.reference_train` (its first output)."""
    return reference_train(x, w, b, eps, unbiased=unbiased, eps_outside=eps_outside, dims=dims)[0]


def conform(
    target: Callable[..., Any],
    *,
    momentum_convention: str = "auto",
    attrs: dict[str, str] | None = None,
    rank: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> ConformReport:
    """Probe a BatchNorm implementation against torch's semantics.

    Args:
        target: a class or factory; called as ``target(num_features, **kw)`` where ``kw`` has
            ``momentum``/``eps``/``num_dims`` when its signature takes them.
        momentum_convention: ``"torch"``, ``"keras"``, or ``"auto"`` (detected).
        attrs: names of the implementation's tensors when they are not guessable, e.g.
            ``{"running_mean": "mu_hat", "weight": "g"}``.
        rank: input rank to probe with (2 for BatchNorm1d-like, 4 default, 5 for 3d).
        dtype: float64 (default, tight tolerances) or float32 when it cannot run in float64.
    """
    if momentum_convention not in ("auto", "torch", "keras"):
        raise ValueError(
            f"momentum_convention must be auto, torch or keras, got {momentum_convention!r}"
        )
    if rank is not None and rank not in (2, 3, 4, 5):
        raise ValueError(f"rank must be 2, 3, 4 or 5, got {rank}")
    name = getattr(target, "__qualname__", repr(target))
    report = ConformReport(f"{getattr(target, '__module__', '?')}.{name}")
    conv = "torch" if momentum_convention == "auto" else momentum_convention
    report.momentum_convention = conv
    adapter = Adapter(target, rank, attrs or {}, conv)
    try:
        probe_module = adapter.build()
    except Exception as exc:
        report.probes.append(
            Probe(
                "construction",
                "construction",
                "fail",
                None,
                f"could not build it with {C} channels: {exc}",
            )
        )
        return report
    if rank is None:
        for r in (4, 2, 3, 5):
            try:
                probe_module.to(dtype).train()(probe_data(r, 0).to(dtype))
                adapter.rank = r
                break
            except Exception:
                continue
        else:
            report.probes.append(
                Probe(
                    "input_rank",
                    "input rank",
                    "fail",
                    None,
                    "it runs on none of 2D..5D input with 4 channels; pass "
                    "rank= if it needs a specific one",
                )
            )
            return report
    else:
        try:
            probe_module.to(dtype).train()(probe_data(rank, 0).to(dtype))
        except Exception as exc:
            # a rank the layer refuses is a wrong argument, not a departure from torch
            raise ValueError(
                f"rank={rank}: {name} does not run on {rank}D input ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); leave rank out to find one "
                "it accepts"
            ) from exc
    checker = Checker(adapter, report, dtype)
    try:
        checker.run()
    except Exception as exc:  # an implementation may fail on a probe's input
        report.probes.append(
            Probe("probing", "probing", "fail", None, f"{type(exc).__name__}: {exc}")
        )
    return report
