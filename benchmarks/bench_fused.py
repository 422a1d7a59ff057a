"""BatchNorm + ReLU and BatchNorm + add + ReLU, one training step each (forward and
backward), torch's layers vs bnkit's unfused layers vs bnkit's fused call, timed in turn
in one process (bnkit.lab.timing.interleaved_times: warm-up, medians).

    python benchmarks/bench_fused.py --allocator tcmalloc   # ResNet-sized shapes, both layouts
    python benchmarks/bench_fused.py --repeats 40 --threads 1

Every step allocates its outputs and gradients: with glibc's malloc each large one is fresh
memory from the OS (a page fault per 4 KiB, in every column); ``--allocator tcmalloc``
(see bench_batchnorm.py) measures the steady state of a long training run.

Each row: the median time of each, the ratios to torch (< 1: faster), torch's GB/s
against the minimal traffic of the unfused pattern (forward: read x [and r], write y;
backward: read the output gradient and x [and r], write the input gradients) so that a
slow phase of the machine shows, and the fused result's max error against float64.
"""

from __future__ import annotations

import statistics

import torch
from bench_batchnorm import parser, setup

import bnkit
from bnkit.lab.timing import interleaved_times
from bnkit.nn.fused import batch_norm_act
from bnkit.testing import random_input, reference_train

SHAPES = [(32, 64, 56, 56), (128, 64, 32, 32), (256, 256, 14, 14), (64, 512, 7, 7)]


def _step(fn, x, r, go):  # type: ignore[no-untyped-def]
    def run() -> None:
        xi = x.detach().requires_grad_()
        ri = r.detach().requires_grad_() if r is not None else None
        y = fn(xi, ri)
        y.backward(go)

    return run


ACTS = {"relu": torch.relu_, "relu6": torch.nn.functional.relu6}


def _kinds(ref: torch.nn.Module, ours: torch.nn.Module, act: str):  # type: ignore[no-untyped-def]
    """The pattern with torch's layer, with bnkit's layer unfused, and fused."""

    def unfused(bn):  # type: ignore[no-untyped-def]
        def fn(xi, ri):  # type: ignore[no-untyped-def]
            y = bn(xi)
            return ACTS[act](y + ri if ri is not None else y)

        return fn

    return {
        "torch": unfused(ref),
        "bnkit": unfused(ours),
        "fused": lambda xi, ri: batch_norm_act(ours, xi, ri, act),
    }


def main() -> None:
    ap = parser(__doc__, repeats=20)
    ap.add_argument("--act", choices=list(ACTS), default="relu", help="the activation")
    args = setup(ap)
    head = (
        f"{'shape':<19} {'format':<14} {'pattern':<14} {'torch ms':>9} {'bnkit ms':>9} "
        f"{'fused ms':>9} {'bnkit/t':>8} {'fused/t':>8} {'torch GB/s':>10} {'fused err':>9}"
    )
    print(head)
    print("-" * len(head))
    fused_ratios = []
    for shape in SHAPES:
        for cl in (False, True):
            x = random_input(shape, torch.float32, 0, cl)
            r = random_input(shape, torch.float32, 1, cl)
            go = random_input(shape, torch.float32, 2, cl)
            c = shape[1]
            ref = torch.nn.BatchNorm2d(c)
            ours = bnkit.BatchNorm2d(c)
            patterns = ((f"bn+{args.act}", None), (f"bn+add+{args.act}", r))
            for pattern, res in patterns:
                steps = {k: _step(fn, x, res, go) for k, fn in _kinds(ref, ours, args.act).items()}
                t = interleaved_times(steps, repeats=args.repeats, warmup=3)
                med = {k: statistics.median(v) for k, v in t.items()}
                ratio = {
                    k: statistics.median(a / b for a, b in zip(t[k], t["torch"], strict=True))
                    for k in ("bnkit", "fused")
                }
                fused_ratios.append(ratio["fused"])
                tensors = (3 if res is None else 4) + (3 if res is None else 5)
                gbs = x.numel() * 4 * tensors / med["torch"] / 1e9
                with torch.no_grad():
                    y_ref, _, _ = reference_train(x, ours.weight, ours.bias, ours.eps)
                    if res is not None:
                        y_ref = y_ref + res.double()
                    got = batch_norm_act(ours, x, res, args.act).double()
                    err = (got - ACTS[args.act](y_ref)).abs()
                fmt = "channels_last" if cl else "contiguous"
                print(
                    f"{shape!s:<19} {fmt:<14} {pattern:<14} {med['torch'] * 1e3:9.2f} "
                    f"{med['bnkit'] * 1e3:9.2f} {med['fused'] * 1e3:9.2f} {ratio['bnkit']:8.2f} "
                    f"{ratio['fused']:8.2f} {gbs:10.1f} {err.max().item():9.1e}"
                )
    geo = statistics.geometric_mean(fused_ratios)
    print(f"geomean fused/torch: {geo:.2f} (max {max(fused_ratios):.2f})")


if __name__ == "__main__":
    main()
