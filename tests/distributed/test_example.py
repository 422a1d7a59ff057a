"""The README's torchrun example, run several times in a row: every run must exit 0 and
no rank may die at interpreter exit ("terminate called ..." after destroy_process_group
was reported in 3 of 12 runs on one machine)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNS = int(os.environ.get("BNKIT_TORCHRUN_RUNS", "4"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_readme_torchrun_example_exits_cleanly_every_time() -> None:
    torchrun = shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    for i in range(RUNS):
        out = subprocess.run(
            [*cmd, "--nproc_per_node=2", f"--master_port={_free_port()}", "examples/ddp_train.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        both = out.stdout + out.stderr
        assert out.returncode == 0, f"run {i}: exit {out.returncode}\n{both[-3000:]}"
        assert "terminate called" not in both and "Signal" not in both, f"run {i}: {both[-3000:]}"
        assert "test accuracy" in out.stdout
