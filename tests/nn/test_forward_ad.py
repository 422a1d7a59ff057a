"""Forward-mode AD (``torch.autograd.forward_ad`` dual tensors, ``torch.func.jvp``) through
bnkit's BatchNorm, as through torch's: the tangent of the output is torch's (float32) and
the numerical one (float64 gradcheck with ``check_forward_ad``), in training and eval
mode, on every layout the fast path takes (which steps aside for the plain path while a
dual level is open: its kernels would drop the tangent)."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import bnkit
from bnkit.nn import functional as F
from tests.conftest import random_input

# torch's forward AD scripts its own decompositions on first use
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

LAYOUTS = [
    ((6, 5, 4, 3), False),
    ((6, 5, 4, 3), True),
    ((7, 5), False),
    ((3, 4, 9), False),
    ((2, 3, 3, 4, 2), True),
]


def _tensors(shape: tuple[int, ...], cl: bool, seed: int) -> dict[str, torch.Tensor]:
    c = shape[1]
    g = torch.Generator().manual_seed(seed)
    return {
        "x": random_input(shape, seed=seed, channels_last=cl),
        "tx": random_input(shape, seed=seed + 1, channels_last=cl),
        "w": torch.rand(c, generator=g) + 0.5,
        "b": torch.randn(c, generator=g),
        "tw": torch.randn(c, generator=g),
        "tb": torch.randn(c, generator=g),
        "rm": torch.randn(c, generator=g) + 1.0,
        "rv": torch.rand(c, generator=g) + 0.5,
    }


def _dual_call(fn, t: dict[str, torch.Tensor], training: bool, duals: str):
    rm, rv = t["rm"].clone(), t["rv"].clone()
    with fwAD.dual_level():
        x = fwAD.make_dual(t["x"], t["tx"]) if "x" in duals else t["x"]
        w = fwAD.make_dual(t["w"], t["tw"]) if "w" in duals else t["w"]
        b = fwAD.make_dual(t["b"], t["tb"]) if "b" in duals else t["b"]
        y = fn(x, rm, rv, w, b, training, 0.1, 1e-5)
        primal, tangent = fwAD.unpack_dual(y)
        # the running statistics carry no tangent, as torch's
        assert fwAD.unpack_dual(rm).tangent is None
        assert fwAD.unpack_dual(rv).tangent is None
    return primal, tangent, rm, rv


@pytest.mark.parametrize("shape,cl", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("duals", ["x", "wb", "xwb"])
def test_dual_tensors_match_torch(shape, cl, training, duals) -> None:
    t = _tensors(shape, cl, seed=len(shape) * 10 + cl)
    ours = _dual_call(F.batch_norm, t, training, duals)
    ref = _dual_call(torch.nn.functional.batch_norm, t, training, duals)
    assert ours[1] is not None, "the tangent was dropped"
    torch.testing.assert_close(ours[0], ref[0], rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(ours[1], ref[1], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(ours[2], ref[2], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours[3], ref[3], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("training", [True, False])
def test_module_under_dual_level_matches_torch(training: bool) -> None:
    t = _tensors((8, 4, 5, 5), True, seed=3)
    tm, bm = torch.nn.BatchNorm2d(4), bnkit.BatchNorm2d(4)
    with torch.no_grad():
        for m in (tm, bm):
            m.weight.copy_(t["w"])
            m.bias.copy_(t["b"])
            m.running_mean.copy_(t["rm"])
            m.running_var.copy_(t["rv"])
            m.train(training)
    outs = []
    for m in (tm, bm):
        with fwAD.dual_level():
            y = m(fwAD.make_dual(t["x"], t["tx"]))
            outs.append(fwAD.unpack_dual(y))
    torch.testing.assert_close(outs[1].primal, outs[0].primal, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(outs[1].tangent, outs[0].tangent, rtol=2e-5, atol=2e-5)
    assert bnkit.nn.batchnorm.TorchBatchNorm.state_dict(bm).keys() == tm.state_dict().keys()
    for k, v in tm.state_dict().items():
        torch.testing.assert_close(bm.state_dict()[k], v, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape,cl", [((4, 3, 3, 2), False), ((4, 3, 3, 2), True), ((5, 3), False)])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_forward_and_backward_ad_float64(shape, cl, training) -> None:
    t = {k: v.double() for k, v in _tensors(shape, cl, seed=7).items()}
    rm, rv = t["rm"], t["rv"]

    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # training: no running statistics (the update is not a function of the inputs)
        if training:
            return F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
        return F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5)

    inputs = tuple(t[k].clone().requires_grad_() for k in ("x", "w", "b"))
    assert torch.autograd.gradcheck(fn, inputs, check_forward_ad=True)


@pytest.mark.parametrize("training", [True, False])
def test_func_jvp_matches_torch(training: bool) -> None:
    t = _tensors((6, 3, 4, 4), False, seed=11)

    def call(fn):
        def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            if training:
                return fn(x, None, None, w, t["b"], True, 0.1, 1e-5)
            return fn(x, t["rm"], t["rv"], w, t["b"], False, 0.1, 1e-5)

        return torch.func.jvp(f, (t["x"], t["w"]), (t["tx"], t["tw"]))

    ours, ref = call(F.batch_norm), call(torch.nn.functional.batch_norm)
    torch.testing.assert_close(ours[0], ref[0], rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(ours[1], ref[1], rtol=2e-5, atol=2e-5)
