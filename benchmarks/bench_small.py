"""Per-call cost of small BatchNorm layers, bnkit against torch, side by side in one process.

A layer of a few thousand values takes microseconds: what it costs is mostly the call
itself (Python, the autograd node, the C++ entry), not the memory. Each step is 100 calls
of one layer (inference: forward under ``torch.no_grad``; training: forward and
``.sum().backward()``), timed in turn with torch's (``interleaved_times``); the table gives
the median microseconds per call and the ratio bnkit/torch.

    python benchmarks/bench_small.py --allocator tcmalloc
    python benchmarks/bench_small.py --repeats 30 --threads 1

With glibc's default allocator the (8, 64, 28, 28) rows move by 2x between runs and
between versions of either library: each 1.6 MB output is freed to the top of the heap,
which glibc trims and grows again (a page fault per 4 KiB) or not, depending on where
small allocations happen to lie. ``--allocator tcmalloc`` (as in bench_batchnorm.py) keeps
freed memory mapped.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
from bench_batchnorm import parser, setup

import bnkit
from bnkit.lab.timing import interleaved_times

SHAPES: list[tuple[int, ...]] = [(2, 16, 8, 8), (64, 128), (8, 64, 28, 28)]
CALLS = 100


def _layers(shape: tuple[int, ...]) -> tuple[torch.nn.Module, torch.nn.Module]:
    c = shape[1]
    if len(shape) == 4:
        return torch.nn.BatchNorm2d(c), bnkit.BatchNorm2d(c)
    return torch.nn.BatchNorm1d(c), bnkit.BatchNorm1d(c)


def _loop(m: torch.nn.Module, x: torch.Tensor, grad: bool) -> Callable[[], None]:
    xg = x.detach().clone().requires_grad_()

    def step() -> None:
        for _ in range(CALLS):
            if grad:
                m(xg).sum().backward()
            else:
                with torch.no_grad():
                    m(x)

    return step


def main() -> None:
    args = setup(parser(__doc__, repeats=15))
    print(f"{'shape':<18} {'case':<16} {'torch us':>9} {'bnkit us':>9} {'ratio':>6}")
    for grad in (False, True):
        for shape in SHAPES:
            x = torch.randn(shape) * 3 + 5
            t, b = _layers(shape)
            for mode in ("train", "eval"):
                t.train(mode == "train")
                b.train(mode == "train")
                times = interleaved_times(
                    {"torch": _loop(t, x, grad), "bnkit": _loop(b, x, grad)}, args.repeats
                )
                us = {k: statistics.median(v) / CALLS * 1e6 for k, v in times.items()}
                case = f"{mode} {'fwd+bwd' if grad else 'fwd'}"
                print(
                    f"{shape!s:<18} {case:<16} {us['torch']:>9.1f} {us['bnkit']:>9.1f} "
                    f"{us['bnkit'] / us['torch']:>6.2f}"
                )


if __name__ == "__main__":
    main()
