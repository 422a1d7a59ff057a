"""Time bnkit's BatchNorm against torch's built-in, side by side in one process.

Prints, for every shape/format/case, the median time of each, the ratio bnkit/torch
(< 1 means bnkit is faster), GB/s against the minimal traffic and max error vs float64.

    python benchmarks/bench_batchnorm.py               # all shapes, 2 threads
    python benchmarks/bench_batchnorm.py --threads 1 --repeats 30
    python benchmarks/bench_batchnorm.py --quick
"""

from __future__ import annotations

import argparse

import torch

import bnkit
from bnkit.lab.timing import QUICK_SHAPES, SHAPES, compare, print_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="small shapes only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, bnkit {bnkit.__version__}, {args.threads} thread(s)")
    print_table(compare(QUICK_SHAPES if args.quick else SHAPES, args.repeats))


if __name__ == "__main__":
    main()
