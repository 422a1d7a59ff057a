"""The backend switch and the fast path's own guarantees."""

from __future__ import annotations

import pytest
import torch

import bnkit
from bnkit.nn import _kernels, _router
from tests.conftest import random_input, reference_train, reference_train_grads


def test_backend_choice_and_validation(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    assert _kernels.backend() == backend
    with pytest.raises(ValueError, match="backend must be one of"):
        _kernels.set_backend("gpu")
    monkeypatch.setenv("BNKIT_BACKEND", "fast")
    monkeypatch.setattr(_kernels, "_env_value", None)  # as in a fresh process
    _kernels._choice = None
    with pytest.raises(ValueError, match="BNKIT_BACKEND='fast'"):
        _kernels.backend()
    _kernels.set_backend(backend)


class _Forbidden:
    """Stands in for the loaded extension: any use of it fails the test."""

    def __getattr__(self, name: str) -> None:
        raise AssertionError(f"the extension was called ({name})")


def _every_entry_point() -> None:
    x = random_input((4, 3, 3, 3)).requires_grad_()
    bn = bnkit.BatchNorm2d(3)
    bn(x).sum().backward()  # training forward + backward (fused running update)
    bn.eval()(x).sum().backward()  # eval forward + backward
    bnkit.functional.batch_stats(x.detach())
    bnkit.functional.batch_norm_stateless(x, None, None, training=True).output.sum().backward()


def test_plain_backend_never_calls_the_extension(
    monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    if backend != "plain":
        pytest.skip("plain only")
    monkeypatch.setattr(_kernels, "_module", _Forbidden())
    monkeypatch.setattr(_router, "_fast", None)
    monkeypatch.setattr(_kernels, "_build", _Forbidden)
    _every_entry_point()
    # the same stand-in does fail the cpp backend: the check above can fail
    _kernels.set_backend("cpp")
    with pytest.raises(AssertionError, match="the extension was called"):
        _every_entry_point()
    _kernels.set_backend("plain")


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


# channels-fastest inputs whose rows span several of the kernel's blocks (four streams of
# >= 16 KiB), a short last block with rows left over, and (C = 3) float32 flushes inside a
# block; NCHW runs longer than a lane's chunk (flushed mid-run, with a tail), and thread
# ranges that start mid-channel and hold fewer runs than channels (4 threads, 15 runs of 5
# channels); NCHW runs long enough for the one-sweep kernel (nchw_fused: >= 24 KiB a run),
# in blocks of several channels, one channel, and fewer channels than threads; on 1, 2
# and 4 threads, so that each thread's range ends mid-block.
@pytest.mark.parametrize(
    "shape,channels_last",
    [
        ((13001, 3), True),
        ((1001, 200), True),
        ((9, 40, 33, 7), True),
        ((5, 3, 61, 67), True),
        ((2, 3, 113, 117), False),
        ((3, 7, 70, 90), False),
        ((2, 5, 1, 12301), False),
        ((3, 5, 3, 3), False),
        ((7, 40, 5, 5), False),
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_kernel_blocks_match_float64(shape, channels_last, dtype, threads, backend: str) -> None:
    x = random_input(shape, dtype=dtype, seed=3, channels_last=channels_last and len(shape) == 4)
    x.requires_grad_()
    go = random_input(shape, dtype=dtype, seed=4, channels_last=channels_last and len(shape) == 4)
    kind = bnkit.BatchNorm2d if len(shape) == 4 else bnkit.BatchNorm1d
    bn = kind(shape[1], momentum=None).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = bn(x)
        gx, gw, gb = torch.autograd.grad(y, (x, bn.weight, bn.bias), go)
    finally:
        torch.set_num_threads(before)
    y64, mean64, var64 = reference_train(x.detach(), bn.weight, bn.bias, bn.eps)
    gx64, gw64, gb64 = reference_train_grads(x.detach(), bn.weight, go, bn.eps)
    n = x.numel() // shape[1]
    tol = 2e-6 if dtype == torch.float32 else 1e-13
    assert (y.double() - y64).abs().max().item() < tol * 10
    assert (bn.running_mean.double() - mean64).abs().max().item() < tol * 10
    assert (bn.running_var.double() - var64 * n / (n - 1)).abs().max().item() < tol * 100
    assert (gx.double() - gx64).abs().max().item() < tol * 10
    assert ((gw.double() - gw64).abs() / (1 + gw64.abs())).max().item() < tol * 100
    assert ((gb.double() - gb64).abs() / (1 + gb64.abs())).max().item() < tol * 100


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


_STREAM_CHECK = """
import torch, bnkit
from bnkit.nn import _kernels, _router
from tests.conftest import random_input
torch.manual_seed(0)
worst = {torch.float32: 0.0, torch.float64: 0.0}
# odd sizes: runs that start and end off the 32-byte grid, rows wider than the buffer
for shape, cl in [((3, 5, 7, 9), False), ((3, 5, 7, 9), True), ((2, 1100, 3, 1), True),
                  ((37, 1100), False), ((4, 3, 33, 35), False), ((5, 7, 3, 2, 3), True),
                  ((2, 3, 80, 81), False)]:
    for dtype in (torch.float32, torch.float64):
        x = random_input(shape).to(dtype)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                             else torch.channels_last_3d)
        x.requires_grad_()
        outs = []
        for backend in ("cpp", "plain"):
            _kernels.set_backend(backend)
            torch.manual_seed(1)
            kind = {2: bnkit.BatchNorm1d, 4: bnkit.BatchNorm2d, 5: bnkit.BatchNorm3d}[x.dim()]
            bn = kind(shape[1]).to(dtype)
            with torch.no_grad():
                bn.weight.uniform_(0.5, 1.5); bn.bias.uniform_(-1, 1)
            y = bn(x)
            (gx,) = torch.autograd.grad(y, x, torch.ones_like(y) + x.detach())
            bn.eval()
            outs.append((y, gx, bn(x.detach())))
        for a, b in zip(*outs):
            err = ((a - b).abs().max() / (1 + b.abs().max())).item()
            worst[dtype] = max(worst[dtype], err)
print(worst[torch.float32], worst[torch.float64])
"""


def test_streaming_stores_write_every_value(backend: str) -> None:
    """The non-temporal-store writer (used for large outputs) on small odd-sized tensors."""
    if backend != "cpp":
        pytest.skip("cpp only")
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "BNKIT_STREAM_BYTES": "0", "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, "-c", _STREAM_CHECK], env=env, capture_output=True, text=True, check=True
    )
    f32, f64 = map(float, out.stdout.split())
    assert f32 < 5e-5 and f64 < 1e-12, out.stdout


def test_running_stats_update_bumps_version_counter(backend: str) -> None:
    """The fused update writes through raw pointers; autograd must still see a change."""
    bn = bnkit.BatchNorm2d(3)
    before = (bn.running_mean._version, bn.running_var._version)
    bn(random_input((4, 3, 5, 5)))
    assert bn.running_mean._version > before[0] and bn.running_var._version > before[1]


def test_bad_stream_bytes_setting_is_named(backend: str) -> None:
    if backend != "cpp":
        pytest.skip("cpp only")
    import os
    import subprocess
    import sys

    code = "import torch, bnkit; bnkit.BatchNorm1d(4)(torch.randn(8, 4) + 3)"
    env = {**os.environ, "BNKIT_STREAM_BYTES": "8MB"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "BNKIT_STREAM_BYTES='8MB': expected a number of bytes" in out.stderr


@pytest.mark.parametrize(
    "shape,channels_last",
    [((6, 5, 7, 9), False), ((6, 5, 7, 9), True), ((300, 40), False), ((3, 130, 5), False)],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("grads", ["all", "input", "params"])
def test_eval_backward_matches_float64(shape, channels_last, dtype, grads, backend: str) -> None:
    """The eval-mode backward (one kernel call on the fast path) against the closed form:
    dx = g * w / sqrt(rv + eps), dw = sum(g * (x - rm)) / sqrt(rv + eps), db = sum(g)."""
    x = random_input(shape, dtype=dtype, seed=5, channels_last=channels_last)
    go = random_input(shape, dtype=dtype, seed=6)
    kind = bnkit.BatchNorm2d if len(shape) == 4 else bnkit.BatchNorm1d
    bn = kind(shape[1]).to(dtype).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(shape[1], dtype=dtype) * 2 + 4)
        bn.running_var.uniform_(0.5, 3)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    x.requires_grad_(grads != "params")
    bn.requires_grad_(grads != "input")
    wanted = [t for t in (x, bn.weight, bn.bias) if t.requires_grad]
    got = torch.autograd.grad(bn(x), wanted, go)
    view = (1, -1) + (1,) * (len(shape) - 2)
    invstd = 1 / (bn.running_var.double() + bn.eps).sqrt()
    d = x.detach().double() - bn.running_mean.double().view(view)
    dims = [0, *range(2, len(shape))]
    ref = {
        "x": go.double() * (bn.weight.double() * invstd).view(view),
        "w": (go.double() * d).sum(dims) * invstd,
        "b": go.double().sum(dims),
    }
    names = [n for n, t in zip("xwb", (x, bn.weight, bn.bias), strict=True) if t.requires_grad]
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for name, g in zip(names, got, strict=True):
        r = ref[name]
        assert g.dtype == dtype and g.shape == r.shape, name
        assert ((g.double() - r).abs() / (1 + r.abs())).max().item() < tol, name


def test_eval_backward_ignores_inf_in_input(backend: str) -> None:
    """dx does not depend on x in eval mode: an inf in x leaves it finite, as torch's."""
    x = random_input((4, 3, 5, 5)).requires_grad_()
    with torch.no_grad():
        x[1, 2, 3, 4] = float("inf")
    mods = [torch.nn.BatchNorm2d(3).eval(), bnkit.BatchNorm2d(3).eval()]
    grads = [torch.autograd.grad(m(x), x, torch.ones_like(x))[0] for m in mods]
    assert torch.isfinite(grads[1]).all()
    torch.testing.assert_close(grads[1], grads[0])
