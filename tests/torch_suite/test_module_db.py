"""PyTorch's own module test inputs, run on bnkit's layers in torch's place.

``torch.testing._internal.common_modules.module_db`` is what PyTorch's test_modules.py runs
every module through. For the ``nn.BatchNorm1d/2d/3d`` entries this harness takes the same
ModuleInfo (its constructor and forward inputs for each dtype and mode, its error inputs, its
flags) and runs each generic check test_modules.py runs — forward, backward, gradcheck and
gradgradcheck, error inputs, pickle/save-load, non-contiguous input, memory formats, factory
kwargs, repr, ``.to()`` dtype moves, ``to_empty``, device-context construction, the train/eval
difference, CPU/GPU parity — with bnkit's class. Where a check compares, it compares with
torch's class on the same state; where it is a property, it is first run on torch's class, so
a check torch itself fails is skipped rather than counted. Nothing from PyTorch's test files
is copied: the inputs come from the installed wheel.
"""

from __future__ import annotations

import copy
import io
import pickle
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.testing._internal.common_modules import ModuleErrorEnum, ModuleInfo, module_db
from torch.testing._internal.common_utils import freeze_rng_state

import bnkit

TWINS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: bnkit.BatchNorm1d,
    nn.BatchNorm2d: bnkit.BatchNorm2d,
    nn.BatchNorm3d: bnkit.BatchNorm3d,
}
INFOS = [info for info in module_db if info.module_cls in TWINS]
MEMORY_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _inputs(info: ModuleInfo, dtype: torch.dtype, training: bool, requires_grad: bool) -> list:
    return list(
        info.module_inputs_func(
            info, device="cpu", dtype=dtype, requires_grad=requires_grad, training=training
        )
    )


def _cases() -> Iterator[Any]:
    for info in INFOS:
        for dtype in sorted(info.dtypes, key=str):
            for training in (True, False):
                for i, mi in enumerate(_inputs(info, dtype, training, False)):
                    mode = "train" if training else "eval"
                    name = f"{info.name}-{str(dtype)[6:]}-{mode}-{mi.desc or 'default'}"
                    yield pytest.param(info, dtype, training, i, id=name)


CASES = list(_cases())
case = pytest.mark.parametrize(("info", "dtype", "training", "index"), CASES)
float64_case = pytest.mark.parametrize(
    ("info", "dtype", "training", "index"), [c for c in CASES if c.values[1] == torch.float64]
)


def test_module_db_still_holds_the_batchnorm_entries() -> None:
    """The harness must not pass by running nothing: torch's wheel still ships the three
    entries, each with inputs for both modes and error inputs."""
    assert {info.module_cls for info in INFOS} == set(TWINS)
    assert all(info.module_error_inputs_func is not None for info in INFOS)
    assert len(CASES) >= 3 * 2 * 2 * 5


def _pair(info: ModuleInfo, dtype: torch.dtype, training: bool, mi: Any) -> tuple:
    """torch's module and bnkit's, in one random state (weights, biases, running statistics
    and the counter), in the given mode."""
    args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
    with freeze_rng_state():
        ref = info.module_cls(*args, **kwargs).to(dtype)
        ours = TWINS[info.module_cls](*args, **kwargs).to(dtype)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, t in [*ref.named_parameters(), *ref.named_buffers()]:
            if name == "weight":
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name in ("bias", "running_mean"):
                t.copy_(torch.randn(t.shape, generator=g))
            elif name == "running_var":
                t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
            elif name == "num_batches_tracked":
                t.fill_(3)
    ours.load_state_dict(ref.state_dict())
    return ref.train(training), ours.train(training)


def _x(mi: Any) -> torch.Tensor:
    return mi.forward_input.args[0]


def _assert_same_state(ref: nn.Module, ours: nn.Module) -> None:
    a, b = ref.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(b[key], a[key], msg=lambda m, k=key: f"{k}: {m}")
        else:
            assert torch.equal(b[key], a[key]), key


def _torch_passes(check: Callable[[type[nn.Module]], Any], cls: type[nn.Module]) -> None:
    """Run a property check on torch's class first: if torch fails it, it is no test of
    bnkit's (skipped, named)."""
    try:
        check(cls)
    except Exception as exc:  # torch's own behaviour decides whether the check applies
        pytest.skip(f"torch's {cls.__name__} fails this check too: {type(exc).__name__}: {exc}")


def _run(
    m: nn.Module, x: torch.Tensor, grad_out: torch.Tensor | None = None
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    x = x.detach().requires_grad_(grad_out is not None)
    y = m(x)
    if grad_out is None:
        return y.detach(), []
    params = [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(y, [x, *params], grad_out, allow_unused=True)
    return y.detach(), list(grads)


@case
def test_forward(info: ModuleInfo, dtype: torch.dtype, training: bool, index: int) -> None:
    mi = _inputs(info, dtype, training, False)[index]
    ref, ours = _pair(info, dtype, training, mi)
    with freeze_rng_state():
        expected = ref(_x(mi))
    with freeze_rng_state():
        got = ours(_x(mi))
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert got.stride() == expected.stride()
    torch.testing.assert_close(got, expected)
    _assert_same_state(ref, ours)
    if mi.reference_fn is not None:
        torch.testing.assert_close(got, mi.reference_fn(ours, *mi.forward_input.args))


@case
def test_backward(info: ModuleInfo, dtype: torch.dtype, training: bool, index: int) -> None:
    mi = _inputs(info, dtype, training, True)[index]
    ref, ours = _pair(info, dtype, training, mi)
    x = _x(mi)
    grad_out = torch.randn(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(5)) + 1
    (y_ref, g_ref), (y, g) = _run(ref, x, grad_out), _run(ours, x, grad_out)
    torch.testing.assert_close(y, y_ref)
    assert len(g) == len(g_ref)
    for a, b in zip(g, g_ref, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)
    _assert_same_state(ref, ours)


def _gradcheck_fn(m: nn.Module) -> tuple[Callable[..., torch.Tensor], list[str]]:
    names = [n for n, p in m.named_parameters() if p.requires_grad]

    def fn(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(m, dict(zip(names, params, strict=True)), (x,))
        return out  # type: ignore[no-any-return]

    return fn, names


@float64_case  # gradcheck runs in float64, as test_modules.py does
@pytest.mark.parametrize("order", ["grad", "gradgrad"])
def test_gradcheck(
    info: ModuleInfo, dtype: torch.dtype, training: bool, index: int, order: str
) -> None:
    if order == "gradgrad" and not info.supports_gradgrad:
        pytest.skip("module_db marks no gradgrad support")
    mi = _inputs(info, dtype, training, True)[index]
    check = torch.autograd.gradcheck if order == "grad" else torch.autograd.gradgradcheck

    def run(cls: type[nn.Module]) -> None:
        args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
        m = cls(*args, **kwargs).to(dtype).train(training)
        fn, names = _gradcheck_fn(m)
        params = [dict(m.named_parameters())[n].detach().clone().requires_grad_() for n in names]
        x = _x(mi).detach().clone().requires_grad_()
        assert check(fn, (x, *params), fast_mode=bool(info.gradcheck_fast_mode))

    _torch_passes(run, info.module_cls)
    run(TWINS[info.module_cls])


@pytest.mark.parametrize("info", INFOS, ids=[i.name for i in INFOS])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_error_inputs(info: ModuleInfo, dtype: torch.dtype, training: bool) -> None:
    errors = list(
        info.module_error_inputs_func(
            info, device="cpu", dtype=dtype, requires_grad=False, training=training
        )
    )
    assert errors, "module_db lists error inputs for BatchNorm"
    for cls in (info.module_cls, TWINS[info.module_cls]):
        for err in errors:
            mi = err.module_error_input
            args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
            if err.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
                with pytest.raises(err.error_type, match=err.error_regex):
                    cls(*args, **kwargs)
                continue
            m = cls(*args, **kwargs).to(dtype)  # torch's test leaves the module in train mode
            with pytest.raises(err.error_type, match=re.compile(err.error_regex)):
                m(*mi.forward_input.args, **mi.forward_input.kwargs)


@case
def test_pickle_save_load_and_deepcopy(
    info: ModuleInfo, dtype: torch.dtype, training: bool, index: int
) -> None:
    mi = _inputs(info, dtype, training, False)[index]
    _, ours = _pair(info, dtype, training, mi)
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    copies = [
        torch.load(buf, weights_only=False),
        pickle.loads(pickle.dumps(ours)),
        copy.deepcopy(ours),
    ]
    sd_buf = io.BytesIO()
    torch.save(ours.state_dict(), sd_buf)
    sd_buf.seek(0)
    reloaded = TWINS[info.module_cls](*mi.constructor_input.args, **mi.constructor_input.kwargs).to(
        dtype
    )
    reloaded.load_state_dict(torch.load(sd_buf, weights_only=True))
    copies.append(reloaded.train(training))
    for other in copies:
        assert type(other) is type(ours) and other.training == ours.training
        _assert_same_state(ours, other)
    expected = copy.deepcopy(ours)(_x(mi))
    for other in copies:
        torch.testing.assert_close(other(_x(mi)), expected)


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Same values, every other element of a twice-as-wide buffer (as test_modules.py)."""
    if t.numel() <= 1:
        return t
    wide = torch.repeat_interleave(t.detach(), 2, dim=-1)[..., ::2]
    assert not wide.is_contiguous() and torch.equal(wide, t)
    return wide.requires_grad_(t.requires_grad)


@case
def test_non_contiguous_tensors(
    info: ModuleInfo, dtype: torch.dtype, training: bool, index: int
) -> None:
    mi = _inputs(info, dtype, training, True)[index]
    x = _x(mi)
    if x.numel() == 0:
        pytest.skip("an empty input has no non-contiguous form")
    _, ours = _pair(info, dtype, training, mi)
    nc = copy.deepcopy(ours)
    with torch.no_grad():  # non-contiguous parameters too, as test_modules.py
        for p in nc.parameters():
            p.set_(_non_contiguous(p.detach().clone()))
    grad_out = torch.randn(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(7)) + 1
    y, g = _run(ours, x, grad_out)
    y_nc, g_nc = _run(nc, _non_contiguous(x), _non_contiguous(grad_out))
    torch.testing.assert_close(y_nc, y)
    for a, b in zip(g_nc, g, strict=True):
        torch.testing.assert_close(a, b)
    _assert_same_state(ours, nc)


@case
def test_memory_format(info: ModuleInfo, dtype: torch.dtype, training: bool, index: int) -> None:
    mi = _inputs(info, dtype, training, True)[index]
    x = _x(mi)
    fmt = MEMORY_FORMATS.get(x.dim())
    if fmt is None:
        pytest.skip(f"no channels-last format for {x.dim()}-D input")
    ref, ours = _pair(info, dtype, training, mi)
    states = {name: copy.deepcopy(m) for name, m in (("ref", ref), ("ours", ours))}
    grad_out = torch.randn(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(9)) + 1
    y, g = _run(ours, x, grad_out)
    for name, m in states.items():
        m.to(memory_format=fmt)
        states[name] = m
    x_cl, go_cl = x.to(memory_format=fmt), grad_out.to(memory_format=fmt)
    y_cl, g_cl = _run(states["ours"], x_cl, go_cl)
    y_ref_cl, _ = _run(states["ref"], x_cl, go_cl)
    torch.testing.assert_close(y_cl, y)
    for a, b in zip(g_cl, g, strict=True):
        torch.testing.assert_close(a, b)
    # the output keeps the input's layout as torch's does (module_memformat_affects_out=False)
    assert y_cl.is_contiguous(memory_format=fmt) == y_ref_cl.is_contiguous(memory_format=fmt)
    assert y_cl.stride() == y_ref_cl.stride()


def _layout(m: nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype, str, bool]]:
    tensors = [*m.named_parameters(), *m.named_buffers()]
    return [
        (n, tuple(t.shape), t.dtype, t.device.type, isinstance(t, nn.Parameter)) for n, t in tensors
    ]


@case
def test_factory_kwargs_and_device_context(
    info: ModuleInfo, dtype: torch.dtype, training: bool, index: int
) -> None:
    mi = _inputs(info, dtype, training, False)[index]
    args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
    for device in ("cpu", "meta"):
        ref = info.module_cls(*args, **kwargs, device=device, dtype=dtype)
        ours = TWINS[info.module_cls](*args, **kwargs, device=device, dtype=dtype)
        assert _layout(ours) == _layout(ref)
        for _, t in [*ours.named_parameters(), *ours.named_buffers()]:
            assert t.device.type == device
            assert t.dtype == (dtype if t.is_floating_point() else torch.long)
        with torch.device(device):
            ref, ours = info.module_cls(*args, **kwargs), TWINS[info.module_cls](*args, **kwargs)
        assert _layout(ours) == _layout(ref)


@case
def test_repr(info: ModuleInfo, dtype: torch.dtype, training: bool, index: int) -> None:
    mi = _inputs(info, dtype, training, False)[index]
    ref, ours = _pair(info, dtype, training, mi)
    assert repr(ours) == repr(ref) and str(ours) == str(ref)


@case
@pytest.mark.parametrize("swap", [False, True], ids=["assign", "swap"])
def test_to_and_to_empty(
    info: ModuleInfo, dtype: torch.dtype, training: bool, index: int, swap: bool
) -> None:
    """``.to(dtype)`` / ``.double()`` / ``.half()`` move what torch's moves (the counter stays
    int64), with and without swap_module_params_on_conversion; the moved layer computes as
    torch's moved layer; ``to_empty`` gives torch's layout."""
    mi = _inputs(info, dtype, training, False)[index]
    other = torch.float64 if dtype == torch.float32 else torch.float32
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        ref, ours = _pair(info, dtype, training, mi)
        ref.to(other)
        ours.to(other)
        assert _layout(ours) == _layout(ref)
        x = _x(mi).to(other)
        torch.testing.assert_close(ours(x), ref(x))
        _assert_same_state(ref, ours)
        for move in ("half", "bfloat16", "double", "float"):
            getattr(ref, move)()
            getattr(ours, move)()
            assert _layout(ours) == _layout(ref)
        ref.to_empty(device="cpu")
        ours.to_empty(device="cpu")
        assert _layout(ours) == _layout(ref)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)


@case
def test_train_and_eval_modes_differ(
    info: ModuleInfo, dtype: torch.dtype, training: bool, index: int
) -> None:
    """module_db marks BatchNorm ``train_and_eval_differ``: the mode changes the output
    exactly where it changes torch's (not without running statistics)."""
    assert info.train_and_eval_differ
    mi = _inputs(info, dtype, training, False)[index]
    ref, ours = _pair(info, dtype, training, mi)
    x = _x(mi)
    outs = {}
    for name, m in (("ref", ref), ("ours", ours)):
        m = copy.deepcopy(m)
        y_train = m.train()(x)
        y_eval = m.eval()(x)
        assert not m.training
        outs[name] = bool(x.numel()) and not torch.allclose(y_train, y_eval)
    assert outs["ours"] == outs["ref"]


@case
def test_empty_input(info: ModuleInfo, dtype: torch.dtype, training: bool, index: int) -> None:
    """common_nn's _test_module_empty_input: an empty batch gives an empty output of the
    input's size and zero gradients for the input and every parameter."""
    mi = _inputs(info, dtype, training, False)[index]
    if _x(mi).numel() != 0:
        pytest.skip("not an empty-batch input")
    for cls in (info.module_cls, TWINS[info.module_cls]):
        m = cls(*mi.constructor_input.args, **mi.constructor_input.kwargs).to(dtype)
        x = _x(mi).detach().clone().requires_grad_()
        y = m.train(training)(x)
        y.backward(torch.rand_like(y))
        assert y.shape == x.shape
        assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))
        for p in m.parameters():
            assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))


@case
def test_state_dict_both_ways(
    info: ModuleInfo, dtype: torch.dtype, training: bool, index: int
) -> None:
    mi = _inputs(info, dtype, training, False)[index]
    ref, ours = _pair(info, dtype, training, mi)
    assert ours.state_dict()._metadata == ref.state_dict()._metadata  # type: ignore[attr-defined]
    fresh_ref = info.module_cls(*mi.constructor_input.args, **mi.constructor_input.kwargs)
    fresh_ref.to(dtype).load_state_dict(ours.state_dict())
    _assert_same_state(ours, fresh_ref)
    # a version-1 state_dict (before num_batches_tracked) loads as torch loads it
    old = ref.state_dict()
    old.pop("num_batches_tracked", None)
    old._metadata[""]["version"] = 1  # type: ignore[attr-defined]
    for m in (ref, ours):
        m.load_state_dict(old)
    _assert_same_state(ref, ours)


@case
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_gpu_parity(info: ModuleInfo, dtype: torch.dtype, training: bool, index: int) -> None:
    mi = _inputs(info, dtype, training, True)[index]
    _, ours = _pair(info, dtype, training, mi)
    gpu = copy.deepcopy(ours).cuda()
    x = _x(mi)
    grad_out = torch.randn(x.shape, dtype=dtype) + 1
    y, g = _run(ours, x, grad_out)
    y_gpu, g_gpu = _run(gpu, x.cuda(), grad_out.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y)
    for a, b in zip(g_gpu, g, strict=True):
        torch.testing.assert_close(a.cpu(), b)
    _assert_same_state(ours, gpu.cpu())
