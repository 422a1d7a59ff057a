"""SyncBatchNorm cost with 2 and 4 gloo processes on this machine vs local BatchNorm.

    python benchmarks/bench_sync.py [--worlds 2 4] [--steps 30]

Each rank runs forward+backward of one BatchNorm2d-sized layer on its share of a global
batch (N=32, C=64, 28x28), with bnkit.SyncBatchNorm and with a local bnkit.BatchNorm2d, and
reports the median step time of each, the ratio, and the bytes each rank sends per layer
and step (forward all_gather payload + backward all_reduce payload).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bnkit

C, N, HW = 64, 32, 28


def _worker(rank: int, world: int, init: str, out: str, steps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    x = torch.randn(N // world, C, HW, HW) * 2 + 1
    go = torch.randn_like(x)
    res = {}
    for name, bn in (("local", bnkit.BatchNorm2d(C)), ("sync", bnkit.SyncBatchNorm(C))):
        times = []
        for i in range(steps + 3):
            xi = x.detach().requires_grad_()
            dist.barrier()
            t0 = time.perf_counter()
            bn(xi).backward(go)
            if i >= 3:
                times.append(time.perf_counter() - t0)
        res[name] = statistics.median(times)
    if rank == 0:
        Path(out).write_text(f"{res['local']} {res['sync']}")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    fwd_bytes = (4 + 2 * C) * 8  # header + mean + M2, float64, per rank
    bwd_bytes = 2 * C * 8  # sum(g), sum(g * xhat)
    print(f"layer: global batch ({N}, {C}, {HW}, {HW}) split over the ranks, 1 thread per rank")
    print(f"{'world':>5} {'local ms':>9} {'sync ms':>8} {'ratio':>6} {'sent/rank/step':>15}")
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "out"
            mp.spawn(
                _worker,
                args=(world, str(Path(d) / "init"), str(out), args.steps),
                nprocs=world,
                join=True,
            )
            local, sync = map(float, out.read_text().split())
        print(
            f"{world:>5} {local * 1e3:>9.2f} {sync * 1e3:>8.2f} {sync / local:>6.2f} "
            f"{fwd_bytes + bwd_bytes:>10d} bytes (all_gather {fwd_bytes} B in, "
            f"{fwd_bytes * world} B gathered; all_reduce {bwd_bytes} B)"
        )


if __name__ == "__main__":
    main()
