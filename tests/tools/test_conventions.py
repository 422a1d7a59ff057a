"""torch <-> Keras/Flax conventions and weight import/export, against closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import bnkit
from bnkit.tools.conventions import momentum_from_torch, momentum_to_torch, suspicious_momenta
from tests.conftest import random_input


def _trained_bn() -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(3, momentum=0.01, eps=1e-3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    for s in range(3):
        bn(random_input((4, 3, 2, 2), seed=s))
    return bn.eval()


def test_momentum_maps() -> None:
    assert momentum_to_torch(0.99, "keras") == pytest.approx(0.01)
    assert momentum_from_torch(0.1, "flax") == pytest.approx(0.9)
    with pytest.raises(ValueError, match="unknown framework"):
        momentum_to_torch(0.9, "jax")


def test_keras_update_rule_matches_torch_with_converted_momentum() -> None:
    """Keras: moving = m*moving + (1-m)*batch (biased var). Closed form vs a torch BN."""
    m_keras, n = 0.9, 4 * 2 * 2
    bn = bnkit.BatchNorm2d(3, momentum=momentum_to_torch(m_keras)).double()
    moving_mean, moving_var = np.zeros(3), np.ones(3)
    for s in range(3):
        x = random_input((4, 3, 2, 2), torch.float64, seed=s)
        bn(x)
        xn = x.numpy()
        moving_mean = m_keras * moving_mean + (1 - m_keras) * xn.mean((0, 2, 3))
        moving_var = m_keras * moving_var + (1 - m_keras) * xn.var((0, 2, 3))
    np.testing.assert_allclose(bn.running_mean.numpy(), moving_mean, rtol=1e-12)
    # torch stores unbiased batch variances: the only difference is n/(n-1) on each batch
    # term (the initial 1 is not rescaled), which is what cannot be undone without n.
    torch_var = bn.running_var.numpy()
    init_weight = m_keras**3
    unscaled = (torch_var - init_weight) * (n - 1) / n + init_weight
    np.testing.assert_allclose(unscaled, moving_var, rtol=1e-12)


@pytest.mark.parametrize("framework", ["keras", "flax"])
@pytest.mark.parametrize("rescale", [None, 16])
def test_round_trip_is_identity(framework: str, rescale: int | None) -> None:
    bn = _trained_bn()
    export = bnkit.to_keras if framework == "keras" else bnkit.to_flax
    imp = bnkit.from_keras if framework == "keras" else bnkit.from_flax
    conv = export(bn, rescale_variance_for_training=rescale)
    back, notes = imp(
        conv.weights,
        momentum=conv.config["momentum"],
        epsilon=conv.config["epsilon"],
        rescale_variance_for_training=rescale,
    )
    assert (notes == []) == (rescale is None)
    assert back.eps == bn.eps and back.momentum == pytest.approx(bn.momentum)
    for k in ("weight", "bias", "running_mean", "running_var"):
        torch.testing.assert_close(getattr(back, k).double(), getattr(bn, k).double())
    x = random_input((2, 3, 4, 4))
    torch.testing.assert_close(back.eval()(x), bn(x))


def test_keras_names_variance_copied_unless_rescale_asked() -> None:
    bn = _trained_bn()
    plain = bnkit.to_keras(bn)
    assert set(plain.weights) == {"gamma", "beta", "moving_mean", "moving_variance"}
    np.testing.assert_array_equal(plain.weights["moving_variance"], bn.running_var.double().numpy())
    assert plain.notes == [] and plain.config["momentum"] == pytest.approx(0.99)
    rescaled = bnkit.to_keras(bn, rescale_variance_for_training=16)
    np.testing.assert_allclose(
        rescaled.weights["moving_variance"], bn.running_var.double().numpy() * 15 / 16
    )
    assert any("inference outputs differ" in n for n in rescaled.notes)
    with pytest.warns(DeprecationWarning, match="n= is deprecated"):
        old = bnkit.to_keras(bn, n=16)
    old_var, new_var = old.weights["moving_variance"], rescaled.weights["moving_variance"]
    np.testing.assert_array_equal(old_var, new_var)
    with pytest.raises(ValueError, match="rescale_variance_for_training must be an int >= 2"):
        bnkit.to_keras(bn, rescale_variance_for_training=1)


def test_flax_nested_dict_and_defaults() -> None:
    weights = {
        "params": {"scale": np.full(4, 2.0), "bias": np.zeros(4)},
        "batch_stats": {"mean": np.arange(4.0), "var": np.full(4, 3.0)},
    }
    bn, notes = bnkit.from_flax(weights, dims=1)
    assert isinstance(bn, bnkit.BatchNorm1d) and bn.eps == 1e-5
    assert bn.momentum == pytest.approx(0.01) and notes == []
    torch.testing.assert_close(bn.running_mean, torch.arange(4.0))


def test_import_errors_name_what_is_missing() -> None:
    with pytest.raises(ValueError, match=r"missing \['moving_variance'\]"):
        bnkit.from_keras({"moving_mean": np.zeros(3)})
    with pytest.raises(ValueError, match="moving_mean has 3 values but moving_variance has 2"):
        bnkit.from_keras({"moving_mean": np.zeros(3), "moving_variance": np.ones(2)})
    with pytest.raises(ValueError, match="one value per channel"):
        bnkit.from_keras({"moving_mean": np.zeros((3, 1)), "moving_variance": np.ones(3)})
    with pytest.raises(TypeError, match="gamma must be an array of numbers"):
        bnkit.from_keras({"moving_mean": np.zeros(3), "moving_variance": np.ones(3), "gamma": "x"})
    with pytest.raises(TypeError, match="expected a dict of arrays"):
        bnkit.from_flax([1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no running statistics"):
        bnkit.to_keras(nn.BatchNorm1d(3, track_running_stats=False))


def test_suspicious_momentum_warning() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3, momentum=0.99), nn.BatchNorm2d(3))
    with pytest.warns(UserWarning, match="0.99 -> 0.01"):
        assert suspicious_momenta(model) == ["0"]
