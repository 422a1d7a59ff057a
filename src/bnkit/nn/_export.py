"""How bnkit's layers look to graph exporters and TorchScript.

bnkit computes BatchNorm itself in eager mode. An exported graph is another matter: it
is run by other software (ONNX Runtime, TensorRT, a TorchScript interpreter), which
knows a BatchNorm only as one operator (``aten::batch_norm``, ONNX ``BatchNormalization``)
and folds it into the preceding convolution. So while a graph is being captured for
export, an eval-mode layer records torch's own ``batch_norm`` op with the layer's
parameters and buffers: the graph is as lean as the one torch's module gives, and it
computes the same function (``(x - running_mean) / sqrt(running_var + eps) * weight +
bias``). In training mode the plain path is recorded (bnkit's math, as ordinary ops).

* ``torch.jit.trace`` and the legacy ONNX exporter (``torch.onnx.export(dynamo=False)``,
  which traces) and ``torch.export`` (the default ONNX exporter uses it) are detected by
  :func:`exporting`.
* ``torch.jit.script`` cannot compile bnkit's Python forward; it calls
  ``__prepare_scriptable__``, which hands it :func:`as_torch`'s module: torch's class with
  the very same parameter and buffer tensors.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module

from bnkit.nn._family import torch_twin
from bnkit.nn._tensors import layer_tensor

__all__ = ["as_torch", "eval_op", "exporting", "register_fusers", "register_quantized"]


def exporting() -> bool:
    """A graph is being captured for export (tracing, ONNX export, ``torch.export``)."""
    # the legacy ONNX exporter traces, so the tracing state covers it (and is cheap to
    # read, where torch.onnx.is_in_onnx_export() costs about a microsecond a call)
    return torch._C._get_tracing_state() is not None or torch.compiler.is_exporting()


def eval_op(m: Any, input: Tensor) -> Tensor:
    """What an exported graph records for eval-mode BatchNorm-like ``m``: torch's op, with
    ``m``'s parameters and running statistics (validated first: a bad input still gets
    bnkit's error)."""
    with warnings.catch_warnings():
        # the checks read sizes, which a tracer records as tensors and warns about
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        m._validate(input, False)
    return torch.nn.functional.batch_norm(
        input, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps
    )


def as_torch(m: Any) -> Module:
    """Torch's BatchNorm module for bnkit's ``m``, sharing its parameter and buffer
    tensors (not copies) and its flags. Used for TorchScript."""
    cls = torch_twin(m)
    new: Any = cls(
        m.num_features,
        eps=m.eps,
        momentum=m.momentum,
        affine=m.affine,
        track_running_stats=m.track_running_stats,
        device="meta",
    )
    for name in ("weight", "bias"):
        if name in m._parameters:
            new._parameters[name] = m._parameters[name]
        else:
            # pruned or parametrized (torch.nn.utils.prune/parametrize): torch's module
            # gets the tensor they compute now, as a buffer
            del new._parameters[name]
            new.register_buffer(name, layer_tensor(m, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new._buffers[name] = m._buffers.get(name)
    new.train(m.training)
    return new  # type: ignore[no-any-return]


def register_fusers(pairs: dict[type[Module], type[Module]]) -> None:
    """Let ``torch.ao.quantization.fuse_modules`` fuse bnkit's BatchNorms as it fuses
    torch's. Its table of fusable patterns is keyed by exact classes, so each pattern that
    names a torch class of ``pairs`` (bnkit class -> torch class) gets a twin naming
    bnkit's; the twin hands torch's fuser :func:`as_torch`'s module (same tensors)."""
    from torch.ao.quantization import fuser_method_mappings as fm

    table: dict[tuple[Any, ...], Any] = fm._DEFAULT_OP_LIST_TO_FUSER_METHOD
    for pattern, fuser in list(table.items()):
        for ours, theirs in pairs.items():
            if theirs not in pattern:
                continue
            twin = tuple(ours if t is theirs else t for t in pattern)
            table.setdefault(twin, _with_torch_batchnorm(fuser, ours))


def register_quantized(pairs: dict[type[Module], type[Module]]) -> None:
    """Let eager-mode static quantization (``torch.ao.quantization.prepare``/``convert``)
    observe bnkit's BatchNorms and swap them for torch's quantized BatchNorm, as it does
    torch's: its table of module mappings is keyed by exact classes, so each bnkit class
    gets the entry of the torch class it stands for (``from_float`` reads the same
    attributes)."""
    from torch.ao.quantization import quantization_mappings as qm

    table: dict[Any, Any] = qm.DEFAULT_STATIC_QUANT_MODULE_MAPPINGS
    for ours, theirs in pairs.items():
        if theirs in table:
            table.setdefault(ours, table[theirs])


def _with_torch_batchnorm(fuser: Any, ours: type[Module]) -> Any:
    def fuse(is_qat: bool, *mods: Module) -> Any:
        return fuser(is_qat, *(as_torch(m) if type(m) is ours else m for m in mods))

    return fuse
