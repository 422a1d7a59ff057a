"""End to end: one SGD training step of real CNN shapes, torch's BatchNorm vs the same model
through ``bnkit.convert`` and through ``bnkit.fuse_activations`` (BatchNorm + add + ReLU
fused), NCHW and channels_last, timed in turn in one process.

    python benchmarks/bench_e2e.py                 # ResNet-18 and MobileNetV2 (batch 16,
                                                   # 224 px), CIFAR ResNet-20 (batch 128, 32 px)
    python benchmarks/bench_e2e.py --quick         # 112 px, fewer repeats
    python benchmarks/bench_e2e.py --threads 1 --repeats 10
    python benchmarks/bench_e2e.py --autocast bf16  # each step under CPU bfloat16 autocast

The models are defined here (the torchvision architectures, without torchvision). Each row:
median step time of each (forward, backward, SGD update), the ratios bnkit/torch and
fused/torch as the median of per-repeat ratios of back-to-back steps (< 1: bnkit faster),
and the share of torch's step spent in BatchNorm and in the activations (torch.profiler,
once).
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import sys
from collections.abc import Callable

import torch
from bench_batchnorm import parser, setup
from torch import nn

import bnkit
from bnkit.lab.timing import interleaved_times


def _conv_bn(
    cin: int, cout: int, k: int, s: int, groups: int = 1, act: type = nn.ReLU
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act()
    )


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + idt)


def _resnet(widths: list[int], blocks: list[int], stem: nn.Module, classes: int) -> nn.Sequential:
    layers: list[nn.Module] = [stem]
    cin = widths[0]
    for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
        for j in range(n):
            layers.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
            cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def resnet18() -> nn.Module:
    stem = nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    )  # fmt: skip
    return _resnet([64, 128, 256, 512], [2, 2, 2, 2], stem, 1000)


def resnet20() -> nn.Module:
    stem = _conv_bn(3, 16, 3, 1)
    return _resnet([16, 32, 64], [3, 3, 3], stem, 10)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hid = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(cin, hid, 1, 1, act=nn.ReLU6))
        layers += [
            _conv_bn(hid, hid, 3, stride, groups=hid, act=nn.ReLU6),
            nn.Conv2d(hid, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


def mobilenet_v2() -> nn.Module:
    cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
           (6, 160, 3, 2), (6, 320, 1, 1)]  # fmt: skip
    layers: list[nn.Module] = [_conv_bn(3, 32, 3, 2, act=nn.ReLU6)]
    cin = 32
    for t, c, n, s in cfg:
        for i in range(n):
            layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    layers += [_conv_bn(cin, 1280, 1, 1, act=nn.ReLU6), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(1280, 1000)]  # fmt: skip
    return nn.Sequential(*layers)


MODELS: dict[str, tuple[Callable[[], nn.Module], int, int]] = {
    "ResNet-18": (resnet18, 16, 224),
    "MobileNetV2": (mobilenet_v2, 16, 224),
    "CIFAR ResNet-20": (resnet20, 128, 32),
}


def _step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: str = "off"
) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(autocast)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if dtype is None:
            loss = nn.functional.cross_entropy(model(x), y)
        else:  # what a mixed-precision CPU training loop runs: convolutions in dtype, BN fed dtype
            with torch.autocast("cpu", dtype=dtype):
                loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def _shares(model: nn.Module, step: Callable[[], None]) -> tuple[float, float]:
    from torch.profiler import ProfilerActivity, profile

    step()
    # the profiler's native library prints start/stop lines on the process's own
    # descriptors: keep them off the table
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        sys.stdout.flush()
        os.dup2(null, 1), os.dup2(null, 2)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    finally:
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    bn = sum(e.self_cpu_time_total for e in events if "batch_norm" in e.key)
    act = sum(
        e.self_cpu_time_total
        for e in events
        if any(k in e.key for k in ("relu", "hardtanh", "threshold_backward"))
    )
    return bn / total, act / total


def main() -> None:
    ap = parser(__doc__, repeats=0)
    ap.add_argument("--quick", action="store_true", help="half the image size, fewer repeats")
    ap.add_argument("--only", default="", help=f"comma-separated model names: {', '.join(MODELS)}")
    ap.add_argument(
        "--autocast",
        choices=["off", "bf16", "fp16"],
        default="off",
        help="run each step under torch.autocast('cpu', dtype) (BatchNorm then sees half input)",
    )
    args = setup(ap)
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    if unknown := [n for n in only if n not in MODELS]:
        ap.error(f"--only: unknown model(s) {', '.join(map(repr, unknown))}; "
                 f"expected names from {', '.join(map(repr, MODELS))}")  # fmt: skip
    repeats = args.repeats or (5 if args.quick else 9)
    print(
        f"{repeats} repeats, fast path: {bnkit.nn.fast_path_available()}, autocast: {args.autocast}"
    )
    print(
        f"{'model':<16} {'format':<14} {'torch ms':>9} {'bnkit ms':>9} {'fused ms':>9} "
        f"{'bnkit/torch':>11} {'fused/torch':>11} {'BN share':>9} {'act share':>9}"
    )
    ratios: dict[str, list[float]] = {"bnkit": [], "fused": []}
    for name, (make, batch, px) in MODELS.items():
        if only and name not in only:
            continue
        px = px // 2 if args.quick and px > 64 else px
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, px, px, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        for fmt in ("contiguous", "channels_last"):
            torch.manual_seed(0)
            ref = make()
            ours = bnkit.convert(copy.deepcopy(ref), to="bnkit")
            fused = bnkit.fuse_activations(copy.deepcopy(ref), x[:2])
            xi = x
            if fmt == "channels_last":
                ref = ref.to(memory_format=torch.channels_last)
                ours = ours.to(memory_format=torch.channels_last)
                fused = fused.to(memory_format=torch.channels_last)
                xi = x.contiguous(memory_format=torch.channels_last)
            steps = {
                "torch": _step(ref, xi, y, args.autocast),
                "bnkit": _step(ours, xi, y, args.autocast),
                "fused": _step(fused, xi, y, args.autocast),
            }
            bn_share, act_share = _shares(ref, steps["torch"])
            t = interleaved_times(steps, repeats=repeats, warmup=2)
            row = {}
            for kind in ("bnkit", "fused"):
                pairs = zip(t[kind], t["torch"], strict=True)
                row[kind] = statistics.median(a / b for a, b in pairs)
                ratios[kind].append(row[kind])
            ms = {k: statistics.median(v) * 1e3 for k, v in t.items()}
            print(
                f"{name:<16} {fmt:<14} {ms['torch']:9.1f} {ms['bnkit']:9.1f} {ms['fused']:9.1f} "
                f"{row['bnkit']:11.3f} {row['fused']:11.3f} {bn_share:9.1%} {act_share:9.1%}"
            )
    for kind, rs in ratios.items():
        if rs:
            geo = math.exp(sum(math.log(r) for r in rs) / len(rs))
            print(f"geomean ratio {kind}/torch: {geo:.3f} (max {max(rs):.3f})")


if __name__ == "__main__":
    main()
