"""Builds anyone's BatchNorm and reads/writes its tensors whatever their names (torch's,
gamma/beta, moving_mean/moving_var, ...; shape (C,) or (1, C, 1, 1); buffers, parameters
or plain attributes)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["C", "Adapter"]

C = 4  # channels of every probe
_NAMES = {
    "weight": ("weight", "gamma", "scale", "g"),
    "bias": ("bias", "beta", "shift", "b"),
    "running_mean": ("running_mean", "moving_mean", "mean", "rm", "run_mean", "avg_mean"),
    "running_var": (
        "running_var",
        "moving_var",
        "moving_variance",
        "var",
        "rv",
        "run_var",
        "avg_var",
    ),
    "num_batches_tracked": ("num_batches_tracked", "num_batches", "steps", "n_batches"),
}


class Adapter:
    """Builds the implementation and reads/writes its tensors whatever their names."""

    def __init__(
        self, factory: Callable[..., Any], rank: int | None, attrs: dict[str, str], convention: str
    ) -> None:
        self.factory = factory
        self.attrs = dict(attrs)
        self.convention = convention
        self.rank = rank
        self.kwargs_used: dict[str, Any] = {}

    def _sig(self) -> inspect.Signature | None:
        try:
            return inspect.signature(self.factory)
        except (TypeError, ValueError):
            return None

    def build(self, momentum: float | None = 0.1, *, eps: float = 1e-5) -> nn.Module:
        """An instance with C channels, torch-convention ``momentum`` (converted to the
        implementation's convention); raises TypeError when it cannot be built so."""
        sig = self._sig()
        params = sig.parameters if sig is not None else {}
        kwargs: dict[str, Any] = {}
        if "momentum" in params:
            kwargs["momentum"] = (
                None
                if momentum is None
                else (1 - momentum if self.convention == "keras" else momentum)
            )
        elif momentum != 0.1:
            raise TypeError("the constructor takes no momentum argument")
        if "eps" in params:
            kwargs["eps"] = eps
        elif "epsilon" in params:
            kwargs["epsilon"] = eps
        for dims_name in ("num_dims", "dims", "ndim", "n_dims"):
            if dims_name in params:
                kwargs[dims_name] = self.rank or 4
        module = self.factory(C, **kwargs)
        self.kwargs_used = kwargs
        if not isinstance(module, nn.Module):
            raise TypeError(f"the factory returned a {type(module).__name__}, not a Module")
        return module

    def find(self, module: nn.Module) -> None:
        for role, names in _NAMES.items():
            if role in self.attrs:
                continue
            for n in names:
                t = getattr(module, n, None)
                if isinstance(t, Tensor) and (role == "num_batches_tracked" or t.numel() == C):
                    self.attrs[role] = n
                    break

    def get(self, module: nn.Module, role: str) -> Tensor | None:
        name = self.attrs.get(role)
        t = getattr(module, name, None) if name else None
        if not isinstance(t, Tensor):
            return None
        return t.detach().clone().reshape(-1) if role != "num_batches_tracked" else t.detach()

    def set(self, module: nn.Module, role: str, value: Tensor) -> bool:
        name = self.attrs.get(role)
        t = getattr(module, name, None) if name else None
        if not isinstance(t, Tensor):
            return False
        with torch.no_grad():
            t.copy_(value.reshape(t.shape).to(t.dtype))
        return True
