"""A seeded random sweep over what users feed a BatchNorm: the honest summary of speed.

Every configuration draws each axis at random: rank (2-D to 5-D), shape (batch 1 to
thousands, 1 to 1024 channels, 1e3 to 1.6e7 values), dtype (float32, float64, bfloat16,
float16: half input with float32 parameters and statistics, as autocast feeds it), layout
(contiguous, channels_last/channels_last_3d, a strided view: a transposed (N, L, C), every
other column, a batch-major permutation), mode (training forward, forward+backward, eval)
and entry point (module, functional, frozen). bnkit and torch are timed in turn in one
process (interleaved repeats, median); each line prints both times, the ratio bnkit/torch
(< 1: bnkit faster), both libraries' GB/s against the minimal traffic, and the error ratio
to torch's against a float64 closed form (<= 1: as accurate as torch). The last line:
cases slower than torch (and by more than 10%), the worst, the geomean.

    python benchmarks/bench_sweep.py --seed 1
    python benchmarks/bench_sweep.py --seed 2 --configs 80 --threads 2
    python benchmarks/bench_sweep.py --seed 1 --allocator tcmalloc

FrozenBatchNorm has no twin in torch: it is timed against torch's BatchNorm in eval mode
(the same function). The default allocator is glibc's, as most users run.
"""

from __future__ import annotations

import math
import random
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import bnkit
from bnkit.lab.timing import paired_median_times
from bnkit.testing import reference_eval, reference_train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batchnorm import parser, setup

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
MODES = ("train fwd", "train fwd+bwd", "eval fwd")
ENTRIES = ("module", "functional", "frozen")
_TORCH = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_BNKIT = {2: bnkit.BatchNorm1d, 3: bnkit.BatchNorm1d, 4: bnkit.BatchNorm2d, 5: bnkit.BatchNorm3d}
_FROZEN = {
    2: bnkit.FrozenBatchNorm1d,
    3: bnkit.FrozenBatchNorm1d,
    4: bnkit.FrozenBatchNorm2d,
    5: bnkit.FrozenBatchNorm3d,
}


def draw(rng: random.Random) -> dict[str, Any]:
    """One configuration."""
    rank = rng.choice((2, 3, 4, 5))
    c = 2 ** rng.randint(0, 10)
    total = int(10 ** rng.uniform(3, 7.2))
    per_channel = max(2, total // c)
    if rank == 2:
        shape: tuple[int, ...] = (per_channel, c)
    else:
        n = max(1, min(per_channel, int(2 ** rng.uniform(0, 11))))
        rest = max(1, per_channel // n)
        if n * rest < 2:
            rest = 2
        side = max(1, round(rest ** (1 / (rank - 2))))
        shape = (n, c, *([side] * (rank - 2)))
        if math.prod(shape) // c < 2:
            shape = (2, *shape[1:])
    layouts = ["contiguous", "strided"] + (["channels_last"] if rank in (4, 5) else [])
    entry = rng.choice(ENTRIES)
    mode = rng.choice(MODES) if entry != "frozen" else rng.choice(("eval fwd", "train fwd+bwd"))
    return {
        "rank": rank,
        "shape": shape,
        "dtype": rng.choice(DTYPES),
        "layout": rng.choice(layouts),
        "mode": mode,
        "entry": entry,
        "view": rng.choice(("transpose", "slice", "batch-major")),
    }


def make_input(cfg: dict[str, Any], g: torch.Generator) -> torch.Tensor:
    """The input, non-zero-mean, in the configuration's dtype and layout."""
    shape, dtype, rank = cfg["shape"], cfg["dtype"], cfg["rank"]
    scale = torch.rand(shape[1], generator=g) * 2 + 0.5
    offset = torch.randn(shape[1], generator=g) * 3
    view = [1, -1] + [1] * (rank - 2)

    def fill(s: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(s, generator=g)

    if cfg["layout"] == "channels_last":
        fmt = torch.channels_last if rank == 4 else torch.channels_last_3d
        x = (fill(shape) * scale.view(view) + offset.view(view)).contiguous(memory_format=fmt)
        return x.to(dtype)
    if cfg["layout"] != "strided":
        return (fill(shape) * scale.view(view) + offset.view(view)).to(dtype)
    see: Callable[[torch.Tensor], torch.Tensor]
    if cfg["view"] == "transpose" or (rank == 2 and cfg["view"] == "batch-major"):
        # channels last in memory but not a torch memory format: (N, *, C) seen as (N, C, *)
        base = fill((shape[0], *shape[2:], shape[1]))

        def see(t: torch.Tensor) -> torch.Tensor:
            return t.movedim(-1, 1)

    elif cfg["view"] == "slice":  # every other value of the last dim
        base = fill((*shape[:-1], 2 * shape[-1]))

        def see(t: torch.Tensor) -> torch.Tensor:
            return t[..., ::2]

    else:  # (C, N, ...) stored, (N, C, ...) seen
        base = fill((shape[1], shape[0], *shape[2:]))

        def see(t: torch.Tensor) -> torch.Tensor:
            return t.transpose(0, 1)

    see(base).mul_(scale.view(view)).add_(offset.view(view))
    return see(base.to(dtype))  # converted whole, then viewed: the view stays strided


def make_steps(
    cfg: dict[str, Any], x: torch.Tensor, grad: torch.Tensor
) -> tuple[dict[str, Callable[[], object]], dict[str, Callable[[torch.Tensor], torch.Tensor]]]:
    """(timed steps, output functions for the accuracy check) of torch and bnkit."""
    rank, c, mode, entry = cfg["rank"], cfg["shape"][1], cfg["mode"], cfg["entry"]
    pdtype = torch.float64 if cfg["dtype"] == torch.float64 else torch.float32
    t = _TORCH[rank](c, dtype=pdtype)
    with torch.no_grad():
        t.weight.uniform_(0.5, 1.5)
        t.bias.uniform_(-1, 1)
        t.running_mean.uniform_(-1, 1)
        t.running_var.uniform_(0.5, 2)
    training = mode != "eval fwd"
    if entry == "frozen":
        b: Any = _FROZEN[rank].from_batchnorm(t)
        t.eval()  # frozen: eval-mode statistics, in training too
        training = False
    else:
        b = _BNKIT[rank](c, dtype=pdtype)
        b.load_state_dict(t.state_dict())
    t.train(training)
    b.train(training)
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    if entry == "functional":

        def fn_for(
            f: Callable[..., torch.Tensor], m: Any
        ) -> Callable[[torch.Tensor], torch.Tensor]:
            def run(xi: torch.Tensor) -> torch.Tensor:
                return f(xi, m.running_mean, m.running_var, m.weight, m.bias, training, 0.1, m.eps)

            return run

        fns["torch"] = fn_for(nn.functional.batch_norm, t)
        fns["bnkit"] = fn_for(bnkit.functional.batch_norm, b)
    else:
        fns["torch"], fns["bnkit"] = t, b
    steps: dict[str, Callable[[], object]] = {}
    backward = mode == "train fwd+bwd"
    for name, fn in fns.items():
        xi = x.detach().requires_grad_(backward)
        params = list(t.parameters()) if name == "torch" else list(b.parameters())

        def step(fn: Any = fn, xi: torch.Tensor = xi, params: list[Any] = params) -> None:
            y = fn(xi)
            if backward:
                y.backward(grad)
                xi.grad = None
                for p in params:
                    p.grad = None

        steps[name] = step
    return steps, fns


def error(
    cfg: dict[str, Any],
    fn: Callable[[torch.Tensor], torch.Tensor],
    m: Any,
    x: torch.Tensor,
    grad: torch.Tensor,
) -> float:
    """Max |result - float64 closed form| (the output, or the input gradient)."""
    eval_stats = cfg["mode"] == "eval fwd" or cfg["entry"] == "frozen"
    w = getattr(m, "weight", None)
    bias = getattr(m, "bias", None)
    if cfg["mode"] != "train fwd+bwd":
        with torch.no_grad():
            if eval_stats:
                ref = reference_eval(x.double(), m.running_mean, m.running_var, w, bias, m.eps)
            else:
                ref, _, _ = reference_train(x.double(), w, bias, m.eps)
            return float((fn(x).double() - ref).abs().max())
    xi = x.detach().requires_grad_()
    (gx,) = torch.autograd.grad(fn(xi), xi, grad)
    xd = x.detach().double().requires_grad_()
    if eval_stats:
        ref = reference_eval(xd, m.running_mean, m.running_var, w, bias, m.eps)
    else:
        ref, _, _ = reference_train(xd, w, bias, m.eps)
    (gref,) = torch.autograd.grad(ref, xd, grad.double())
    return float((gx.double() - gref).abs().max())


def main() -> None:
    ap = parser(__doc__, repeats=15)
    ap.add_argument("--seed", type=int, required=True, help="the grid's random seed")
    ap.add_argument("--configs", type=int, default=64, help="configurations (default 64)")
    args = setup(ap)
    rng = random.Random(args.seed)
    print(f"seed {args.seed}, {args.configs} configurations, {args.repeats} repeats, median")
    head = (
        f"{'#':>3} {'entry':<10} {'mode':<13} {'dtype':<8} {'layout':<22} {'shape':<24} "
        f"{'torch ms':>9} {'bnkit ms':>9} {'ratio':>6} {'torch GB/s':>10} {'bnkit GB/s':>10} "
        f"{'err ratio':>9}"
    )
    print(head)
    ratios: list[float] = []
    for i in range(args.configs):
        cfg = draw(rng)
        g = torch.Generator().manual_seed(args.seed * 1000 + i)
        x = make_input(cfg, g)
        grad = torch.randn(cfg["shape"], generator=g).to(cfg["dtype"])
        steps, fns = make_steps(cfg, x, grad)
        numel = x.numel()
        repeats = max(5, min(args.repeats, int(args.repeats * 2e6 / max(numel, 1))))
        secs = paired_median_times(steps, repeats)
        traffic = {"train fwd": 3, "train fwd+bwd": 6, "eval fwd": 2}[cfg["mode"]]
        traffic *= numel * x.element_size()
        torch_m = fns["torch"] if isinstance(fns["torch"], nn.Module) else None
        bnkit_m = fns["bnkit"] if isinstance(fns["bnkit"], nn.Module) else None
        # the modules whose statistics the functional forms use (for the closed form)
        err_t = error(cfg, fns["torch"], torch_m or _owner(fns["torch"]), x, grad)
        err_b = error(cfg, fns["bnkit"], bnkit_m or _owner(fns["bnkit"]), x, grad)
        ratio = secs["bnkit"] / secs["torch"]
        ratios.append(ratio)
        layout = cfg["layout"] + (f" ({cfg['view']})" if cfg["layout"] == "strided" else "")
        print(
            f"{i:>3} {cfg['entry']:<10} {cfg['mode']:<13} {str(cfg['dtype'])[6:]:<8} "
            f"{layout:<22} {cfg['shape']!s:<24} {secs['torch'] * 1e3:>9.3f} "
            f"{secs['bnkit'] * 1e3:>9.3f} {ratio:>6.2f} {traffic / secs['torch'] / 1e9:>10.1f} "
            f"{traffic / secs['bnkit'] / 1e9:>10.1f} {err_b / max(err_t, 1e-30):>9.2f}",
            flush=True,
        )
    slower = sum(r > 1.0 for r in ratios)
    slower10 = sum(r > 1.1 for r in ratios)
    geo = math.exp(statistics.fmean(math.log(r) for r in ratios))
    print(
        f"summary seed {args.seed}: {slower}/{len(ratios)} slower than torch "
        f"({slower10} by more than 10%), worst {max(ratios):.2f}, geomean {geo:.3f}"
    )


def _owner(fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """The module whose tensors a functional step closes over."""
    cells = [c.cell_contents for c in (fn.__closure__ or ())]
    return next(c for c in cells if isinstance(c, nn.Module))


if __name__ == "__main__":
    main()
