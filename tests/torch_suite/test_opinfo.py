"""The OpInfo of ``nn.functional.batch_norm`` (``torch.testing._internal``'s ``op_db``, what
PyTorch's test_ops.py runs the op through), run on ``bnkit.functional.batch_norm``.

For every sample input in every dtype the OpInfo lists for the CPU, with and without grad:
the output and the in-place running-statistics update as torch's op, the same exception type
where torch's raises, gradients as torch's, and in float64 gradcheck, gradgradcheck and
forward-mode AD (the OpInfo says the op supports all three). Error inputs the OpInfo lists
(none in torch 2.13) would be checked for the same exception type.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.opinfo.core import OpInfo

import bnkit.functional as BF

OPS = [op for op in op_db if op.name == "nn.functional.batch_norm"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _cases() -> Iterator[Any]:
    for op in OPS:
        for dtype in DTYPES:
            if dtype not in op.supported_dtypes("cpu"):
                continue
            for grad in (False, True):
                samples = list(op.sample_inputs("cpu", dtype, requires_grad=grad))
                for i, s in enumerate(samples):
                    mode = "train" if s.kwargs.get("training", False) else "eval"
                    shape = "x".join(map(str, s.input.shape)) or "0"
                    name = f"{op.variant_test_name or 'default'}-{str(dtype)[6:]}-grad{int(grad)}"
                    yield pytest.param(op, dtype, grad, i, id=f"{name}-{i}-{shape}-{mode}")


CASES = list(_cases())
case = pytest.mark.parametrize(("op", "dtype", "grad", "index"), CASES)
grad_case = pytest.mark.parametrize(
    ("op", "dtype", "grad", "index"), [c for c in CASES if c.values[2]]
)
float64_grad_case = pytest.mark.parametrize(
    ("op", "dtype", "grad", "index"),
    [c for c in CASES if c.values[2] and c.values[1] == torch.float64],
)


def test_op_db_still_holds_batch_norm() -> None:
    assert OPS and len(CASES) >= 4 * 2 * 10


def _sample(op: OpInfo, dtype: torch.dtype, grad: bool, index: int) -> Any:
    return list(op.sample_inputs("cpu", dtype, requires_grad=grad))[index]


def _clone_args(s: Any) -> tuple[torch.Tensor, list[Any], dict[str, Any]]:
    """Fresh copies (the running statistics are updated in place), leaves kept leaves."""

    def fresh(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        return t.detach().clone().requires_grad_(t.requires_grad)

    return fresh(s.input), [fresh(a) for a in s.args], dict(s.kwargs)


def _outcome(fn: Callable[[], torch.Tensor]) -> tuple[str, torch.Tensor | None]:
    try:
        return "ok", fn()
    except Exception as exc:  # compared by type with torch's
        return type(exc).__name__, None


@case
def test_sample_forward_and_running_stats(
    op: OpInfo, dtype: torch.dtype, grad: bool, index: int
) -> None:
    s = _sample(op, dtype, grad, index)
    (x_t, args_t, kw), (x_b, args_b, _) = _clone_args(s), _clone_args(s)
    (kind_t, y_t), (kind_b, y_b) = (
        _outcome(lambda: op.op(x_t, *args_t, **kw)),
        _outcome(lambda: BF.batch_norm(x_b, *args_b, **kw)),
    )
    assert kind_b == kind_t
    if y_t is None:
        return
    x_e, args_e, _ = _moved(s, torch.float64)
    y_e = op.op(x_e, *args_e, **kw)
    assert y_b is not None and y_b.requires_grad == y_t.requires_grad
    _assert_as_torch(y_b, y_t, y_e, dtype, "output")
    for name, a, b, e in zip(
        ("running_mean", "running_var"), args_b[:2], args_t[:2], args_e[:2], strict=True
    ):
        if a is not None:
            _assert_as_torch(a, b, e, dtype, name)


def _moved(s: Any, dtype: torch.dtype | None) -> tuple[torch.Tensor, list[Any], dict]:
    """A fresh copy of the sample, its tensors moved to ``dtype`` if given."""
    x, args, kw = _clone_args(s)
    if dtype is None:
        return x, args, kw

    def move(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        return t.detach().to(dtype).requires_grad_(t.requires_grad)

    return move(x), [move(a) for a in args], kw


def _assert_as_torch(
    ours: torch.Tensor, theirs: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, what: str
) -> None:
    """float32/float64: as torch's. float16/bfloat16: torch and bnkit both compute in float32
    and round once, in different orders, so the check is accuracy: bnkit's result is no
    further from the float64 one than torch's (plus one rounding of the dtype)."""
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, what
    if dtype not in (torch.float16, torch.bfloat16):
        torch.testing.assert_close(ours, theirs, msg=lambda m: f"{what}: {m}")
        return
    if exact.numel() == 0:
        return
    err_t, err_b = ((t.double() - exact).abs().max().item() for t in (theirs, ours))
    ulp = torch.finfo(dtype).eps * exact.abs().max().item()
    assert err_b <= 1.25 * err_t + ulp, f"{what}: bnkit {err_b:.3g}, torch {err_t:.3g}"


def _grads(s: Any, impl: Callable[..., torch.Tensor], dtype: torch.dtype | None) -> list:
    """Gradients of ``impl`` on the sample (moved to ``dtype`` if given) for a fixed,
    non-uniform output gradient, rounded to the sample's dtype."""
    x, args, kw = _moved(s, dtype)
    y = impl(x, *args, **kw)
    leaves = [t for t in (x, *args) if isinstance(t, torch.Tensor) and t.requires_grad]
    g = 1 + torch.arange(y.numel(), dtype=torch.float64).view(y.shape) / 7
    g = g.to(s.input.dtype).to(y.dtype)
    return list(torch.autograd.grad(y, leaves, g, allow_unused=True))


@grad_case
def test_sample_gradients(op: OpInfo, dtype: torch.dtype, grad: bool, index: int) -> None:
    s = _sample(op, dtype, grad, index)
    ref, ours = _grads(s, op.op, None), _grads(s, BF.batch_norm, None)
    exact = _grads(s, op.op, torch.float64)
    for i, (a, b, e) in enumerate(zip(ref, ours, exact, strict=True)):
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            _assert_as_torch(b, a, e, dtype, f"gradient {i}")


def _differentiable(
    s: Any, impl: Callable[..., torch.Tensor]
) -> tuple[Callable[..., torch.Tensor], list[torch.Tensor]]:
    """``impl`` on the sample as a function of its differentiable tensors (the running
    statistics are copied on each call so that repeated calls see the same state)."""
    x, args, kw = _clone_args(s)
    slots = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def fn(x_: torch.Tensor, *diff: torch.Tensor) -> torch.Tensor:
        full = list(args)
        for i, t in zip(slots, diff, strict=True):
            full[i] = t
        full[:2] = [a.clone() if isinstance(a, torch.Tensor) else a for a in full[:2]]
        return impl(x_, *full, **kw)

    return fn, [x, *(args[i] for i in slots)]


@float64_grad_case
@pytest.mark.parametrize("check", ["gradcheck", "gradgradcheck", "forward_ad"])
def test_sample_float64_derivatives(
    op: OpInfo, dtype: torch.dtype, grad: bool, index: int, check: str
) -> None:
    s = _sample(op, dtype, grad, index)
    fn, inputs = _differentiable(s, BF.batch_norm)
    if check == "gradcheck":
        assert torch.autograd.gradcheck(fn, inputs)
    elif check == "gradgradcheck":
        assert torch.autograd.gradgradcheck(fn, inputs)
    else:
        assert op.supports_forward_ad
        ref_fn, _ = _differentiable(s, torch.nn.functional.batch_norm)
        tangents = [torch.randn_like(t) for t in inputs]
        outs = []
        for f in (ref_fn, fn):
            with fwAD.dual_level():
                duals = [
                    fwAD.make_dual(t.detach(), d) for t, d in zip(inputs, tangents, strict=True)
                ]
                outs.append(fwAD.unpack_dual(f(*duals)))
        torch.testing.assert_close(outs[1].primal, outs[0].primal)
        torch.testing.assert_close(outs[1].tangent, outs[0].tangent)


@pytest.mark.parametrize("op", OPS, ids=[op.variant_test_name or "default" for op in OPS])
def test_error_inputs(op: OpInfo) -> None:
    if op.error_inputs_func is None:
        pytest.skip("the OpInfo lists no error inputs in this torch")
    for err in op.error_inputs("cpu"):
        s = err.sample_input
        with pytest.raises(err.error_type, match=err.error_regex):
            BF.batch_norm(s.input, *s.args, **s.kwargs)
