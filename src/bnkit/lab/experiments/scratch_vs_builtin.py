"""From scratch vs built-in: LeNet with bnkit's BatchNorm, torch's, and none."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt

from bnkit.lab.context import Context, Section, smooth

NAME = "scratch_vs_builtin"
TITLE = "From scratch (bnkit) vs built-in (torch) BatchNorm in LeNet"
LR = 0.9  # Dive into Deep Learning's setting for LeNet with BatchNorm


def run(ctx: Context) -> Section:
    runs = {kind: ctx.trained("lenet", kind, LR) for kind in ("bnkit", "torch", "none")}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    for kind, (_, hist) in runs.items():
        label = {"bnkit": "bnkit BatchNorm", "torch": "torch BatchNorm", "none": "no BatchNorm"}[
            kind
        ]
        a1.plot(smooth(hist.losses), label=label)
        a2.plot(range(1, len(hist.test_acc) + 1), hist.test_acc, marker="o", label=label)
    a1.set(xlabel="SGD step", ylabel="training loss", title=f"LeNet, SGD lr={LR}")
    a2.set(xlabel="epoch", ylabel="test accuracy (eval mode)")
    a1.legend(), a2.legend()
    curves = ctx.figure("scratch_vs_builtin_curves", fig)
    nets: dict[str, Any] = {k: m for k, (m, _) in runs.items()}
    bn, tbn = nets["bnkit"][1], nets["torch"][1]
    fig, ax = plt.subplots(figsize=(6.5, 3))
    ch = range(bn.num_features)
    ax.bar([c - 0.2 for c in ch], bn.weight.detach(), 0.4, label="gamma (bnkit)")
    ax.bar([c + 0.2 for c in ch], bn.bias.detach(), 0.4, label="beta (bnkit)")
    ax.plot(ch, tbn.weight.detach(), "k_", markersize=14, label="gamma (torch)")
    ax.plot(ch, tbn.bias.detach(), "r_", markersize=14, label="beta (torch)")
    ax.set(xlabel="channel of the first BatchNorm", title="learned gamma and beta")
    ax.legend(fontsize=7)
    gb = ctx.figure("scratch_vs_builtin_gamma_beta", fig)
    res: dict[str, Any] = {
        kind: {
            "final_test_acc": hist.test_acc[-1],
            "final_train_loss": hist.losses[-1],
        }
        for kind, (_, hist) in runs.items()
    }
    res["first_bn"] = {
        "bnkit_gamma": bn.weight.detach().tolist(),
        "bnkit_beta": bn.bias.detach().tolist(),
        "torch_gamma": tbn.weight.detach().tolist(),
        "torch_beta": tbn.bias.detach().tolist(),
        "max_abs_diff_gamma": float((bn.weight - tbn.weight).detach().abs().max()),
    }
    loss_gap = max(
        abs(a - b) for a, b in zip(runs["bnkit"][1].losses, runs["torch"][1].losses, strict=True)
    )
    res["max_loss_gap_bnkit_vs_torch"] = loss_gap
    summary = (
        f"bnkit's from-scratch BatchNorm and torch's train LeNet along the same loss curve "
        f"(largest per-step loss difference {loss_gap:.1e}, float rounding) to "
        f"{res['bnkit']['final_test_acc']:.1%} and {res['torch']['final_test_acc']:.1%} test "
        f"accuracy; without BatchNorm the same lr reaches {res['none']['final_test_acc']:.1%}. "
        "Speed is measured separately, as a benchmark (the throughput section)."
    )
    rows = [
        [k, v["final_test_acc"], v["final_train_loss"]]
        for k, v in res.items()
        if k in ("bnkit", "torch", "none")
    ]
    return Section(
        NAME,
        TITLE,
        summary,
        res,
        [curves, gb],
        [("LeNet after training", ["BatchNorm", "test acc", "train loss"], rows)],
    )
