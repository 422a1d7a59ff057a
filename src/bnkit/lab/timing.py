"""Side-by-side timing of bnkit's BatchNorm and torch's, used by benchmarks/ and the report.

For every shape and memory format: training forward, training forward+backward and eval
forward, through the public modules (autograd and output allocation included), median
time after warm-up (the two timed in turn within every repeat), ratio bnkit/torch (< 1
means bnkit is faster), effective bandwidth against the minimal traffic, and max abs
error vs a float64 closed form: of the output (train fwd; eval fwd, with each module's
own running statistics) or of the input gradient (train fwd+bwd), and the error ratio
bnkit/torch (the worse of the timed data and ReLU-like data; <= 1: as accurate as torch).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from bnkit.testing import reference_eval, reference_train
from bnkit.tools.convert import convert

__all__ = [
    "SHAPES",
    "QUICK_SHAPES",
    "compare",
    "evict",
    "interleaved_times",
    "paired_median_times",
    "print_table",
]

SHAPES: list[tuple[int, ...]] = [
    (32, 64, 56, 56),
    (128, 64, 32, 32),
    (256, 256, 14, 14),
    (64, 512, 7, 7),
    (4096, 1024),
]
QUICK_SHAPES: list[tuple[int, ...]] = [(8, 64, 28, 28), (64, 512, 7, 7), (1024, 256)]


def interleaved_times(
    steps: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 3,
    clock: Callable[[], float] = time.perf_counter,
    before: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """Wall time of each step in every repeat, the steps timed in turn within a repeat
    (the order alternating between repeats), so that a slow phase of the machine falls on
    all of them alike instead of on whichever ran during it.

    Each timed call follows an untimed call of the same step: a step leaves the cache
    full of its own dirty output lines, and without it the next step would pay for
    writing them back (a library that writes its large outputs with non-temporal stores
    leaves none, and would pay for the other's). So each step is timed in its own steady
    state, paying for its own write-backs, as in a loop that calls only it. ``clock`` is
    there for the test that checks this protocol with a fake clock.

    ``before``, when given, is called instead of that untimed call (e.g. :func:`evict`):
    each step then starts from caches full of something else, as a layer does in a
    network, where the layers before and after it use the cache in between.
    """
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    names = list(steps)
    for r in range(repeats):
        for k in names if r % 2 == 0 else names[::-1]:
            if before is None:
                steps[k]()
            else:
                before()
            t0 = clock()
            steps[k]()
            times[k].append(clock() - t0)
    return times


def paired_median_times(
    steps: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 3,
    before: Callable[[], object] | None = None,
) -> dict[str, float]:
    """Median of :func:`interleaved_times` for each step."""
    times = interleaved_times(steps, repeats, warmup, before=before)
    return {k: statistics.median(v) for k, v in times.items()}


def evict(nbytes: int = 128 << 20) -> Callable[[], None]:
    """A callable that writes ``nbytes`` (several times any last-level cache) of its own
    buffer, leaving the caches full of those lines: :func:`interleaved_times`'s
    ``before`` for a cold-cache measurement."""
    buf = torch.empty(max(nbytes // 4, 1), dtype=torch.float32)

    def run() -> None:
        buf.add_(1.0)

    return run


def _modules(shape: tuple[int, ...]) -> tuple[Any, Any]:
    c = shape[1]
    t = torch.nn.BatchNorm2d(c) if len(shape) == 4 else torch.nn.BatchNorm1d(c)
    with torch.no_grad():
        t.weight.uniform_(0.5, 1.5)
        t.bias.uniform_(-1, 1)
    seq: Any = convert(torch.nn.Sequential(t), to="bnkit")
    return t, seq[0]


def _error(case: str, m: Any, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Max |result - float64 closed form| of module m for the case: the output (train
    fwd; eval fwd, with m's own running statistics) or the input gradient (fwd+bwd)."""
    if case == "eval fwd":
        m.eval()
        with torch.no_grad():
            ref = reference_eval(x, m.running_mean, m.running_var, m.weight, m.bias, m.eps)
            return float((m(x).double() - ref).abs().max().item())
    m.train()
    if case == "train fwd":
        with torch.no_grad():
            ref, _, _ = reference_train(x, m.weight, m.bias, m.eps)
            return float((m(x).double() - ref).abs().max().item())
    xi = x.detach().requires_grad_()
    (gx,) = torch.autograd.grad(m(xi), xi, grad)
    xd = x.detach().double().requires_grad_()
    ref, _, _ = reference_train(xd, m.weight, m.bias, m.eps)
    (gref,) = torch.autograd.grad(ref, xd, grad.double())
    return float((gx.double() - gref).abs().max().item())


def compare(
    shapes: list[tuple[int, ...]],
    repeats: int = 20,
    formats: tuple[str, ...] = ("contiguous", "channels_last"),
    cold: bool = False,
) -> list[dict[str, Any]]:
    """Time torch's and bnkit's modules on each shape, format and case; one row each.
    ``cold``: every timed call starts from caches full of other data (:func:`evict`)
    instead of following an untimed call of the same step."""
    before = evict() if cold else None
    rows: list[dict[str, Any]] = []
    for shape in shapes:
        for cl in (False, True):
            if (cl and len(shape) != 4) or ("channels_last" if cl else "contiguous") not in formats:
                continue
            g = torch.Generator().manual_seed(0)
            x = torch.randn(shape, generator=g) * 3 + 5
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            grad = torch.randn(shape, generator=g)
            if cl:
                grad = grad.contiguous(memory_format=torch.channels_last)
            t, b = _modules(shape)
            nbytes = x.numel() * x.element_size()
            for case in ("train fwd", "train fwd+bwd", "eval fwd"):
                steps: dict[str, Callable[[], object]] = {}
                for name, m in (("torch", t), ("bnkit", b)):
                    m.train(case != "eval fwd")
                    xi = x.detach().requires_grad_(case == "train fwd+bwd")

                    def step(
                        m: torch.nn.Module = m,
                        xi: torch.Tensor = xi,
                        case: str = case,
                        grad: torch.Tensor = grad,
                    ) -> None:
                        y = m(xi)
                        if case == "train fwd+bwd":
                            y.backward(grad)
                            # as in training: the input's gradient goes on to the layer
                            # below and is freed, nothing accumulates across steps
                            xi.grad = None
                            for p in m.parameters():
                                p.grad = None

                    steps[name] = step
                if case == "eval fwd":
                    # the same traffic with no arithmetic: what memory allows
                    steps["copy"] = x.clone
                secs = paired_median_times(steps, repeats, before=before)
                # minimal traffic: fwd reads x, writes y (+1 read for batch stats);
                # fwd+bwd additionally reads x, grad and writes grad_x.
                traffic = {"train fwd": 3, "train fwd+bwd": 6, "eval fwd": 2}[case] * nbytes
                res = {}
                for name, m in (("torch", t), ("bnkit", b)):
                    err = _error(case, m, x, grad)
                    res[name] = (secs[name], traffic / secs[name] / 1e9, err)
                # accuracy on the timed (offset) data and on ReLU-like data (non-negative,
                # half zeros: what follows every ReLU), as the worse ratio to torch's
                relu = torch.relu(torch.randn(shape, generator=g)) * 2
                if cl:
                    relu = relu.contiguous(memory_format=torch.channels_last)
                err_ratio = max(
                    res["bnkit"][2] / max(res["torch"][2], 1e-30),
                    _error(case, b, relu, grad) / max(_error(case, t, relu, grad), 1e-30),
                )
                rows.append(
                    {
                        "shape": shape,
                        "format": "channels_last" if cl else "contiguous",
                        "case": case,
                        "torch_ms": res["torch"][0] * 1e3,
                        "bnkit_ms": res["bnkit"][0] * 1e3,
                        "ratio": res["bnkit"][0] / res["torch"][0],
                        "torch_GBps": res["torch"][1],
                        "bnkit_GBps": res["bnkit"][1],
                        "torch_err": res["torch"][2],
                        "bnkit_err": res["bnkit"][2],
                        "err_ratio": err_ratio,
                        "copy_GBps": traffic / secs["copy"] / 1e9 if "copy" in secs else None,
                    }
                )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    """Print the rows and the geometric-mean ratio of each case. ``copy GB/s`` (eval rows):
    ``x.clone()`` timed in turn with the two, the same bytes read and written with no
    arithmetic: an eval forward near it is bound by memory, whichever library runs it."""
    head = (
        f"{'shape':<20} {'format':<14} {'case':<14} {'torch ms':>9} {'bnkit ms':>9} "
        f"{'ratio':>6} {'torch GB/s':>10} {'bnkit GB/s':>10} {'copy GB/s':>9} "
        f"{'torch err':>9} {'bnkit err':>9} {'err ratio':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        copy = f"{r['copy_GBps']:.1f}" if r.get("copy_GBps") is not None else "-"
        print(
            f"{r['shape']!s:<20} {r['format']:<14} {r['case']:<14} {r['torch_ms']:>9.2f} "
            f"{r['bnkit_ms']:>9.2f} {r['ratio']:>6.2f} {r['torch_GBps']:>10.1f} "
            f"{r['bnkit_GBps']:>10.1f} {copy:>9} {r['torch_err']:>9.1e} {r['bnkit_err']:>9.1e} "
            f"{r['err_ratio']:>9.2f}"
        )
    for case in ("train fwd", "train fwd+bwd", "eval fwd"):
        ratios = [float(r["ratio"]) for r in rows if r["case"] == case]
        if not ratios:
            continue
        geo = math.exp(sum(math.log(v) for v in ratios) / len(ratios))
        worst = max(float(r["err_ratio"]) for r in rows if r["case"] == case)
        print(
            f"geomean ratio bnkit/torch, {case:<14}: {geo:.2f}  (max {max(ratios):.2f}); "
            f"worst error ratio {worst:.2f}"
        )
