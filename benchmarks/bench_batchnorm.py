"""Time bnkit's BatchNorm against torch's built-in, side by side in one process.

Prints, for every shape/format/case, the median time of each, the ratio bnkit/torch
(< 1 means bnkit is faster), GB/s against the minimal traffic and max error vs float64;
for the eval rows also ``x.clone()``'s GB/s, timed in turn with the two (the same bytes
moved with no arithmetic: how close an eval forward is to what memory allows).

    python benchmarks/bench_batchnorm.py               # all shapes, 2 threads
    python benchmarks/bench_batchnorm.py --threads 1 --repeats 30
    python benchmarks/bench_batchnorm.py --quick
    python benchmarks/bench_batchnorm.py --allocator tcmalloc
    python benchmarks/bench_batchnorm.py --allocator tcmalloc --cold

By default each timed call follows an untimed call of the same step (its steady state in
a loop that calls only it: what it read last may still be in cache). ``--cold`` writes
128 MiB of other data before every timed call instead, as the layers around a BatchNorm
do in a network: the figures to expect in situ.

Allocator: with glibc's default malloc every tensor of 32 MiB or more is fresh memory from
the OS, and writing it first costs a page fault per 4 KiB; that cost is in both columns.
``--allocator tcmalloc`` (or jemalloc) re-runs the benchmark with that allocator preloaded
(Debian/Ubuntu: ``apt-get install libtcmalloc-minimal4`` / ``libjemalloc2``), which keeps
freed memory mapped: the steady state of a long training run.
"""

from __future__ import annotations

import argparse
import ctypes.util
import os
import sys

import torch

import bnkit
from bnkit.lab.timing import QUICK_SHAPES, SHAPES, compare, print_table

_ALLOCATORS = {"tcmalloc": ("tcmalloc_minimal", "tcmalloc"), "jemalloc": ("jemalloc",)}


def _find_library(kind: str) -> str | None:
    """The allocator's soname (LD_PRELOAD searches the linker's path for a bare name)."""
    for name in _ALLOCATORS[kind]:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def _preload(kind: str) -> None:
    """Re-execute this script with the allocator ``kind`` in LD_PRELOAD (once)."""
    if os.environ.get("BNKIT_BENCH_ALLOCATOR") == kind:
        return
    lib = _find_library(kind)
    if lib is None:
        sys.exit(
            f"--allocator {kind}: no lib{_ALLOCATORS[kind][0]} found on this machine "
            f"(Debian/Ubuntu: apt-get install "
            f"{'libtcmalloc-minimal4' if kind == 'tcmalloc' else 'libjemalloc2'})"
        )
    env = dict(os.environ, BNKIT_BENCH_ALLOCATOR=kind)
    env["LD_PRELOAD"] = " ".join(filter(None, [lib, env.get("LD_PRELOAD", "")]))
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def parser(doc: str | None, repeats: int) -> argparse.ArgumentParser:
    """The options every benchmark script takes: --threads, --repeats, --allocator."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--allocator", choices=["default", *_ALLOCATORS], default="default")
    return ap


def setup(ap: argparse.ArgumentParser, header: bool = True) -> argparse.Namespace:
    """Parse ``ap``'s options, re-execute under the allocator asked for, set the threads and
    print what runs (torch and bnkit versions, threads, allocator)."""
    args = ap.parse_args()
    if args.allocator != "default":
        _preload(args.allocator)
    torch.set_num_threads(args.threads)
    if header:
        print(
            f"torch {torch.__version__}, bnkit {bnkit.__version__}, {args.threads} thread(s), "
            f"allocator: {args.allocator if args.allocator != 'default' else 'default (glibc)'}"
        )
    return args


def main() -> None:
    ap = parser(__doc__, repeats=30)
    ap.add_argument("--quick", action="store_true", help="small shapes only")
    ap.add_argument(
        "--cold",
        action="store_true",
        help="each timed call starts from caches full of other data (as a layer in a\n"
        "network does), not after an untimed call of the same step",
    )
    args = setup(ap)
    if args.cold:
        print("cold caches: 128 MiB of other data written before every timed call")
    print_table(compare(QUICK_SHAPES if args.quick else SHAPES, args.repeats, cold=args.cold))


if __name__ == "__main__":
    main()
