"""Training throughput of LeNet with BatchNorm: bnkit's vs torch's, batches of 256 (28x28).

    python benchmarks/bench_lenet.py [--threads 2] [--repeats 100] [--allocator tcmalloc]

The classic conv-BN-sigmoid-pool x2 + linear-BN-sigmoid x2 network (small tensors, where
per-call overhead dominates), SGD steps on random data, the two timed in turn within every
repeat (``lab.timing.interleaved_times``): median examples/s of each and the ratio of
throughputs as the median of per-repeat ratios of back-to-back steps (> 1 means bnkit
trains faster), so a machine busy for part of the run does not favour either.

With glibc's malloc both steps take hundreds to thousands of page faults each (freed
memory handed back to the OS and faulted in again), and how many varies from process to
process: the ratio moved between 0.84 and 1.26 over six runs here, while with the
thresholds fixed (MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_) or ``--allocator
tcmalloc`` it held at 1.07-1.15. The page faults per step are printed with the times.
"""

from __future__ import annotations

import resource
import statistics

import torch
from bench_batchnorm import parser, setup
from torch import nn

from bnkit.lab.models import lenet
from bnkit.lab.timing import interleaved_times


def main() -> None:
    args = setup(parser(__doc__, repeats=100), header=False)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (256,), generator=g)
    models = {}
    for kind in ("torch", "bnkit"):
        torch.manual_seed(0)
        models[kind] = lenet(kind)
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.1) for k, m in models.items()}

    def step(kind: str) -> None:
        opts[kind].zero_grad()
        nn.functional.cross_entropy(models[kind](x), y).backward()
        opts[kind].step()

    faults = {k: [0, 0] for k in models}  # page faults, calls

    def counted(kind: str) -> None:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step(kind)
        faults[kind][0] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        faults[kind][1] += 1

    steps = {k: (lambda k=k: counted(k)) for k in models}
    times = interleaved_times(steps, repeats=args.repeats, warmup=5)
    med = {k: 256 / statistics.median(v) for k, v in times.items()}
    paired = statistics.median(t / b for t, b in zip(times["torch"], times["bnkit"], strict=True))
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), allocator: {args.allocator}, "
        "LeNet+BN, batch 256"
    )
    for k, v in med.items():
        print(f"  {k:<6} {v:9.0f} examples/s  {faults[k][0] / faults[k][1]:7.0f} page faults/step")
    print(f"  ratio bnkit/torch throughput: {paired:.2f} (median of per-repeat ratios)")


if __name__ == "__main__":
    main()
