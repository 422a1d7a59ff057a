"""Where bnkit deliberately differs from torch: the one documented list.

Each entry names the behaviour, says what torch does and what bnkit does, and why. The torch
suite harness (this folder) and the fuzzer (tests/fuzz) mark the cases they meet with these
keys; everything not listed here matches torch, exception type included.
"""

from __future__ import annotations

DIFFERENCES: dict[str, str] = {
    "empty-batch-checks": (
        "An empty batch (N == 0 or a zero-size spatial dim): torch skips its checks and "
        "returns an empty output; bnkit still checks the input dtype (floating point), the "
        "per-channel tensors' sizes and devices, and raises where a non-empty batch would. "
        "A wrong layer or buffer is reported before the first real batch, not after."
    ),
    "momentum-range": (
        "momentum outside [0, 1]: torch constructs the layer and trains with it (the running "
        "statistics diverge); bnkit refuses it at construction with a ValueError that names "
        "the Keras convention (a Keras momentum m is 1 - m here), the most common cause."
    ),
}


def documented(key: str) -> str:
    """The reason for a documented difference (KeyError for an undocumented one)."""
    return DIFFERENCES[key]
