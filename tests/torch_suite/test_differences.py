"""The documented differences (differences.py) hold as documented: torch does one thing,
bnkit the other. When a torch release or a bnkit change removes one, this fails and the list
is updated."""

from __future__ import annotations

import pytest
import torch

import bnkit
from tests.torch_suite.differences import DIFFERENCES, documented


def test_the_list_is_what_this_file_checks() -> None:
    assert set(DIFFERENCES) == {"empty-batch-checks", "momentum-range"}


@pytest.mark.parametrize(
    "bad",
    ["int-input", "wrong-weight-size", "meta-running-mean"],
)
def test_empty_batch_checks(bad: str) -> None:
    assert documented("empty-batch-checks")
    x = torch.zeros(0, 3, 2, 2)
    ref, ours = torch.nn.BatchNorm2d(3), bnkit.BatchNorm2d(3)
    if bad == "int-input":
        x = x.long()
    for m in (ref, ours):
        if bad == "wrong-weight-size":
            m.weight = torch.nn.Parameter(torch.ones(4))
        elif bad == "meta-running-mean":
            m.running_mean = torch.zeros(3, device="meta")
    assert ref(x).shape == x.shape  # torch skips its checks on an empty batch
    with pytest.raises((NotImplementedError, RuntimeError)):
        ours(x)


@pytest.mark.parametrize("momentum", [-0.5, 1.5])
def test_momentum_range(momentum: float) -> None:
    assert documented("momentum-range")
    torch.nn.BatchNorm2d(3, momentum=momentum)  # torch constructs it
    with pytest.raises(ValueError, match="Keras momentum"):
        bnkit.BatchNorm2d(3, momentum=momentum)
