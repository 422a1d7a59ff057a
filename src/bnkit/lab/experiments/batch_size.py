"""Train vs eval mode: accuracy of a trained model evaluated with batch sizes 1..256."""

from __future__ import annotations

import matplotlib.pyplot as plt

from bnkit.lab.context import Context, Section
from bnkit.lab.train import accuracy

NAME = "batch_size"
TITLE = "Train vs eval mode at inference, by batch size"
LR = 0.9


def run(ctx: Context) -> Section:
    model, _ = ctx.trained("lenet", "bnkit", LR)
    nostats, _ = ctx.trained("lenet", "bnkit", LR, track_running_stats=False)
    x, y = ctx.test
    sizes = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    res: dict[str, dict[str, float | None]] = {
        "eval mode": {},
        "train mode": {},
        "track_running_stats=False": {},
    }
    for bs in sizes:
        res["eval mode"][str(bs)] = accuracy(model, x, y, batch_size=bs)
        for key, m in (("train mode", model), ("track_running_stats=False", nostats)):
            try:
                res[key][str(bs)] = accuracy(m, x, y, batch_size=bs, train_mode=True)
            except ValueError:  # one value per channel in the BatchNorm1d layers
                res[key][str(bs)] = None
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for key, vals in res.items():
        pts = [(int(k), v) for k, v in vals.items() if v is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    ax.set(
        xscale="log",
        xlabel="inference batch size",
        ylabel="test accuracy",
        title="LeNet with BatchNorm",
    )
    ax.legend()
    plot = ctx.figure("batch_size_accuracy", fig)
    e, t = res["eval mode"], res["train mode"]
    summary = (
        f"In eval mode the accuracy does not depend on the batch size ({e['1']:.1%} at every "
        f"size); forgetting model.eval() makes every prediction depend on the rest of its "
        f"batch: {t['2']:.1%} with batches of 2, {t['256']:.1%} with 256, and batches of 1 "
        "fail outright (one value per channel). A model trained with "
        "track_running_stats=False has no choice but batch statistics."
    )
    rows = [[bs, e[str(bs)], t[str(bs)], res["track_running_stats=False"][str(bs)]] for bs in sizes]
    return Section(
        NAME,
        TITLE,
        summary,
        res,
        [plot],
        [
            (
                "Test accuracy",
                ["batch size", "acc, eval mode", "acc, train mode", "acc, no running stats"],
                rows,
            )
        ],
    )
