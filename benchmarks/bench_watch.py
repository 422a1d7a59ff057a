"""What ``bnkit.watch`` costs a training step: ResNet-18 (224 px, batch 16 by default, one
SGD step), watched (the default interval, every=10) and not, timed in turn in one
process (interleaved repeats of ``every`` consecutive steps, so each timed block holds one
recorded step; median). The ratio is watched / unwatched.

    python benchmarks/bench_watch.py
    python benchmarks/bench_watch.py --batch 8 --repeats 20 --every 1
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from torch import nn

import bnkit
from bnkit.lab.timing import paired_median_times

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batchnorm import parser, setup
from bench_e2e import resnet18


def main() -> None:
    ap = parser(__doc__, repeats=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--every", type=int, default=10, help="watch's interval (default 10)")
    args = setup(ap)
    torch.manual_seed(0)
    plain = resnet18()
    watched = resnet18()
    watched.load_state_dict(plain.state_dict())
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))
    handle = bnkit.watch(watched, every=args.every, warn=False)
    steps = {}
    for name, model in (("plain", plain), ("watched", watched)):
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            for _ in range(args.every):  # a block of `every` steps: one recorded, as in use
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()

        steps[name] = step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        secs = paired_median_times(steps, args.repeats, warmup=1)
    handle.close()
    ratio = secs["watched"] / secs["plain"]
    print(
        f"ResNet-18, batch {args.batch}, {args.size} px, every={args.every}: "
        f"plain {secs['plain'] * 1e3 / args.every:.1f} ms, "
        f"watched {secs['watched'] * 1e3 / args.every:.1f} ms a step, "
        f"ratio {ratio:.3f} ({len(handle.history.records)} records)"
    )


if __name__ == "__main__":
    main()
