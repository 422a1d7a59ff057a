"""Training throughput of LeNet with BatchNorm: bnkit's vs torch's, batches of 256 (28x28).

    python benchmarks/bench_lenet.py [--threads 2] [--steps 60]

The classic conv-BN-sigmoid-pool x2 + linear-BN-sigmoid x2 network (small tensors, where
per-call overhead dominates), SGD steps on random data, interleaved rounds, median
examples/s of each and the ratio bnkit/torch (> 1 means bnkit trains faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from bnkit.lab.models import lenet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (256,), generator=g)
    rates: dict[str, list[float]] = {"torch": [], "bnkit": []}
    models = {}
    for kind in rates:
        torch.manual_seed(0)
        models[kind] = lenet(kind)
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.1) for k, m in models.items()}

    def step(kind: str) -> None:
        opts[kind].zero_grad()
        nn.functional.cross_entropy(models[kind](x), y).backward()
        opts[kind].step()

    for kind in rates:  # warm-up (and the fast path's build/load)
        for _ in range(5):
            step(kind)
    for _ in range(args.rounds):
        for kind in rates:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(kind)
            rates[kind].append(args.steps * 256 / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"torch {torch.__version__}, {args.threads} thread(s), LeNet+BN, batch 256")
    for k, v in med.items():
        print(f"  {k:<6} {v:9.0f} examples/s")
    print(f"  ratio bnkit/torch throughput: {med['bnkit'] / med['torch']:.2f}")


if __name__ == "__main__":
    main()
