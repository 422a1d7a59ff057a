"""Cost: bnkit's BatchNorm vs torch's on this machine (the benchmark, short form)."""

from __future__ import annotations

import math

import bnkit.nn
from bnkit.lab.context import Context, Section
from bnkit.lab.timing import compare

NAME = "cost"
TITLE = "Cost: bnkit vs torch BatchNorm on this machine"


def run(ctx: Context) -> Section:
    shapes = (
        [(8, 64, 28, 28), (1024, 256)]
        if ctx.quick
        else [(32, 64, 56, 56), (64, 512, 7, 7), (4096, 1024)]
    )
    rows = compare(shapes, repeats=5 if ctx.quick else 10, formats=("contiguous",))
    geo = {}
    for case in ("train fwd", "train fwd+bwd", "eval fwd"):
        ratios = [r["ratio"] for r in rows if r["case"] == case]
        geo[case] = math.exp(sum(math.log(v) for v in ratios) / len(ratios))
    fast = bnkit.nn.fast_path_available()
    path = (
        "bnkit's C++ fast path (built on first use)"
        if fast
        else "bnkit's plain PyTorch path (the C++ fast path is not available here)"
    )
    summary = (
        "Median time of one call through the public modules, bnkit / torch (below 1 means "
        f"bnkit is faster): training forward {geo['train fwd']:.2f}x, forward+backward "
        f"{geo['train fwd+bwd']:.2f}x, eval {geo['eval fwd']:.2f}x (geometric means), using "
        f"{path}. The errors are the max deviation from the float64 closed form (of the "
        "output; of the input gradient for forward+backward). Timings vary from run to run "
        "and are not covered by the seed; benchmarks/bench_batchnorm.py is the full version."
    )
    table = [
        [
            str(r["shape"]),
            r["case"],
            r["torch_ms"],
            r["bnkit_ms"],
            r["ratio"],
            r["torch_err"],
            r["bnkit_err"],
        ]
        for r in rows
    ]
    return Section(
        NAME,
        TITLE,
        summary,
        {"rows": rows, "geomean_ratio": geo},
        [],
        [
            (
                "Timings",
                [
                    "shape",
                    "case",
                    "torch ms",
                    "bnkit ms",
                    "ratio",
                    "torch max err",
                    "bnkit max err",
                ],
                table,
            )
        ],
    )
