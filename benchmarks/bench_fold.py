"""Eval-mode CPU inference time of a ResNet-style network before and after bnkit.fold.

    python benchmarks/bench_fold.py [--threads 2] [--batch 16] [--repeats 20]

Builds a ResNet-18-shaped network (BasicBlocks 2-2-2-2, widths 64..512) for 3x112x112 input,
gives its BatchNorms non-trivial statistics, folds it, and prints the median time of each
and the speedup, plus the fold report's max error.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import bnkit
from bnkit.lab.timing import paired_median_times


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


def resnet18ish(classes: int = 100) -> nn.Module:
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
    return nn.Sequential(*layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = resnet18ish()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 112, 112) * 2 + 1)
    model.eval()
    x = torch.randn(args.batch, 3, 112, 112)
    folded, report = bnkit.fold(model, x)
    with torch.inference_mode():
        secs = paired_median_times(
            {"unfolded": lambda: model(x), "folded": lambda: folded(x)}, args.repeats
        )
    before, after = secs["unfolded"], secs["folded"]
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}x3x112x112")
    print(
        f"folded {len(report.folded)} of {len(report.layers)} BatchNorms; "
        f"max rel error {report.max_rel_error:.1e}"
    )
    print(
        f"eval inference: unfolded {before * 1e3:.1f} ms, folded {after * 1e3:.1f} ms, "
        f"speedup {before / after:.2f}x"
    )


if __name__ == "__main__":
    main()
