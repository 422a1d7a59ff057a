"""Every export path gives a graph that computes the model (never a constant), as lean as
torch's: torch.jit.trace/script, torch.export with a dynamic batch, and ONNX (legacy and
dynamo exporters) run in onnxruntime."""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import bnkit
from tests.conftest import random_input
from tests.interop.test_torch_helpers import batches, pair


def trained_pair() -> tuple[nn.Module, nn.Module]:
    ref, ours = pair()
    for x in batches():
        ref(x), ours(x)
    return ref.eval(), ours.eval()


X = random_input((6, 3, 12, 12), seed=3)
X_OTHER = random_input((9, 3, 12, 12), seed=4) * 2  # another batch size and other values


def test_jit_trace_records_the_computation() -> None:
    ref, ours = trained_pair()
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(ours, X)  # runs its own check across invocations
    torch.testing.assert_close(traced(X_OTHER), ref(X_OTHER))
    kinds = [n.kind() for n in traced.inlined_graph.nodes()]
    assert kinds.count("aten::batch_norm") == 3


def test_jit_trace_in_training_mode_is_bnkit_math() -> None:
    ref, ours = pair()
    traced = torch.jit.trace(copy.deepcopy(ours).train(), X, check_trace=False)
    torch.testing.assert_close(traced(X_OTHER), ref.train()(X_OTHER))


def test_jit_script_compiles_torch_module_on_the_same_tensors() -> None:
    ref, ours = trained_pair()
    scripted = torch.jit.script(ours)
    torch.testing.assert_close(scripted(X_OTHER), ref(X_OTHER))
    with torch.no_grad():
        ours[1].running_mean += 1.0  # shared, not copied
    torch.testing.assert_close(scripted(X_OTHER), ours(X_OTHER))


def test_jit_script_frozen_and_variants() -> None:
    _, ours = trained_pair()
    frozen = bnkit.convert(copy.deepcopy(ours), to="frozen")
    scripted = torch.jit.script(frozen)
    torch.testing.assert_close(scripted.train()(X_OTHER), frozen(X_OTHER))
    renorm = bnkit.convert(copy.deepcopy(ours), to="renorm").eval()
    torch.testing.assert_close(torch.jit.script(renorm)(X_OTHER), renorm(X_OTHER))
    training = bnkit.convert(copy.deepcopy(ours), to="renorm").train()
    with pytest.raises(RuntimeError, match=r"script the model in eval mode"):
        torch.jit.script(training)


def test_jit_script_swaps_layers_in_place_as_torch_protocol_does() -> None:
    """torch.jit.script puts what __prepare_scriptable__ returns into the model it was
    given (torch's protocol, in place): the eager model then holds torch's BatchNorm on the
    same tensors, and computes the same function. The README says so."""
    ref, ours = trained_pair()
    torch.jit.script(ours)
    assert type(ours[1]) is nn.BatchNorm2d
    torch.testing.assert_close(ours(X_OTHER), ref(X_OTHER))


def test_torch_export_dynamic_batch() -> None:
    ref, ours = trained_pair()
    batch = torch.export.Dim("batch")
    ep = torch.export.export(ours, (X,), dynamic_shapes=({0: batch},))
    torch.testing.assert_close(ep.module()(X_OTHER), ref(X_OTHER))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum("batch_norm" in t for t in targets) == 3


def _onnx_bytes(model: nn.Module, dynamo: bool, tmp: Path) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            prog = torch.onnx.export(
                model, (X,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},)
            )
            assert prog is not None
            prog.save(str(tmp / "m.onnx"))
            return (tmp / "m.onnx").read_bytes()
        f = io.BytesIO()
        # output_names: with dynamic_axes and no output names, the legacy exporter reads
        # model.graph.outputs(), which an fx GraphModule (any, torch's fusers' too) lacks
        torch.onnx.export(
            model,
            (X,),
            f,
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}},
        )
        return f.getvalue()


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_onnx_runs_in_onnxruntime_like_torch(dynamo: bool, tmp_path: Path) -> None:
    ref, ours = trained_pair()
    graphs = {}
    for name, model in (("torch", ref), ("bnkit", ours)):
        data = _onnx_bytes(model, dynamo, tmp_path)
        g = onnx.load_from_string(data)
        assert len(g.graph.input) == 1, f"{name}: the graph must take the input"
        sess = ort.InferenceSession(data)
        out = sess.run(None, {sess.get_inputs()[0].name: X_OTHER.numpy()})[0]
        np.testing.assert_allclose(out, ref(X_OTHER).detach().numpy(), rtol=1e-4, atol=1e-5)
        graphs[name] = sorted(n.op_type for n in g.graph.node)
    assert graphs["bnkit"] == graphs["torch"]  # as lean as torch's: same ops, same count


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_fused_model_exports_like_the_model(dynamo: bool, tmp_path: Path) -> None:
    """A fuse_activations model records torch's BatchNorm, add and ReLU while a graph is
    captured (torch.export, both ONNX exporters): the same ops and outputs as torch's
    model, and torch.compile trains it."""
    ref, ours = trained_pair()
    fused = bnkit.fuse_activations(copy.deepcopy(ours), X).eval()
    assert bnkit.fused_sites(fused), "the test model must have something to fuse"
    ep = torch.export.export(fused, (X,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.testing.assert_close(ep.module()(X_OTHER), ref(X_OTHER))
    graphs = {}
    for name, model in (("torch", ref), ("fused", fused)):
        data = _onnx_bytes(model, dynamo, tmp_path)
        sess = ort.InferenceSession(data)
        out = sess.run(None, {sess.get_inputs()[0].name: X_OTHER.numpy()})[0]
        np.testing.assert_allclose(out, ref(X_OTHER).detach().numpy(), rtol=1e-4, atol=1e-5)
        graphs[name] = sorted(n.op_type for n in onnx.load_from_string(data).graph.node)
    assert graphs["fused"] == graphs["torch"]
