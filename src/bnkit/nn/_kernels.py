"""Fast paths chosen at run time; the plain path in ``functional`` is always there.

The ``cpp`` backend is a small C++ extension (``_kernels.cpp``) built with torch's own
extension tooling the first time it is needed and cached on disk (``TORCH_EXTENSIONS_DIR``,
by default ``~/.cache/torch_extensions``): the first build takes about a minute, later
processes load it in well under a second. It needs a C++ compiler; without one, or when
the build fails, bnkit warns once and uses the plain path.

``BNKIT_BACKEND`` chooses: ``auto`` (default: ``cpp`` where it builds, else ``plain``),
``cpp`` (fail loudly if it cannot be built), ``plain``; it is read once, at the first
BatchNorm call. :func:`set_backend` chooses from Python at any time.

This module loads the kernels; :mod:`bnkit.nn._router` decides when they run and hands out
a :class:`FastPath`, whose methods carry keyword-named options into the C++ entry points.
Those check their own preconditions again (sizes, dtypes, layout, device), so no slip on
the Python side can become a memory error.

``BNKIT_BUILD_FLAGS`` adds compiler flags to the build (its own cache entry): the test
suite builds ``-DBNKIT_PORTABLE`` (no x86 intrinsics, the code every other architecture
compiles) and an AddressSanitizer/UBSan build with it.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["BACKENDS", "FastPath", "available", "backend", "get", "set_backend"]

BACKENDS = ("auto", "cpp", "plain")
_SOURCE = Path(__file__).with_name("_kernels.cpp")
_lock = threading.Lock()
_module: Any = None
_failed: str | None = None
_choice: str | None = None
_STALE_LOCK_S = 600.0


_env_value: str | None = None  # BNKIT_BACKEND, read once (at the first BatchNorm call)


def _env_choice() -> str:
    global _env_value
    if _env_value is None:
        value = os.environ.get("BNKIT_BACKEND", "auto").strip().lower() or "auto"
        if value not in BACKENDS:
            raise ValueError(f"BNKIT_BACKEND={value!r}: expected one of {BACKENDS}")
        _env_value = value
    return _env_value


def backend() -> str:
    """The backend asked for: ``auto``, ``cpp`` or ``plain``."""
    return _choice if _choice is not None else _env_choice()


def set_backend(name: str) -> None:
    """Choose the backend for this process (overrides ``BNKIT_BACKEND``)."""
    global _choice, layer_call
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _choice = name
    layer_call = None  # set again by get() when it returns the C++ module


def _build() -> Any:
    from torch.utils import cpp_extension

    source = _SOURCE.read_text()
    flags = ["-O3", "-fopenmp", "-ffp-contract=fast"]
    # Vector width: what torch itself dispatches to on this CPU (the cache is per machine).
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
    extra = os.environ.get("BNKIT_BUILD_FLAGS", "").split()
    flags += extra
    ldflags = ["-fopenmp", *(f for f in extra if f.startswith("-fsanitize"))]
    key = source + torch.__version__ + " ".join(flags)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    name = f"bnkit_cpu_{digest}"
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    lock = build_dir / "lock"
    # A build interrupted by Ctrl-C or a kill leaves torch's lock file behind, and every
    # later build would wait on it forever: a lock older than any real build is stale.
    if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
        lock.unlink(missing_ok=True)
    if not any(build_dir.glob("*.so")):
        print(
            "bnkit: building the CPU fast path once (about a minute; cached on disk)",
            file=sys.stderr,
        )
    return cpp_extension.load_inline(
        name=name,
        cpp_sources=[source],
        functions=[
            "x86_intrinsics",
            "forward_train",
            "backward_train",
            "forward_eval",
            "backward_eval",
            "stats",
            "grad_apply",
            "train_fn",
            "eval_fn",
            "set_graph_backward",
            "layer_forward",
            "activation_codes",
        ],
        extra_cflags=flags,
        extra_ldflags=ldflags,
        verbose=False,
    )


def get() -> Any:
    """The loaded C++ module, or None for the plain path (building it on first use)."""
    global _module, _failed, layer_call
    choice = backend()
    if choice == "plain":
        return None
    if _module is not None:
        if layer_call is None:
            layer_call = _module.layer_forward
        return _module
    if _failed is not None and choice == "auto":
        return None
    with _lock:
        if _module is None and (_failed is None or choice == "cpp"):
            try:
                module = _build()
                # The torch-op backwards the C++ autograd nodes call under a double
                # backward and for a gradient without storage (imported here, at the first
                # build: _backward itself reaches the kernels through the router).
                from bnkit.nn._backward import eval_graph_backward, train_graph_backward

                module.set_graph_backward(train_graph_backward, eval_graph_backward)
                _module = module
                _failed = None
            except Exception as exc:  # no compiler, no headers, ...
                _failed = f"{type(exc).__name__}: {exc}"
                if choice == "cpp":
                    raise RuntimeError(
                        f"BNKIT_BACKEND=cpp but the C++ fast path could not be built: {_failed}"
                    ) from exc
                warnings.warn(
                    "bnkit: the C++ fast path could not be built; using the plain path "
                    f"(set BNKIT_BACKEND=plain to silence this). {_failed[:300]}",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _module


# The C++ module's ``layer_forward`` (a BatchNorm module's whole common-case forward in one
# call; it returns None for anything else) once get() has loaded the module and the backend
# allows it; None until then and after set_backend().
layer_call: Any = None


def failure() -> str | None:
    """Why the C++ fast path could not be built in this process, if it could not."""
    return _failed


def available() -> bool:
    """Whether the C++ fast path can be used in this process."""
    return get() is not None


class FastPath:
    """The C++ fast path: each method is one entry point of ``_kernels.cpp``, with its
    options named. Obtained from :mod:`bnkit.nn._router` only."""

    __slots__ = ("_mod",)

    def __init__(self, mod: Any) -> None:
        self._mod = mod

    def stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel (mean, biased variance) of ``x``, float64."""
        mean, var = self._mod.stats(x)
        return mean, var

    def forward_train(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        *,
        eps: float,
        running: tuple[Tensor, Tensor, float] | None = None,
        residual: Tensor | None = None,
        act: int = 0,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(y, mean, biased var, coef) with batch statistics, ``y = act(bn(x) [+
        residual])`` (``act``: a code of ``bnkit.nn._activations``); ``running = (running_mean,
        running_var, factor)`` also updates those buffers in place in the same call.
        ``coef`` is what :meth:`backward_train` needs to gate an activation (None
        without one)."""
        rm, rv, f = running if running is not None else (None, None, 0.0)
        y, mean, var, coef = self._mod.forward_train(x, weight, bias, eps, rm, rv, f, residual, act)
        return y, mean, var, coef

    def backward_train(
        self,
        grad_out: Tensor,
        x: Tensor,
        weight: Tensor | None,
        mean: Tensor,
        *,
        var: Tensor | None = None,
        invstd: Tensor | None = None,
        eps: float = 0.0,
        need_grad_input: bool,
        raw_sums: bool,
        act: int = 0,
        coef: Tensor | None = None,
        residual: Tensor | None = None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor | None]:
        """The closed-form training backward given the biased ``var`` (with ``eps``) or
        ``invstd``: (grad_x or None, sum(g * xhat), sum(g), grad_residual or None); the
        sums as float64 when ``raw_sums``, else as the weight and bias gradients. With an
        activation (``act``, ``coef`` from :meth:`forward_train` and its ``residual``),
        ``g`` is ``grad_out`` gated by the activation's derivative; grad_residual is that
        ``g`` (given only with an activation and a residual)."""
        stat = invstd if invstd is not None else var
        if stat is None:
            raise ValueError("FastPath.backward_train: give var or invstd")
        gx, gxhat, gsum, gres = self._mod.backward_train(
            grad_out, x, weight, mean, stat, eps, invstd is not None, need_grad_input,
            raw_sums, residual, act, coef,
        )  # fmt: skip
        return (gx if need_grad_input else None), gxhat, gsum, gres

    def forward_eval(
        self,
        x: Tensor,
        running_mean: Tensor,
        running_var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        *,
        eps: float,
        residual: Tensor | None = None,
        act: int = 0,
    ) -> Tensor:
        """``act((x - running_mean) * scale + shift [+ residual])``."""
        y: Tensor = self._mod.forward_eval(
            x, running_mean, running_var, weight, bias, eps, residual, act
        )
        return y

    def backward_eval(
        self,
        grad_out: Tensor,
        x: Tensor,
        weight: Tensor | None,
        running_mean: Tensor,
        running_var: Tensor,
        *,
        eps: float,
        need_grad_input: bool,
        need_sums: bool,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The eval-mode backward: (grad_output * weight * invstd or None, and when
        ``need_sums`` sum(grad_output * (x - running_mean)) * invstd (None without weight)
        and sum(grad_output), in the weight's dtype; None where not asked for)."""
        gx, gw, gb = self._mod.backward_eval(
            grad_out, x, weight, running_mean, running_var, eps, need_grad_input, need_sums
        )  # (the extension gives None for what it did not compute)
        return gx, gw, gb

    def train_node(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        *,
        eps: float,
        running: tuple[Tensor, Tensor, float] | None = None,
        residual: Tensor | None = None,
        act: int = 0,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`forward_train` as an autograd node (a C++ one: no Python in the forward
        or backward call): (y, mean, var), the statistics not differentiable. Its backward
        is :meth:`backward_train`'s kernel, or the torch-op form of ``bnkit.nn._backward``
        under a double backward or for a gradient without storage."""
        rm, rv, f = running if running is not None else (None, None, 0.0)
        y, mean, var = self._mod.train_fn(x, weight, bias, residual, rm, rv, f, eps, act)
        return y, mean, var

    def eval_node(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor,
        running_var: Tensor,
        *,
        eps: float,
    ) -> Tensor:
        """:meth:`forward_eval` as a C++ autograd node (backward: :meth:`backward_eval`'s
        kernel, or the torch-op form of ``bnkit.nn._backward`` as for :meth:`train_node`)."""
        y: Tensor = self._mod.eval_fn(x, weight, bias, running_mean, running_var, eps)
        return y

    def grad_apply(
        self,
        grad_out: Tensor,
        x: Tensor,
        mean: Tensor,
        *,
        k_centered: Tensor,
        k_grad: Tensor,
        k_const: Tensor,
    ) -> Tensor:
        """``grad_x = k_grad * grad_out + k_centered * (x - mean) + k_const`` per channel."""
        gx: Tensor = self._mod.grad_apply(grad_out, x, mean, k_centered, k_grad, k_const)
        return gx
