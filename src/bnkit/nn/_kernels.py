"""Fast paths chosen at run time; the plain path in ``functional`` is always there.

The ``cpp`` backend is a small C++ extension (``_kernels.cpp``) built with torch's own
extension tooling the first time it is needed and cached on disk (``TORCH_EXTENSIONS_DIR``,
by default ``~/.cache/torch_extensions``): the first build takes about 30 s, later
processes load it in well under a second. It needs a C++ compiler; without one, or when
the build fails, bnkit warns once and uses the plain path.

``BNKIT_BACKEND`` chooses: ``auto`` (default: ``cpp`` where it builds, else ``plain``),
``cpp`` (fail loudly if it cannot be built), ``plain``; it is read once, at the first
BatchNorm call. :func:`set_backend` chooses from Python at any time. The fast path is used
for CPU float32/float64 input that is contiguous or channels_last, and not under
``torch.func`` transforms or ``torch.compile`` (which trace the plain path).
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

__all__ = ["BACKENDS", "available", "backend", "get", "set_backend"]

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
    global _choice
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _choice = name


def _build() -> Any:
    from torch.utils import cpp_extension

    source = _SOURCE.read_text()
    flags = ["-O3", "-fopenmp", "-ffp-contract=fast"]
    # Vector width: what torch itself dispatches to on this CPU (the cache is per machine).
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
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
            "bnkit: building the CPU fast path once (about 30 s; cached on disk)", file=sys.stderr
        )
    return cpp_extension.load_inline(
        name=name,
        cpp_sources=[source],
        functions=[
            "eligible",
            "forward_train",
            "backward_train",
            "forward_eval",
            "update_running",
            "stats",
            "grad_apply",
        ],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def get() -> Any:
    """The loaded C++ module, or None for the plain path (building it on first use)."""
    global _module, _failed
    choice = backend()
    if choice == "plain":
        return None
    if _module is not None:
        return _module
    if _failed is not None and choice == "auto":
        return None
    with _lock:
        if _module is None and (_failed is None or choice == "cpp"):
            try:
                _module = _build()
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


def available() -> bool:
    """Whether the C++ fast path can be used in this process."""
    return get() is not None


FAST_DTYPES = (torch.float32, torch.float64)


def usable(x: Tensor) -> Any:
    """The C++ module when ``x`` may take the fast path, else None."""
    mod = usable_for_buffers(x)
    if mod is None or not mod.eligible(x):
        return None
    return mod


def usable_for_buffers(t: Tensor) -> Any:
    """The C++ module when the CPU tensor ``t`` (any shape) may be handled by it."""
    if not t.is_cpu or t.dtype not in FAST_DTYPES:
        return None
    if torch.compiler.is_compiling() or _under_functorch(t):
        return None
    return get()


def _under_functorch(x: Tensor) -> bool:
    """Inside a torch.func transform (vmap, grad, ...), whatever the tensor."""
    try:
        fc = torch._C._functorch
        return fc.peek_interpreter_stack() is not None or bool(fc.is_functorch_wrapped_tensor(x))
    except AttributeError:  # another torch: be safe
        return True
