"""Ports to Keras 3 and Flax (linen and nnx) keep inference identical, against the real
libraries: the same input through the torch layer and the ported layer. Keras on torch and
JAX compute in float32 here, so "identical" means equal to float32 rounding (the rescale
option, by contrast, moves outputs by ~1e-3)."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported

import jax.numpy as jnp
import keras
import numpy as np
import pytest
import torch
from flax import linen, nnx
from flax.core import FrozenDict
from torch import nn

import bnkit
from tests.conftest import random_input

N = 144  # values per channel of the training batches below (4 * 6 * 6)


def trained(affine: bool = True) -> nn.Module:
    bn = bnkit.BatchNorm2d(5, momentum=0.3, eps=1e-3, affine=affine).double()
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    for s in range(4):
        bn(random_input((4, 5, 6, 6), torch.float64, seed=s))
    return bn.eval()


X = random_input((3, 5, 6, 6), torch.float64, seed=11)


def keras_layer(conv: bnkit.tools.conventions.Converted) -> keras.layers.BatchNormalization:
    layer = keras.layers.BatchNormalization(dtype="float64", **conv.config)
    layer.build(tuple(X.shape))
    layer.set_weights(
        [
            conv.weights[k]
            for k in ("gamma", "beta", "moving_mean", "moving_variance")
            if k in {w.name for w in layer.weights}
        ]
    )
    return layer


def keras_out(layer: keras.layers.BatchNormalization, x: torch.Tensor) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(layer(x.numpy(), training=False)))


@pytest.mark.parametrize("affine", [True, False])
def test_to_keras_same_inference_output(affine: bool) -> None:
    bn = trained(affine)
    conv = bnkit.to_keras(bn)
    assert conv.notes == [] if affine else conv.notes
    out = keras_out(keras_layer(conv), X)
    # Keras on torch computes in float32 here: float32 rounding is all that may differ
    np.testing.assert_allclose(out, bn(X).detach().numpy(), rtol=5e-6, atol=5e-6)


def test_to_keras_rescale_option_changes_outputs_and_says_so() -> None:
    bn = trained()
    conv = bnkit.to_keras(bn, rescale_variance_for_training=N)
    assert any("inference outputs differ" in n for n in conv.notes)
    out = keras_out(keras_layer(conv), X)
    assert np.abs(out - bn(X).detach().numpy()).max() > 1e-3


def test_from_keras_same_inference_output() -> None:
    layer = keras.layers.BatchNormalization(axis=1, momentum=0.9, epsilon=1e-3, dtype="float64")
    for s in range(3):
        layer(random_input((4, 5, 6, 6), torch.float64, seed=s).numpy(), training=True)
    weights = {w.name: keras.ops.convert_to_numpy(w.value) for w in layer.weights}
    bn, notes = bnkit.from_keras(weights, momentum=0.9, epsilon=1e-3)
    assert notes == [] and bn.momentum == pytest.approx(0.1)
    out = bn.double().eval()(X).detach().numpy()
    np.testing.assert_allclose(out, keras_out(layer, X), rtol=5e-6, atol=5e-6)


def _nchw_to_nhwc(x: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


def _nhwc_to_nchw(y: jnp.ndarray) -> np.ndarray:
    return np.asarray(y).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("frozen", [False, True], ids=["dict", "FrozenDict"])
def test_flax_linen_both_ways(frozen: bool) -> None:
    bn = trained()
    conv = bnkit.to_flax(bn)
    assert conv.notes == []
    variables = conv.flax_variables()
    layer = linen.BatchNorm(
        use_running_average=True,
        epsilon=conv.config["epsilon"],
        param_dtype=jnp.float64,
        dtype=jnp.float64,
    )
    out = _nhwc_to_nchw(layer.apply(variables, _nchw_to_nhwc(X)))
    np.testing.assert_allclose(out, bn(X).detach().numpy(), rtol=5e-6, atol=5e-6)
    back_in = FrozenDict(variables) if frozen else variables
    back, notes = bnkit.from_flax(
        back_in, momentum=conv.config["momentum"], epsilon=conv.config["epsilon"]
    )
    assert notes == []
    # the weights went through JAX's float32 arrays
    torch.testing.assert_close(back.double().eval()(X), bn(X), rtol=5e-6, atol=5e-6)


def test_flax_nnx_both_ways() -> None:
    bn = trained()
    conv = bnkit.to_flax(bn)
    layer = nnx.BatchNorm(
        5,
        use_running_average=True,
        epsilon=conv.config["epsilon"],
        momentum=conv.config["momentum"],
        param_dtype=jnp.float64,
        dtype=jnp.float64,
        rngs=nnx.Rngs(0),
    )
    for name in ("scale", "bias", "mean", "var"):
        getattr(layer, name).set_value(jnp.asarray(conv.weights[name]))
    out = _nhwc_to_nchw(layer(_nchw_to_nhwc(X)))
    np.testing.assert_allclose(out, bn(X).detach().numpy(), rtol=5e-6, atol=5e-6)
    back, notes = bnkit.from_flax(nnx.state(layer), epsilon=conv.config["epsilon"])
    assert notes == []
    # the weights went through JAX's float32 arrays
    torch.testing.assert_close(back.double().eval()(X), bn(X), rtol=5e-6, atol=5e-6)
