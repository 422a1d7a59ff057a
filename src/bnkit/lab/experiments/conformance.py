"""Conformance: the checker's table for bnkit, torch, and the shipped from-scratch examples."""

from __future__ import annotations

import importlib
from typing import Any

import torch

import bnkit
from bnkit.lab.context import Context, Section
from bnkit.lab.scratch import EXAMPLES
from bnkit.tools.conform import conform

NAME = "conformance"
TITLE = "Conformance of from-scratch BatchNorms"


def run(ctx: Context) -> Section:
    targets: dict[str, Any] = {
        "bnkit.BatchNorm2d": bnkit.BatchNorm2d,
        "torch.nn.BatchNorm2d": torch.nn.BatchNorm2d,
    }
    for key, (mod, cls) in EXAMPLES.items():
        targets[f"scratch.{key}"] = getattr(importlib.import_module(mod), cls)
    reports = {name: conform(t) for name, t in targets.items()}
    probes = [p.name for p in next(iter(reports.values())).probes]
    header = ["property", *reports]
    rows = []
    for i, probe in enumerate(probes):
        row: list[Any] = [probe]
        for rep in reports.values():
            p = rep.probes[i] if i < len(rep.probes) and rep.probes[i].name == probe else None
            row.append(p.status if p else "n/a")
        rows.append(row)
    failures = {
        name: [f"{p.name}: {p.diagnosis}" for p in rep.failures] for name, rep in reports.items()
    }
    fail_rows = [[name, "; ".join(f) or "none"] for name, f in failures.items()]
    res = {
        name: {"ok": rep.ok, "probes": [p.__dict__ for p in rep.probes], "found": rep.found}
        for name, rep in reports.items()
    }
    bad = [n for n, r in reports.items() if not r.ok]
    summary = (
        f"bnkit's and torch's BatchNorm pass every probe; the {len(bad)} typical from-scratch "
        "implementations shipped in bnkit.lab.scratch each fail some, and the checker names the "
        "mistake: statistics chosen by torch.is_grad_enabled() (Dive into Deep Learning's "
        "version), biased running variance, Keras-style momentum, unbiased normalization, eps "
        "outside the square root, per-element statistics, a backward without the mean and "
        "variance terms."
    )
    return Section(
        NAME,
        TITLE,
        summary,
        res,
        [],
        [
            ("Probe results", header, rows),
            ("What failed, and why", ["implementation", "diagnosis"], fail_rows),
        ],
    )
