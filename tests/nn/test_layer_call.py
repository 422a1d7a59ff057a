"""The module's one-call path (``layer_forward`` in _kernels.cpp, ``_kernels.layer_call``):
it takes every common call and gives exactly what the Python path gives (output, running
statistics, counter, gradients), and it declines everything else before changing
anything, so that the Python path handles the case or words the error."""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.utils.prune as prune
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import bnkit
from bnkit.nn import _activations, _kernels, _router
from bnkit.nn.fused import batch_norm_act
from tests.conftest import random_input

C = 5


def call(m: Any, x: Any, residual: Any = None, act: int = 0) -> torch.Tensor | None:
    """What bnkit.nn.batchnorm.one_call hands the C++ entry point."""
    entry = _kernels.layer_call
    assert entry is not None, "the one-call path is not installed on the cpp backend"
    y: torch.Tensor | None = entry(
        x,
        m._parameters,
        m._buffers,
        m.training,
        m.track_running_stats,
        m.eps,
        m.momentum,
        m._ranks,
        m.num_features,
        residual,
        act,
    )
    return y


def state(m: nn.Module) -> dict[str, torch.Tensor]:
    """The module's tensors that hold values (a meta tensor has none to change)."""
    return {k: v.detach().clone() for k, v in m.state_dict().items() if not v.is_meta}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _need_cpp() -> None:
    if _kernels.backend() != "cpp":
        pytest.skip("cpp only")
    _kernels.get()  # installs layer_call


@pytest.fixture
def cpp() -> None:
    _need_cpp()


def test_plain_backend_never_takes_it(backend: str) -> None:
    m = bnkit.BatchNorm2d(C)
    m(random_input((4, C, 3, 3)))
    assert (_kernels.layer_call is None) == (backend == "plain")


CLASSES = {2: bnkit.BatchNorm1d, 3: bnkit.BatchNorm1d, 4: bnkit.BatchNorm2d, 5: bnkit.BatchNorm3d}


@pytest.mark.filterwarnings("ignore:.*momentum=1.0")
@given(
    dim=st.sampled_from([2, 3, 4, 5]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    channels_last=st.booleans(),
    affine=st.booleans(),
    bias=st.booleans(),
    track=st.booleans(),
    momentum=st.sampled_from([0.1, 0.0, 1.0, 0.37, None]),
    training=st.booleans(),
    grad=st.sampled_from(["none", "input", "params", "no_grad"]),
    batches=st.integers(1, 3),
    fused=st.sampled_from(["", "relu", "relu6", "residual", "residual relu"]),
)
def test_common_calls_match_the_python_path_bit_for_bit(
    dim: int,
    dtype: torch.dtype,
    channels_last: bool,
    affine: bool,
    bias: bool,
    track: bool,
    momentum: float | None,
    training: bool,
    grad: str,
    batches: int,
    fused: str,
) -> None:
    _need_cpp()
    act = _activations.code("relu6" if "relu6" in fused else "relu" if "relu" in fused else None)
    shape = (4, C, 3, 4, 2)[:dim]
    # 16-bit input with float32 parameters and buffers, as autocast feeds a BatchNorm
    pdtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    m = CLASSES[dim](
        C, momentum=momentum, affine=affine, bias=bias, track_running_stats=track, dtype=pdtype
    )
    with torch.no_grad():
        for t in m.parameters():
            t.copy_(torch.rand_like(t) + 0.5)
    m.train(training)
    ref = copy.deepcopy(m)
    for _ in range(batches):
        x = random_input(shape, dtype)
        if channels_last and dim in (4, 5):
            x = x.contiguous(
                memory_format=torch.channels_last if dim == 4 else torch.channels_last_3d
            )
        xa = x.clone().requires_grad_(grad == "input")
        xb = x.clone().requires_grad_(grad == "input")
        for p in (*m.parameters(), *ref.parameters()):
            p.requires_grad_(grad != "none")
        res = random_input(shape, dtype) if "residual" in fused else None
        ctx = torch.no_grad() if grad == "no_grad" else contextlib.nullcontext()
        with ctx:
            ya = call(m, xa, res, act)
            yb = ref._forward(xb, res, act)  # the Python path
        if ya is None:
            # eval-mode autograd nodes have no activation: the Python path adds torch's
            evaluates = not training and track
            assert evaluates and yb.requires_grad and fused, "a common call was declined"
            ya = m._forward(xa, res, act)
        assert ya.dtype == yb.dtype and ya.stride() == yb.stride()
        assert torch.equal(ya, yb)
        assert ya.requires_grad == yb.requires_grad
        if ya.requires_grad:
            g = random_input(shape, dtype)
            ya.backward(g)
            yb.backward(g)
            if grad == "input":
                assert xa.grad is not None and xb.grad is not None
                assert torch.equal(xa.grad, xb.grad)
            for pa, pb in zip(m.parameters(), ref.parameters(), strict=True):
                assert (pa.grad is None) == (pb.grad is None)
                if pa.grad is not None:
                    assert pb.grad is not None and torch.equal(pa.grad, pb.grad)
        assert_same_state(state(m), state(ref))


def test_the_module_takes_it(cpp: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """BatchNorm1d/2d/3d's forward and the fused call go through the one call (the
    Python path unused)."""

    def python_path(*args: Any) -> None:
        raise AssertionError("the Python path ran")

    monkeypatch.setattr(bnkit.nn.batchnorm.BatchNormBase, "_forward", python_path)
    for m, shape in (
        (bnkit.BatchNorm1d(C), (4, C)),
        (bnkit.BatchNorm2d(C), (4, C, 3, 3)),
        (bnkit.BatchNorm3d(C, momentum=None), (4, C, 2, 3, 3)),
    ):
        x = random_input(shape).requires_grad_()
        m(x).sum().backward()
        res = random_input(shape).requires_grad_()
        batch_norm_act(m, x, res, "relu").sum().backward()
        assert res.grad is not None
        m.eval()(x)
        with torch.no_grad():
            batch_norm_act(m.eval(), x, res, "relu6")
        assert int(m.num_batches_tracked) == 2


class _Sub(torch.Tensor):
    pass


class _Logging(TorchDispatchMode):
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


def _pruned() -> nn.Module:
    m = bnkit.BatchNorm2d(C)
    prune.l1_unstructured(m, "weight", amount=0.4)
    return m


def _inference_buffers() -> nn.Module:
    with torch.inference_mode():
        return bnkit.BatchNorm2d(C)


def _set(m: nn.Module, **attrs: Any) -> nn.Module:
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


def _buffer(m: nn.Module, name: str, t: torch.Tensor | None) -> nn.Module:
    m._buffers[name] = t
    return m


def _deleted(m: nn.Module, name: str) -> nn.Module:
    delattr(m, name)
    return m


def _fake(x: torch.Tensor) -> torch.Tensor:
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True).from_tensor(x)


def _x(shape: tuple[int, ...] = (4, C, 3, 3), dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return random_input(shape, dtype)


# (module, input, context): calls the one-call path must leave to the Python path
OFF: dict[str, Callable[[], tuple[nn.Module, Any, Any]]] = {
    "int momentum": lambda: (_set(bnkit.BatchNorm2d(C), momentum=0), _x(), None),
    "numpy eps": lambda: (_set(bnkit.BatchNorm2d(C), eps=np.float64(1e-5)), _x(), None),
    "momentum above 1": lambda: (_set(bnkit.BatchNorm2d(C), momentum=1.5), _x(), None),
    "nan momentum": lambda: (_set(bnkit.BatchNorm2d(C), momentum=float("nan")), _x(), None),
    "eps 0 in training": lambda: (_set(bnkit.BatchNorm2d(C), eps=0.0), _x(), None),
    "negative eps in eval": lambda: (_set(bnkit.BatchNorm2d(C), eps=-1.0).eval(), _x(), None),
    "pruned weight": lambda: (_pruned(), _x(), None),
    "wrong channels": lambda: (bnkit.BatchNorm2d(C), _x((4, C + 1, 3, 3)), None),
    "wrong rank": lambda: (bnkit.BatchNorm2d(C), _x((4, C, 3)), None),
    "ranks not ints": lambda: (_set(bnkit.BatchNorm2d(C), _ranks=(2**70, "4", 4.0)), _x(), None),
    "one value per channel": lambda: (bnkit.BatchNorm2d(C), _x((1, C, 1, 1)), None),
    "empty": lambda: (bnkit.BatchNorm2d(C), _x((0, C, 3, 3)), None),
    "integer input": lambda: (bnkit.BatchNorm2d(C), _x().to(torch.int32), None),
    "bfloat16 buffers": lambda: (bnkit.BatchNorm2d(C).bfloat16(), _x(dtype=torch.bfloat16), None),
    "float64 buffer": lambda: (
        _buffer(bnkit.BatchNorm2d(C), "running_var", torch.ones(C, dtype=torch.float64)),
        _x(),
        None,
    ),
    "non-contiguous": lambda: (bnkit.BatchNorm2d(C), _x().transpose(2, 3), None),
    "subclass input": lambda: (bnkit.BatchNorm2d(C), _x().as_subclass(_Sub), None),
    "input on meta": lambda: (bnkit.BatchNorm2d(C).to("meta"), _x().to("meta"), None),
    "fake tensor input": lambda: (bnkit.BatchNorm2d(C), _fake(_x()), None),
    "not a tensor": lambda: (bnkit.BatchNorm2d(C), [[1.0] * C] * 4, None),
    "running stats requiring grad": lambda: (
        _buffer(bnkit.BatchNorm2d(C).eval(), "running_mean", torch.zeros(C, requires_grad=True)),
        _x(),
        None,
    ),
    "one running buffer": lambda: (
        _buffer(bnkit.BatchNorm2d(C).eval(), "running_var", None),
        _x(),
        None,
    ),
    "non-contiguous running buffer": lambda: (
        _buffer(bnkit.BatchNorm2d(C), "running_var", torch.ones(2 * C)[::2]),
        _x(),
        None,
    ),
    "no counter": lambda: (_buffer(bnkit.BatchNorm2d(C), "num_batches_tracked", None), _x(), None),
    "counter deleted": lambda: (_deleted(bnkit.BatchNorm2d(C), "num_batches_tracked"), _x(), None),
    "inference buffers in training": lambda: (_inference_buffers(), _x(), None),
    "weight on meta": lambda: (
        _set(bnkit.BatchNorm2d(C), weight=nn.Parameter(torch.ones(C, device="meta"))),
        _x(),
        None,
    ),
    "dispatch mode": lambda: (bnkit.BatchNorm2d(C), _x(), _Logging()),
    "forward AD": lambda: (bnkit.BatchNorm2d(C), _x(), fwAD.dual_level()),
    "tracing": lambda: (bnkit.BatchNorm2d(C), _x(), "trace"),
    "vmap": lambda: (bnkit.BatchNorm2d(C), _x(), "vmap"),
}


# valid in eval mode, where nothing is written and one value per channel is fine
TRAINING_ONLY = {
    "eps 0 in training",
    "one value per channel",
    "non-contiguous running buffer",
    "no counter",
    "counter deleted",
    "inference buffers in training",
    "bfloat16 buffers",  # written in training only: the kernels update float32 buffers
}


@pytest.mark.parametrize("case", list(OFF))
@pytest.mark.parametrize("training", [True, False])
def test_off_cases_are_declined_before_anything_changes(
    cpp: None, case: str, training: bool
) -> None:
    if case in TRAINING_ONLY and not training:
        pytest.skip("a valid eval call")
    m, x, ctx = OFF[case]()
    m.train(training)
    before = state(m)
    got: list[Any] = []
    if ctx == "trace":
        torch.jit.trace(
            lambda t: got.append(call(m, x)) or t * 1, (torch.ones(2),), check_trace=False
        )
    elif ctx == "vmap":
        torch.func.vmap(lambda t: got.append(call(m, x)) or t * 1)(torch.ones(3, 2))
    else:
        with ctx if ctx is not None else contextlib.nullcontext():
            got.append(call(m, x))
    assert got and all(y is None for y in got), f"{case}: taken, not declined"
    assert_same_state(state(m), before)


@pytest.mark.parametrize("case", ["int momentum", "numpy eps", "pruned weight"])
@pytest.mark.parametrize("training", [True, False])
def test_declined_valid_calls_match_torch(cpp: None, case: str, training: bool) -> None:
    """A declined call that is valid runs the Python path: torch's result and state."""

    def make(cls: type[nn.Module]) -> Any:
        m = cls(C)
        with torch.no_grad():
            m.weight.copy_(torch.arange(1.0, C + 1))
        if case == "int momentum":
            m.momentum = 0
        elif case == "numpy eps":
            m.eps = np.float64(1e-3)
        else:
            prune.l1_unstructured(m, "weight", amount=0.4)
        return m.train(training)

    ours, theirs = make(bnkit.BatchNorm2d), make(torch.nn.BatchNorm2d)
    for _ in range(2):
        x = _x()
        torch.testing.assert_close(ours(x), theirs(x))
    sa, sb = state(ours), state(theirs)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k])


@pytest.mark.parametrize(
    "residual",
    [
        _x((4, C, 3, 1)),  # broadcasts: torch's add
        _x(dtype=torch.float64),
        _x().as_subclass(_Sub),
        3.0,
    ],
    ids=["broadcast", "other dtype", "subclass", "number"],
)
def test_residuals_it_cannot_fuse_are_declined(cpp: None, residual: Any) -> None:
    m = bnkit.BatchNorm2d(C)
    before = state(m)
    assert call(m, _x(), residual, _activations.code("relu")) is None
    assert_same_state(state(m), before)


# Each rule of the router (bnkit.nn._router) and a call that breaks that rule alone: the
# C++ one-call must decline it (the router does, by construction). A rule added to the
# router without a case here fails test_every_router_rule_has_a_case.
RULE_CASES = {
    "cpu": "input on meta",
    "float32, float64, bfloat16 or float16": "integer input",
    "not empty": "empty",
    "plain data": "fake tensor input",
    "nothing captured": "dispatch mode",
    "contiguous or channels_last": "non-contiguous",
}
BUFFER_RULE_CASES = {
    "both buffers or neither": "one running buffer",
    "buffers of the kernel's dtype, contiguous, not requiring grad": (
        "non-contiguous running buffer"
    ),
}


def test_every_router_rule_has_a_case() -> None:
    assert set(RULE_CASES) == {r.name for r in _router.RULES}
    assert set(BUFFER_RULE_CASES) == {name for name, _ in _router.BUFFER_RULES}
    assert set(RULE_CASES.values()) | set(BUFFER_RULE_CASES.values()) <= set(OFF)


@pytest.mark.parametrize("rule", list(RULE_CASES))
def test_the_one_call_declines_each_rule_the_router_declines(cpp: None, rule: str) -> None:
    m, x, ctx = OFF[RULE_CASES[rule]]()
    with ctx if ctx is not None else contextlib.nullcontext():
        broken = [r.name for r in _router.RULES if not r.holds(x)]
        assert broken[:1] == [rule], f"{rule}: the case breaks {broken}"
        assert _router.data(x) is None
        for training in (True, False):
            m.train(training)
            assert call(m, x) is None, f"{rule}: the one-call took what the router declines"


@pytest.mark.parametrize("rule", list(BUFFER_RULE_CASES))
def test_the_one_call_declines_each_buffer_rule(cpp: None, rule: str) -> None:
    m, x, _ = OFF[BUFFER_RULE_CASES[rule]]()
    rm, rv = m._buffers["running_mean"], m._buffers["running_var"]
    broken = [name for name, ok in _router.BUFFER_RULES if not ok(x.dtype, rm, rv)]
    assert broken == [rule]
    route = _router.train(x, m.weight, m.bias, None, rm, rv)
    assert not route.buffers  # the kernel normalizes; torch's ops update the buffers
    assert call(m.train(), x) is None


_EPS = [1e-5, 0.0, -1.0, float("inf"), float("nan"), 1e300, np.float64(1e-3), 1, True]
_MOMENTUM = [0.1, None, 0.0, 1.0, 1.5, -0.1, float("nan"), float("inf"), 0, True]
_SHAPES = [(4, C, 3, 3), (1, C, 1, 1), (4, C + 1, 3, 3), (4, C, 3), (0, C, 3, 3), (2, C, 1, 1)]
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64]


def _agreement_cases() -> list[tuple[Any, ...]]:
    """Every hyper-parameter pair on a valid input, and every input on valid
    hyper-parameters, in each mode."""
    modes = list(itertools.product([True, False], [True, False]))  # training, track
    out: list[tuple[Any, ...]] = []
    for (training, track), eps, momentum in itertools.product(modes, _EPS, _MOMENTUM):
        out.append((eps, momentum, _SHAPES[0], torch.float32, training, track, True))
    for (training, track), shape, dtype, grad in itertools.product(
        modes, _SHAPES, _DTYPES, [True, False]
    ):
        out.append((1e-5, 0.1, shape, dtype, training, track, grad))
    return out


def test_the_one_call_never_accepts_what_the_python_path_refuses() -> None:
    """The validation rules on both sides, without a list of them to keep in step: for
    every hyper-parameter pair and every input, a call the Python path refuses is declined
    by the one-call with nothing changed, and a call both take gives the same output and
    state. (A rule tightened in ``_validate`` but not in ``layer_forward`` fails here.)"""
    _need_cpp()
    for case in _agreement_cases():
        _agree(*case)


def _agree(
    eps: Any,
    momentum: Any,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    training: bool,
    track: bool,
    grad: bool,
) -> None:
    where = f"eps={eps!r} momentum={momentum!r} {shape} {dtype} training={training} track={track}"
    m = bnkit.BatchNorm2d(C, track_running_stats=track)
    m.eps, m.momentum = eps, momentum  # as a user may set them after construction
    m.train(training)
    ref = copy.deepcopy(m)
    x = (torch.rand(shape) * 4 + 1).to(dtype)
    if grad and dtype.is_floating_point:
        x.requires_grad_()
    before = state(m)
    try:
        want: torch.Tensor | None = ref._forward(x, None, 0)
    except (TypeError, ValueError, RuntimeError, NotImplementedError):
        want = None
    got = call(m, x)
    if want is None:
        assert got is None, f"{where}: the one-call took a call the Python path refuses"
        assert_same_state(state(m), before)
        return
    if got is not None:
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=where)
        assert_same_state(state(m), state(ref))
