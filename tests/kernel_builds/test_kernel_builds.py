"""The C++ fast path built two other ways and run through the parity and hardening tests
in a subprocess (the module's one call too: its declines read odd objects):

* ``-DBNKIT_PORTABLE``: no x86 intrinsics, the code aarch64 and every other architecture
  compile (its Writer once overflowed its stack buffer there), with every output streamed
  through the Writer (``BNKIT_STREAM_BYTES=0``);
* the same under AddressSanitizer and UBSan (``-fsanitize=address,undefined``), the
  runtime preloaded into the Python process.

Each builds once into its own cache entry (~30-60 s on 2 cores), then runs in ~20 s.
Skipped where no C++ compiler is found.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TESTS = [
    "tests/nn/test_batchnorm_parity.py",
    "tests/nn/test_hardening.py",
    "tests/nn/test_kernels.py",
    "tests/nn/test_fused.py",
    "tests/nn/test_layer_call.py",
    "tests/nn/test_staged.py",  # the 16-bit loads, stores and blocks (portable: no F16C)
]


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def _run(flags: str, extra_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.update(
        BNKIT_BUILD_FLAGS=flags,
        BNKIT_BACKEND="cpp",
        BNKIT_STREAM_BYTES="0",
        BNKIT_HYPOTHESIS_EXAMPLES="10",
        **extra_env,
    )
    probe = (
        "import bnkit.nn._kernels as k, sys; m = k.get(); "
        "print('x86_intrinsics', m.x86_intrinsics()); sys.stdout.flush()"
    )
    first = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert "x86_intrinsics False" in first.stdout, first.stdout
    # -k cpp: the tests parametrized over backends, on the C++ one (the plain one is
    # the same Python as in the main run)
    return subprocess.run(
        # -s: a sanitizer report goes straight to our stderr, not into pytest's capture
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-s",
            "-p",
            "no:cacheprovider",
            "-k",
            "cpp",
            *TESTS,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_portable_build_passes_parity_and_hardening() -> None:
    if _compiler() is None:
        pytest.skip("no C++ compiler")
    out = _run("-DBNKIT_PORTABLE", {})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " passed" in out.stdout


@pytest.mark.slow
def test_sanitized_build_runs_clean() -> None:
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler")
    libs = [
        subprocess.run(
            [cxx, f"-print-file-name={lib}"], capture_output=True, text=True
        ).stdout.strip()
        for lib in ("libasan.so", "libstdc++.so")
    ]
    if not all(Path(lib).is_absolute() and Path(lib).exists() for lib in libs):
        pytest.skip("no AddressSanitizer runtime for this compiler")
    out = _run(
        "-DBNKIT_PORTABLE -fsanitize=address,undefined -fno-sanitize-recover=undefined "
        "-fno-omit-frame-pointer",
        {
            # the ASan runtime first; libstdc++ too, or ASan cannot find the real
            # __cxa_throw when the extension throws (a TORCH_CHECK) and aborts
            "LD_PRELOAD": " ".join(libs),
            # Python itself is not instrumented and keeps memory to exit: leaks are not ours
            "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:halt_on_error=1",
            "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
        },
    )
    report = out.stdout[-3000:] + out.stderr[-6000:]
    assert "ERROR: AddressSanitizer" not in out.stderr, report
    assert "runtime error:" not in out.stderr, report
    assert out.returncode == 0, report
