"""Fuzz every layer kind with random, often bad, calls in a subprocess (tests/fuzz/_worker.py):
the process must never die by a signal, and bnkit must match torch's result (and, for the
plain layer call on float input, its gradients) or raise where torch raises, an exception of
torch's type. bnkit may be stricter only on an empty batch (it validates what torch skips;
tests/torch_suite/differences.py): those refusals are counted, not failed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_fuzz_never_crashes_and_never_differs_silently() -> None:
    env = dict(os.environ, BNKIT_FUZZ_EXAMPLES=os.environ.get("BNKIT_FUZZ_EXAMPLES", "2000"))
    out = subprocess.run(
        [sys.executable, "-m", "tests.fuzz._worker"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode >= 0, f"killed by signal {-out.returncode}: {out.stderr[-3000:]}"
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(counts, indent=1))  # shown with -s; the note quotes it
    assert counts["cases"] == int(env["BNKIT_FUZZ_EXAMPLES"])
    assert counts.get("matched torch", 0) > 0 and counts.get("both raised", 0) > 0
    assert counts.get("gradients matched torch", 0) > 0
    assert not any(k.startswith("MISMATCH") for k in counts)
    # bnkit is stricter than torch only on empty input (torch skips its checks there)
    assert not any(k.startswith("  stricter:") for k in counts), counts
