"""With vs without BatchNorm: an MLP (784-256-256-10) at the same learning rate."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt

from bnkit.lab.context import Context, Section, smooth
from bnkit.lab.train import accuracy, per_class_accuracy

NAME = "with_without"
TITLE = "With vs without BatchNorm"
LR = 0.5  # high enough that BatchNorm's conditioning shows; the same for both


def run(ctx: Context) -> Section:
    with_bn, hist_bn = ctx.trained("mlp", "bnkit", LR)
    without, hist_plain = ctx.trained("mlp", "none", LR)
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    ax.plot(smooth(hist_bn.losses), label="with BatchNorm (bnkit)")
    ax.plot(smooth(hist_plain.losses), label="without BatchNorm")
    ax.set(
        xlabel="SGD step",
        ylabel="training loss (5-step mean)",
        yscale="log",
        title=f"MLP 784-256-256-10, SGD lr={LR}",
    )
    ax.legend()
    plot = ctx.figure("with_without_loss", fig)
    x, y = ctx.test
    res: dict[str, Any] = {
        "lr": LR,
        "final_train_loss": {"bn": hist_bn.losses[-1], "no_bn": hist_plain.losses[-1]},
        "test_acc": {
            "bn_eval_mode": accuracy(with_bn, x, y),
            "bn_train_mode": accuracy(with_bn, x, y, train_mode=True),
            "no_bn": accuracy(without, x, y),
        },
        "per_class_acc": {
            "bn": per_class_accuracy(with_bn, x, y),
            "no_bn": per_class_accuracy(without, x, y),
        },
    }
    acc = res["test_acc"]
    rows = [[k, res["per_class_acc"]["bn"][k], res["per_class_acc"]["no_bn"][k]] for k in range(10)]
    better = (
        "reaches a lower"
        if hist_bn.losses[-1] < hist_plain.losses[-1]
        else "does not reach a lower"
    )
    summary = (
        f"At the same learning rate ({LR}) the MLP with BatchNorm {better} training loss "
        f"than without ({hist_bn.losses[-1]:.3f} vs {hist_plain.losses[-1]:.3f}) and gets "
        f"{acc['bn_eval_mode']:.1%} test accuracy in eval mode ({acc['bn_train_mode']:.1%} "
        f"when the test batches are normalized with their own statistics) against "
        f"{acc['no_bn']:.1%} without BatchNorm."
    )
    return Section(
        NAME,
        TITLE,
        summary,
        res,
        [plot],
        [("Per-class test accuracy (eval mode)", ["class", "acc with BN", "acc without BN"], rows)],
    )
