"""Small batches: plain BatchNorm vs Batch Renorm vs GroupNorm vs accumulation, batch 4 and 2."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import torch
from torch import nn

from bnkit.lab import models
from bnkit.lab.context import Context, Section
from bnkit.lab.train import accuracy, bar
from bnkit.nn.variants import accumulate

NAME = "small_batch"
TITLE = "Small batches: BatchNorm, Batch Renorm, GroupNorm and accumulation"
LR = 0.05
ACCUMULATE = 8  # micro-batches per optimizer step and per running-statistic update
VARIANTS = {
    "BatchNorm": ("bnkit", {}),
    "BatchRenorm": ("renorm", {"momentum": 0.01, "warmup_steps": 100, "relax_steps": 400}),
    "GroupNorm": ("groupnorm", {}),
    f"BatchNorm + accumulate({ACCUMULATE})": ("bnkit", {}),
}


def _train(
    ctx: Context, kind: str, kw: dict[str, Any], batch: int, accumulate_k: int, desc: str
) -> nn.Module:
    torch.manual_seed(ctx.seed)
    model = models.lenet(kind, **kw)
    x, y = ctx.train
    n = 1000 if ctx.quick else 2000  # tiny batches are slow per example: a subset
    x, y = x[:n], y[:n]
    gen = torch.Generator().manual_seed(ctx.seed)
    opt = torch.optim.SGD(model.parameters(), lr=LR * (accumulate_k if accumulate_k > 1 else 1))
    epochs = 1
    steps = len(y) // batch
    model.train()
    with bar(epochs * steps, desc, ctx.progress) as pbar:
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=gen)
            for g0 in range(0, steps, accumulate_k):
                opt.zero_grad()
                group = range(g0, min(steps, g0 + accumulate_k))
                ctx_mgr = accumulate(model) if accumulate_k > 1 else _Null()
                with ctx_mgr:
                    for i in group:
                        idx = perm[i * batch : (i + 1) * batch]
                        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                        (loss / len(group)).backward()
                        pbar.update(1)
                opt.step()
    return model


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def run(ctx: Context) -> Section:
    xt, yt = ctx.test
    res: dict[str, dict[str, Any]] = {}
    batches = (4,) if ctx.quick else (4, 2)
    for batch in batches:
        for label, (kind, kw) in VARIANTS.items():
            k = ACCUMULATE if "accumulate" in label else 1
            model = _train(ctx, kind, kw, batch, k, f"{label}, batch {batch}")
            eval_acc = accuracy(model, xt, yt)
            has_bn = kind != "groupnorm"
            train_acc = (
                accuracy(model, xt, yt, batch_size=batch, train_mode=True) if has_bn else eval_acc
            )
            res.setdefault(label, {})[f"batch {batch}"] = {
                "eval_acc": eval_acc,
                "train_mode_acc": train_acc,
                "gap": train_acc - eval_acc,
            }
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = list(res)
    for j, batch in enumerate(batches):
        vals = [res[lb][f"batch {batch}"]["eval_acc"] for lb in labels]
        ax.bar([i + 0.38 * j for i in range(len(labels))], vals, 0.38, label=f"batch {batch}")
    ax.set_xticks([i + 0.19 for i in range(len(labels))], labels, fontsize=8)
    ax.set(ylabel="test accuracy (eval mode)", title="LeNet trained with tiny batches")
    ax.legend()
    plot = ctx.figure("small_batch_accuracy", fig)
    rows = [
        [lb, batch, v["eval_acc"], v["train_mode_acc"], v["gap"]]
        for lb in labels
        for batch, v in ((b, res[lb][f"batch {b}"]) for b in batches)
    ]
    bn4, acc4 = res["BatchNorm"]["batch 4"], res[labels[-1]]["batch 4"]
    summary = (
        f"With batches of 4, plain BatchNorm reaches {bn4['eval_acc']:.1%} in eval mode "
        f"(train/eval gap {bn4['gap']:+.1%}); Batch Renorm "
        f"{res['BatchRenorm']['batch 4']['eval_acc']:.1%}, GroupNorm (no batch statistics) "
        f"{res['GroupNorm']['batch 4']['eval_acc']:.1%}, and BatchNorm with bnkit.accumulate "
        f"over {ACCUMULATE} micro-batches (one optimizer step and one running-statistic "
        f"update per {ACCUMULATE}) {acc4['eval_acc']:.1%}. The gap is accuracy with each "
        "test batch normalized by its own statistics minus eval-mode accuracy."
    )
    return Section(
        NAME,
        TITLE,
        summary,
        res,
        [plot],
        [
            (
                "Small-batch training",
                ["normalization", "batch", "acc, eval mode", "acc, train mode", "gap"],
                rows,
            )
        ],
    )
