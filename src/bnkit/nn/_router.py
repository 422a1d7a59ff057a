"""The router: which implementation computes a BatchNorm call, decided in one place.

Every entry point (the modules, the functional forms, frozen, the variants, sync, fused)
asks :func:`train` or :func:`eval` with the call's tensors and gets a :class:`Route`:

* :attr:`Path.KERNEL`: the C++ kernel alone (``_kernels.FastPath``): nothing for autograd
  to record, so no node is built;
* :attr:`Path.NODE`: the C++ kernel inside its C++ autograd node (backward: the C++
  backward kernel, or :mod:`bnkit.nn._backward`'s torch ops under a double backward);
* :attr:`Path.COMPILED`: torch ops written for ``torch.compile`` (what inductor fuses best);
* :attr:`Path.TORCH`: bnkit's math in torch ops (:mod:`bnkit.nn._stats`,
  :mod:`bnkit.nn._backward`): every device, dtype and layout, every graph capture.

The kernels may read a tensor when every rule of :data:`RULES` holds for it (the C++ side
checks its own preconditions again, so no slip here can become a memory error). They read
and write float32, float64, bfloat16 and float16 in their own dtype (the two 16-bit ones
computed in float32, as torch computes them, with float32 or same-dtype parameters).
Where the only rule that fails is the layout (a strided view), the route says ``copy``:
the input is copied to a contiguous tensor (torch's output is contiguous for one too)
and the kernels run on the copy. A training call also updates the running
buffers inside the kernel when :data:`BUFFER_RULES` hold for them (buffers of the
kernel's compute dtype); otherwise the kernel normalizes and the update is torch's.

The C++ one-call (``layer_forward`` in ``_kernels.cpp``, which a module's forward tries
first) is the compiled form of one case of this router: a plain bnkit module, a valid call
(:func:`bnkit.nn._validate.validate`'s fast guard), :data:`RULES` and :data:`BUFFER_RULES`
holding. It declines everything else, and ``tests/nn/test_layer_call.py`` checks, rule by
rule, that both sides decline the same calls.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from bnkit.nn import _kernels
from bnkit.nn._kernels import FastPath
from bnkit.nn._stats import compute_dtype

__all__ = [
    "BUFFER_RULES",
    "FAST_DTYPES",
    "RULES",
    "Path",
    "Route",
    "backward_sums",
    "builds_graph",
    "capturing",
    "data",
    "dense",
    "eval",
    "has_storage",
    "staged",
    "train",
]

FAST_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class Path(enum.Enum):
    KERNEL = "kernel"
    NODE = "node"
    COMPILED = "compiled"
    TORCH = "torch"


class Route(NamedTuple):
    path: Path
    fast: FastPath | None  # the kernels, for KERNEL and NODE
    buffers: bool = False  # the kernel updates the running buffers itself
    copy: bool = False  # the (strided) input is copied contiguous for the kernels first


def capturing(x: Tensor) -> bool:
    """A graph is being captured, forward-mode AD is on, or a ``TorchDispatchMode`` is
    active (FakeTensorMode, a memory or op tracer): the op must be ordinary torch ops (or
    a Function with a forward derivative), not a C++ call. (The legacy ONNX exporter
    traces, so the tracing state covers it; inside a ``forward_ad.dual_level`` any tensor
    may carry a tangent, which the kernels would drop; a dispatch mode sees torch's ops,
    not an opaque kernel.)"""
    return (
        torch.compiler.is_compiling()  # first: what dynamo reads while tracing this
        or _forward_ad._current_level >= 0
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._get_tracing_state() is not None
        or torch.jit.is_scripting()
        or _under_functorch(x)
    )


def _under_functorch(x: Tensor) -> bool:
    """Inside a torch.func transform (vmap, grad, ...), whatever the tensor."""
    try:
        fc = torch._C._functorch
        return fc.peek_interpreter_stack() is not None or bool(fc.is_functorch_wrapped_tensor(x))
    except AttributeError:  # another torch: be safe
        return True


def has_storage(t: Tensor) -> bool:
    """A tensor the kernels can read: one with storage, not a vmap's batched tensor (which
    ``autograd.grad(is_grads_batched=True)`` and ``jacobian(vectorize=True)`` hand to a
    backward)."""
    try:
        t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _plain_data(x: Tensor) -> bool:
    """A Tensor (or a subclass that keeps torch's own ``__torch_dispatch__``: MONAI's
    MetaTensor, a user's subclass) with storage; a ``__torch_dispatch__`` subclass
    (FakeTensor, a wrapper) gets torch's ops, which it implements."""
    if type(x) is Tensor:
        return True
    return type(x).__torch_dispatch__ is Tensor.__torch_dispatch__ and has_storage(x)


def _layout_ok(x: Tensor) -> bool:
    d = x.dim()
    if d == 2:
        return x.is_contiguous()
    if d < 2 or x.is_contiguous():
        return d >= 2
    if d == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if d == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def dense(t: Tensor) -> bool:
    """Contiguous or channels_last: what the kernels' conversion takes."""
    return _layout_ok(t) or t.is_contiguous()


class Rule(NamedTuple):
    name: str
    holds: Callable[[Tensor], bool]
    # where the rule fails, whether a contiguous copy of the input meets it
    copyable: bool = False


# In this order: each rule may assume the ones before it hold. (Capture before layout: a
# vmap's batched tensor cannot be asked about channels_last.)
RULES: tuple[Rule, ...] = (
    Rule("cpu", lambda x: x.is_cpu),
    Rule("float32, float64, bfloat16 or float16", lambda x: x.dtype in FAST_DTYPES),
    Rule("not empty", lambda x: x.numel() > 0),
    Rule("plain data", _plain_data),
    Rule("nothing captured", lambda x: not capturing(x)),
    Rule("contiguous or channels_last", _layout_ok, copyable=True),
)


def _buffer_ok(dtype: torch.dtype, b: Tensor) -> bool:
    return b.dtype == dtype and b.is_contiguous() and not b.requires_grad


# The running buffers a training kernel updates in place (else torch's ops update them),
# given the dtype the kernel computes in.
BUFFER_RULES: tuple[
    tuple[str, Callable[[torch.dtype, Tensor | None, Tensor | None], bool]], ...
] = (
    ("both buffers or neither", lambda dt, rm, rv: (rm is None) == (rv is None)),
    (
        "buffers of the kernel's dtype, contiguous, not requiring grad",
        lambda dt, rm, rv: rm is None or rv is None or (_buffer_ok(dt, rm) and _buffer_ok(dt, rv)),
    ),
)

_fast: FastPath | None = None


def data(x: Tensor) -> FastPath | None:
    """The kernels, when they may read ``x`` (every rule of :data:`RULES` holds and the
    backend is built), else None."""
    for rule in RULES:
        if not rule.holds(x):
            return None
    return _kernels_now()


def staged(x: Tensor) -> tuple[FastPath | None, bool]:
    """The kernels for ``x`` and whether they take it only as a contiguous copy (every
    rule that fails is one a copy meets); (None, False) where they cannot take it."""
    copy = False
    for rule in RULES:
        if rule.holds(x):
            continue
        if not rule.copyable:
            return None, False
        copy = True
    return _kernels_now(), copy


def _kernels_now() -> FastPath | None:
    global _fast
    mod = _kernels.get()
    if mod is None:
        return None
    if _fast is None or _fast._mod is not mod:
        _fast = FastPath(mod)
    return _fast


def builds_graph(x: Tensor, *others: Tensor | None) -> bool:
    """Autograd records this call: grad mode is on and a tensor of it requires grad. (The
    kernels never run under forward-mode AD: see :func:`capturing`.)"""
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(t is not None and t.requires_grad for t in others)


def train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
) -> Route:
    """The route of a training-mode call (batch statistics; the given running buffers
    are updated)."""
    fast, copy = staged(x)
    if fast is None:
        return Route(Path.COMPILED if torch.compiler.is_compiling() else Path.TORCH, None)
    dtype = compute_dtype(x)
    buffers = running_mean is not None and all(
        ok(dtype, running_mean, running_var) for _, ok in BUFFER_RULES
    )
    path = Path.NODE if builds_graph(x, weight, bias, residual) else Path.KERNEL
    return Route(path, fast, buffers, copy)


def eval(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
) -> Route:
    """The route of an eval-mode call (the given statistics). Statistics that require
    grad take torch's ops: the kernels do not differentiate in them."""
    if running_mean.requires_grad or running_var.requires_grad:
        return Route(Path.TORCH, None)
    fast, copy = staged(x)
    if fast is None:
        return Route(Path.TORCH, None)
    path = Path.NODE if builds_graph(x, weight, bias, residual) else Path.KERNEL
    return Route(path, fast, False, copy)


def backward_sums(x: Tensor, grad_out: Tensor) -> FastPath | None:
    """The kernels for a backward's per-channel sums, outside grad mode (a double
    backward differentiates torch's ops) and for a gradient with storage."""
    if torch.is_grad_enabled() or not has_storage(grad_out):
        return None
    return data(x)
