"""Parity of bnkit's BatchNorm with torch's and with a float64 closed form.

Hypothesis draws shapes (2D..5D, odd sizes, N = 1 with spatial dims, N = 0), options,
dtypes and memory formats, then runs several steps mixing train and eval on both modules
from the same state, comparing outputs, input/weight/bias gradients, running statistics
and counters.

Tolerances (max abs error against the float64 reference, inputs of scale ~1-10):
float64: 1e-9; float32: 3e-5 on outputs and gradients, 1e-5 relative on running stats.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bnkit
from tests.conftest import random_input, reference_eval, reference_train, reference_train_grads

TORCH = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}
BNKIT = {1: bnkit.BatchNorm1d, 2: bnkit.BatchNorm2d, 3: bnkit.BatchNorm3d}
TOL = {torch.float64: 1e-9, torch.float32: 3e-5}


@st.composite
def cases(draw: st.DrawFn) -> dict:
    rank = draw(st.sampled_from([2, 3, 4, 5]))
    kind = {2: 1, 3: 1, 4: 2, 5: 3}[rank]
    c = draw(st.integers(1, 7))
    n = draw(st.integers(0, 6))
    spatial = tuple(draw(st.integers(1, 5)) for _ in range(rank - 2))
    shape = (n, c, *spatial)
    per_channel = n
    for s in spatial:
        per_channel *= s
    if per_channel == 1:  # one value per channel is an error case, tested elsewhere
        shape = (2, c, *spatial)
    return {
        "kind": kind,
        "shape": shape,
        "affine": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "track": draw(st.booleans()),
        "momentum": draw(st.sampled_from([0.1, 0.3, 1.0, 0.0, None])),
        "eps": draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "channels_last": draw(st.booleans()),
        "modes": draw(st.lists(st.booleans(), min_size=1, max_size=4)),
        "seed": draw(st.integers(0, 2**16)),
    }


def _pair(case: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    kw = dict(
        eps=case["eps"],
        momentum=case["momentum"],
        affine=case["affine"],
        track_running_stats=case["track"],
        bias=case["bias"],
        dtype=case["dtype"],
    )
    c = case["shape"][1]
    ref = TORCH[case["kind"]](c, **kw)
    mine = BNKIT[case["kind"]](c, **kw)
    g = torch.Generator().manual_seed(case["seed"])
    with torch.no_grad():
        if ref.weight is not None:
            ref.weight.copy_(torch.rand(c, generator=g) + 0.5)
        if ref.bias is not None:
            ref.bias.copy_(torch.randn(c, generator=g))
    mine.load_state_dict(ref.state_dict())
    return ref, mine


@settings(max_examples=300)
@given(cases())
def test_modules_match_torch_and_float64(case: dict) -> None:
    ref, mine = _pair(case)
    tol = TOL[case["dtype"]]
    for step, train in enumerate(case["modes"]):
        ref.train(train)
        mine.train(train)
        x = random_input(case["shape"], case["dtype"], case["seed"] + step, case["channels_last"])
        xr = x.detach().clone().requires_grad_()
        xm = x.detach().clone().requires_grad_()
        stats_before = None if mine.running_mean is None else mine.running_mean.clone()
        var_before = None if mine.running_var is None else mine.running_var.clone()
        yr, ym = ref(xr), mine(xm)
        assert ym.shape == yr.shape and ym.dtype == yr.dtype
        if case["channels_last"] and x.dim() in (4, 5) and x.numel() > 0:
            fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            assert ym.is_contiguous(memory_format=fmt)
        use_batch = train or not case["track"]
        if x.numel() > 0:
            if use_batch:
                y64, mean64, var64 = reference_train(x, mine.weight, mine.bias, case["eps"])
            else:
                y64 = reference_eval(
                    x, stats_before, var_before, mine.weight, mine.bias, case["eps"]
                )
            torch.testing.assert_close(ym.double(), y64, atol=tol, rtol=0)
            torch.testing.assert_close(ym, yr, atol=2 * tol, rtol=0)
        grad = (
            random_input(case["shape"], case["dtype"], case["seed"] + 99).to(
                memory_format=torch.contiguous_format
            )
            - 1.0
        )
        yr.backward(grad)
        ym.backward(grad)
        assert xm.grad is not None and xr.grad is not None
        if x.numel() > 0 and use_batch:
            gx, gw, gb = reference_train_grads(x, mine.weight, grad, case["eps"])
            _no_worse_than_torch(xm.grad, xr.grad, gx, tol)
            if mine.weight is not None:
                _no_worse_than_torch(mine.weight.grad, ref.weight.grad, gw, tol)
            if mine.bias is not None:
                _no_worse_than_torch(mine.bias.grad, ref.bias.grad, gb, tol)
        else:
            torch.testing.assert_close(xm.grad, xr.grad, atol=tol, rtol=tol)
        for name in ("weight", "bias"):
            pr, pm = getattr(ref, name), getattr(mine, name)
            if pr is not None:
                pr.grad = None
                pm.grad = None
        for name in ("running_mean", "running_var"):
            br, bm = getattr(ref, name), getattr(mine, name)
            assert (br is None) == (bm is None)
            if br is not None:
                torch.testing.assert_close(bm, br, atol=tol, rtol=tol)
        if ref.num_batches_tracked is not None:
            assert mine.num_batches_tracked.dtype == torch.int64
            assert int(mine.num_batches_tracked) == int(ref.num_batches_tracked)


def _no_worse_than_torch(
    mine: torch.Tensor, theirs: torch.Tensor, exact: torch.Tensor, tol: float
) -> None:
    """Error vs float64 within ``tol`` relative to the largest value, or within 2x torch's.

    Gradients of a channel with a tiny variance are ill-conditioned; there the bar is
    torch's own float32 error.
    """
    scale = max(1.0, exact.abs().max().item())
    err_mine = (mine.double() - exact).abs().max().item()
    err_torch = (theirs.double() - exact).abs().max().item()
    assert err_mine <= max(tol * scale, 2 * err_torch), (err_mine, err_torch, scale)
