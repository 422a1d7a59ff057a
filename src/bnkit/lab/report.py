"""``bnkit report``: run the experiments and write report.html, results.json and the plots.

Everything is written into a staging directory next to the output directory and moved
into place only when the whole report is complete: an interrupted run (Ctrl-C) leaves the
previous report, if any, as it was, and no half-written one.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bnkit.lab import require

__all__ = ["build_report", "MARKER"]

MARKER = ".bnkit-report"


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).exists())):
        raise ValueError(
            f"--out {out}: exists and is not a bnkit report directory (no {MARKER} file); "
            "refusing to replace it: choose a new or empty directory"
        )


def _swap_into_place(staging: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def _machine() -> dict[str, Any]:
    import numpy
    import torch

    import bnkit

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "bnkit": bnkit.__version__,
    }


def _fmt(value: Any, pointer: str, header: str = "") -> str:
    if isinstance(value, bool) or value is None:
        text = "—" if value is None else str(value)
    elif isinstance(value, float):
        if math.isnan(value):
            text = "nan"
        elif 0 <= value <= 1 and ("acc" in pointer or "acc" in header):
            text = f"{value:.1%}"
        elif value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e9):
            text = f"{value:.2e}"
        elif abs(value) >= 1e3:
            text = f"{value:,.0f}"
        else:
            text = f"{value:.4g}"
    else:
        return html.escape(str(value))
    return f'<a class="num" href="results.json" title="results.json#{pointer}">{text}</a>'


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:980px;margin:2em auto;
padding:0 1em;color:#1d2330;line-height:1.45}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:2em}
.meta{color:#57606a;font-size:.9em} img{max-width:100%;border:1px solid #eee;margin:.5em 0}
.scroll{max-width:100%;overflow-x:auto;margin:.6em 0}
table{border-collapse:collapse;font-size:.9em} td,th{border:1px solid #d0d7de;
padding:.25em .6em;text-align:right;overflow-wrap:anywhere} th{background:#f6f8fa}
td:first-child{text-align:left} caption{text-align:left;font-weight:600}
p,li{overflow-wrap:anywhere}
a.num{color:inherit;text-decoration:none;border-bottom:1px dotted #8c959f}
.missing{background:#fff8c5;padding:.6em;border:1px solid #d4a72c}
"""


def _html(sections: list[Any], meta: dict[str, Any], staging: Path) -> str:
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<title>bnkit report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>What BatchNorm does: the bnkit report</h1>",
        f"<p class='meta'>Data: {html.escape(meta['data'])}. Seed {meta['seed']}, "
        f"{meta['epochs']} epoch(s){' (quick run)' if meta['quick'] else ''}. "
        f"Machine: {html.escape(meta['machine']['platform'])}, "
        f"{meta['machine']['cpu_count']} CPU(s), torch {meta['machine']['torch']}, "
        f"numpy {meta['machine']['numpy']}, bnkit {meta['machine']['bnkit']}, python "
        f"{meta['machine']['python']}. Took {meta['seconds']:.0f} s. Every number links to "
        "<a href='results.json'>results.json</a> (hover for its path).</p>",
        "<h2>Summary</h2><ul>",
    ]
    for s in sections:
        parts.append(
            f"<li><a href='#{s.name}'><b>{html.escape(s.title)}</b></a>: "
            f"{html.escape(s.summary)}</li>"
        )
    parts.append("</ul>")
    for s in sections:
        parts.append(f"<h2 id='{s.name}'>{html.escape(s.title)}</h2>")
        cls = "" if s.available else " class='missing'"
        parts.append(f"<p{cls}>{html.escape(s.summary)}</p>")
        for plot in s.plots:
            data = base64.b64encode((staging / plot).read_bytes()).decode()
            parts.append(f"<img alt='{html.escape(plot)}' src='data:image/png;base64,{data}'>")
        for ti, (caption, header, rows) in enumerate(s.tables):
            # a wide table scrolls inside its own box instead of widening the page
            parts.append(
                f"<div class='scroll'><table><caption>{html.escape(caption)}</caption><tr>"
            )
            parts.extend(f"<th>{html.escape(str(h))}</th>" for h in header)
            parts.append("</tr>")
            for ri, row in enumerate(rows):
                base = f"/sections/{s.name}/tables/{ti}/rows/{ri}"
                cells = "".join(
                    f"<td>{_fmt(v, f'{base}/{ci}', header[ci])}</td>" for ci, v in enumerate(row)
                )
                parts.append(f"<tr>{cells}</tr>")
            parts.append("</table></div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def build_report(
    out: str | os.PathLike[str] = "bnkit-report",
    *,
    data: str = "embedded",
    epochs: int | None = None,
    seed: int = 0,
    quick: bool = False,
    only: Sequence[str] | None = None,
    progress: bool = True,
) -> Path:
    """Run the experiments and write ``out/report.html``, ``out/results.json`` and PNGs.

    Returns the output directory. ``only`` restricts the run to some experiments
    (see ``bnkit.lab.experiments.NAMES``).
    """
    for needed in ("matplotlib", "tqdm"):
        require(needed)
    import torch

    from bnkit.lab import data as data_mod
    from bnkit.lab import experiments
    from bnkit.lab.context import Context

    if epochs is not None and epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {epochs}")
    chosen = list(only) if only else list(experiments.NAMES)
    unknown = [n for n in chosen if n not in experiments.NAMES]
    if unknown:
        raise ValueError(
            f"--only: unknown experiment(s) {unknown}; choose from {experiments.NAMES}"
        )
    out_path = Path(out).expanduser().resolve()
    _check_out(out_path)
    dataset = data_mod.load(data)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = out_path.parent / f".{out_path.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    start = time.perf_counter()
    try:
        torch.manual_seed(seed)
        ctx = Context(dataset, staging, seed, epochs or (1 if quick else 6), quick, progress)
        sections = []
        for mod in experiments.ALL:
            if mod.NAME in chosen:
                print(f"bnkit report: {mod.TITLE}", file=sys.stderr)
                sections.append(mod.run(ctx))
        meta = {
            "data": dataset.describe(),
            "source": data,
            "seed": seed,
            "epochs": ctx.epochs,
            "quick": quick,
            "machine": _machine(),
            "seconds": time.perf_counter() - start,
        }
        results = {
            "meta": meta,
            "sections": {
                s.name: {
                    "title": s.title,
                    "summary": s.summary,
                    "available": s.available,
                    "results": s.results,
                    "plots": s.plots,
                    "tables": [{"caption": c, "header": h, "rows": r} for c, h, r in s.tables],
                }
                for s in sections
            },
        }
        (staging / "results.json").write_text(json.dumps(_jsonable(results), indent=1))
        (staging / "report.html").write_text(_html(sections, meta, staging))
        (staging / MARKER).write_text("written by bnkit report\n")
        _swap_into_place(staging, out_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_path
