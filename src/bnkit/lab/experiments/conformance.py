"""Conformance: the checker's table for bnkit and for shipped from-scratch examples."""

from __future__ import annotations

import importlib

from bnkit.lab.context import Context, Section

NAME = "conformance"
TITLE = "Conformance of from-scratch BatchNorms"


def run(ctx: Context) -> Section:
    try:
        conform = importlib.import_module("bnkit.tools.conform")
    except ImportError:
        return Section(
            NAME,
            TITLE,
            "The conformance checker (bnkit.conform) is not part of this version of bnkit, "
            "so this section has no results yet.",
            {"available": False},
            available=False,
        )
    report = conform.conform_examples()  # pragma: no cover - lands with the checker
    return Section(NAME, TITLE, report.summary, report.results, [], report.tables)
