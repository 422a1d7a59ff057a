"""The backend switch and the fast path's own guarantees."""

from __future__ import annotations

import pytest
import torch

import bnkit
from bnkit.nn import _kernels
from tests.conftest import random_input, reference_train


def test_backend_choice_and_validation(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    assert _kernels.backend() == backend
    with pytest.raises(ValueError, match="backend must be one of"):
        _kernels.set_backend("gpu")
    monkeypatch.setenv("BNKIT_BACKEND", "fast")
    _kernels._choice = None
    with pytest.raises(ValueError, match="BNKIT_BACKEND='fast'"):
        _kernels.backend()
    _kernels.set_backend(backend)


def test_plain_backend_never_calls_the_extension(
    monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    if backend != "plain":
        pytest.skip("plain only")
    monkeypatch.setattr(_kernels, "_build", lambda: (_ for _ in ()).throw(AssertionError))
    bnkit.BatchNorm2d(3)(random_input((4, 3, 3, 3))).sum()


@pytest.mark.parametrize("shape", [(64, 32, 7, 7), (256, 64)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_mean_1e5_statistics(shape, channels_last, backend: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) + 1e5).float()
    if channels_last and len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    bn = bnkit.BatchNorm2d(shape[1]) if len(shape) == 4 else bnkit.BatchNorm1d(shape[1])
    y = bn(x)
    y64, _, _ = reference_train(x, None, None, 1e-5)
    assert (y.double() - y64).abs().max().item() < 5e-5  # torch: ~1e-2 on such data


def test_saved_tensors_no_more_than_torch(backend: str) -> None:
    def saved_bytes(module: torch.nn.Module) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        x = random_input((8, 16, 10, 10)).requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x)
        return total

    assert saved_bytes(bnkit.BatchNorm2d(16)) <= saved_bytes(torch.nn.BatchNorm2d(16)) + 16 * 8 * 2
