"""A/B of the C++ kernels: the working tree's ``_kernels.cpp`` against the one of a git
revision, both built and timed in one process (what a kernel change bought, without the
machine's drift between runs in the way).

    python benchmarks/bench_kernels_ab.py --allocator tcmalloc             # against HEAD
    python benchmarks/bench_kernels_ab.py --rev HEAD~3 --repeats 60 --allocator tcmalloc

(Without tcmalloc every large output is fresh memory from the OS and its page faults,
which vary from call to call, dominate the differences; see bench_batchnorm.py.)

Each row: the median time of each build for the eval forward, the training forward and
the training backward (float32, weight and bias), and new/old (< 1: the change is faster).
The two builds are timed in turn, each call after an untimed call of the same build.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from bench_batchnorm import parser, setup
from torch.utils import cpp_extension

from bnkit.lab.timing import interleaved_times

SOURCE = Path(__file__).resolve().parents[1] / "src" / "bnkit" / "nn" / "_kernels.cpp"
SHAPES = [
    ((128, 16, 32, 32), True),
    ((128, 64, 8, 8), True),
    ((32, 64, 56, 56), True),
    ((32, 64, 56, 56), False),
    ((32, 128, 28, 28), True),
    ((32, 128, 28, 28), False),
    ((256, 256, 14, 14), False),
    ((256, 256, 14, 14), True),
    ((64, 512, 7, 7), False),
    ((64, 512, 7, 7), True),
    ((4096, 1024), False),
    ((16, 64, 112, 112), False),
    ((16, 96, 112, 112), False),
]


def _build(name: str, source: str) -> Any:
    flags = ["-O3", "-fopenmp", "-ffp-contract=fast"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return cpp_extension.load_inline(
        name=name,
        cpp_sources=[source],
        functions=["forward_train", "backward_train", "forward_eval"],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
    )


def _calls(mod: Any, x: torch.Tensor) -> dict[str, Any]:
    """The three entry points on x; older sources take fewer arguments (no activation)."""
    c = x.shape[1]
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    rm, rv = torch.zeros(c), torch.ones(c)
    go = torch.randn_like(x)
    try:
        _, m, v, _ = mod.forward_train(x, w, b, 1e-5, None, None, 0.0, None, 0)
        new = True
    except TypeError:
        _, m, v = mod.forward_train(x, w, b, 1e-5, None, None, 0.0)
        new = False
    if new:
        return {
            "eval": lambda: mod.forward_eval(x, rm, rv, w, b, 1e-5, None, 0),
            "train": lambda: mod.forward_train(x, w, b, 1e-5, None, None, 0.0, None, 0),
            "bwd": lambda: mod.backward_train(
                go, x, w, m, v, 1e-5, False, True, False, None, 0, None
            ),
        }
    return {
        "eval": lambda: mod.forward_eval(x, rm, rv, w, b, 1e-5),
        "train": lambda: mod.forward_train(x, w, b, 1e-5, None, None, 0.0),
        "bwd": lambda: mod.backward_train(go, x, w, m, v, 1e-5, False, True, False),
    }


def main() -> None:
    ap = parser(__doc__, repeats=40)
    ap.add_argument("--rev", default="HEAD", help="git revision of the old kernels")
    args = setup(ap, header=False)
    rel = SOURCE.relative_to(SOURCE.parents[3]).as_posix()
    shown = subprocess.run(
        ["git", "show", f"{args.rev}:{rel}"],
        cwd=SOURCE.parents[3],
        capture_output=True,
        text=True,
    )
    if shown.returncode != 0:
        sys.exit(f"--rev {args.rev}: git has no {rel} there ({shown.stderr.strip()})")
    old_src = shown.stdout
    old = _build("bnkit_ab_old", old_src)
    new = _build("bnkit_ab_new", SOURCE.read_text())
    print(f"old: {args.rev}, new: working tree, {args.threads} thread(s), {args.repeats} repeats")
    print(f"{'shape':<19} {'format':<14} {'case':<6} {'old ms':>8} {'new ms':>8} {'new/old':>8}")
    for shape, cl in SHAPES:
        x = torch.randn(shape) * 2 + 1
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        calls = {"old": _calls(old, x), "new": _calls(new, x)}
        for case in ("eval", "train", "bwd"):
            t = interleaved_times(
                {k: calls[k][case] for k in ("old", "new")}, repeats=args.repeats, warmup=3
            )
            o, n = statistics.median(t["old"]), statistics.median(t["new"])
            fmt = "channels_last" if cl else "contiguous"
            print(f"{shape!s:<19} {fmt:<14} {case:<6} {o * 1e3:8.3f} {n * 1e3:8.3f} {n / o:8.2f}")


if __name__ == "__main__":
    main()
