"""``torch.compile``: one SGD training step (and an eval forward) of a CIFAR ResNet-20,
torch's BatchNorm vs the same model through ``bnkit.convert``, both compiled by inductor
(``fullgraph=True``), timed in turn in one process.

    python benchmarks/bench_compile.py                 # batch 128, 32 px
    python benchmarks/bench_compile.py --batch 32 --repeats 20 --threads 1

Each row: graph breaks of each model under ``torch._dynamo.explain`` (0 for both: both
compile to one graph), median step time of each, the ratio bnkit/torch as the median of
per-repeat ratios of back-to-back steps (< 1: bnkit faster) and its range over the
repeats' middle half; then the compiled models' largest output difference from eager
bnkit in float32.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable

import torch
import torch._dynamo as dynamo
from bench_batchnorm import parser, setup
from bench_e2e import resnet20
from torch import nn

import bnkit
from bnkit.lab.timing import interleaved_times


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    run = torch.compile(model, fullgraph=True)

    def step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(run(x), y).backward()
        opt.step()

    return step


def _eval_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    run = torch.compile(model, fullgraph=True)

    def step() -> None:
        model.eval()
        with torch.no_grad():
            run(x)

    return step


def _breaks(model: nn.Module, x: torch.Tensor, training: bool) -> int:
    model.train(training)
    dynamo.reset()
    return int(dynamo.explain(model)(x).graph_break_count)


def main() -> None:
    ap = parser(__doc__, repeats=30)
    ap.add_argument("--batch", type=int, default=128)
    args = setup(ap)
    torch.manual_seed(0)
    ref = resnet20()
    ours = bnkit.convert(copy.deepcopy(ref))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, 32, 32, generator=g) * 2 + 1
    y = torch.randint(0, 10, (args.batch,), generator=g)
    print(f"CIFAR ResNet-20, batch {args.batch}, inductor, fullgraph=True")
    print(
        f"{'case':<12} {'breaks t/b':>10} {'torch ms':>9} {'bnkit ms':>9} "
        f"{'ratio':>6} {'range':>11}"
    )
    for case in ("train step", "eval fwd"):
        training = case == "train step"
        breaks = (_breaks(ref, x, training), _breaks(ours, x, training))
        dynamo.reset()
        models = {"torch": copy.deepcopy(ref), "bnkit": copy.deepcopy(ours)}
        steps = {
            k: (_train_step(m, x, y) if training else _eval_step(m, x)) for k, m in models.items()
        }
        times = interleaved_times(steps, args.repeats, warmup=3)
        ratios = sorted(b / t for b, t in zip(times["bnkit"], times["torch"], strict=True))
        q = len(ratios) // 4
        t_ms, b_ms = (statistics.median(times[k]) * 1e3 for k in ("torch", "bnkit"))
        print(
            f"{case:<12} {breaks[0]:>4}/{breaks[1]:<5} {t_ms:>9.2f} {b_ms:>9.2f} "
            f"{statistics.median(ratios):>6.3f} "
            f"{ratios[q]:>5.3f}-{ratios[-q - 1]:<5.3f}"
        )
    dynamo.reset()
    eager = copy.deepcopy(ours).eval()
    compiled = {
        k: torch.compile(copy.deepcopy(m).eval()) for k, m in (("torch", ref), ("bnkit", ours))
    }
    with torch.no_grad():
        want = eager(x)
        diffs = {k: float((c(x) - want).abs().max()) for k, c in compiled.items()}
    print(
        f"eval output vs eager bnkit, max abs: torch compiled {diffs['torch']:.1e}, "
        f"bnkit compiled {diffs['bnkit']:.1e}"
    )


if __name__ == "__main__":
    main()
