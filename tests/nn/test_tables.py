"""The activation and family tables (bnkit.nn._activations, bnkit.nn._family): what every
path reads, so a row added in one place and forgotten in another fails here."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import fx, nn

import bnkit
from bnkit.nn import _activations, _family, _kernels
from bnkit.nn import functional as F
from bnkit.nn.fused import ACTIVATIONS, FUSABLE, batch_norm_act
from tests.conftest import random_input

C = 4


def test_activation_table_matches_the_kernels(backend: str) -> None:
    if backend != "cpp":
        pytest.skip("the kernels' codes")
    mod = _kernels.get()
    assert dict(mod.activation_codes()) == {a.name: a.code for a in _activations.TABLE}


def test_activation_codes_are_distinct_and_not_none() -> None:
    codes = [a.code for a in _activations.TABLE]
    assert len(set(codes)) == len(codes) and _activations.NONE not in codes
    assert _activations.names() == ACTIVATIONS


@pytest.mark.parametrize("name", _activations.names())
@pytest.mark.parametrize("training", [True, False])
def test_each_activation_fuses_as_its_torch_form(backend: str, name: str, training: bool) -> None:
    """The fused call equals the table's torch forward after torch's BatchNorm, forward and
    backward, on both backends."""
    row = next(a for a in _activations.TABLE if a.name == name)
    x = random_input((6, C, 3, 3)).requires_grad_()
    res = random_input((6, C, 3, 3), seed=1).requires_grad_()
    ours, ref = bnkit.BatchNorm2d(C).train(training), nn.BatchNorm2d(C).train(training)
    y = batch_norm_act(ours, x, res, name)
    x2, r2 = x.detach().clone().requires_grad_(), res.detach().clone().requires_grad_()
    want = row.forward(ref(x2) + r2)
    torch.testing.assert_close(y, want)
    g = torch.randn_like(y)
    y.backward(g)
    want.backward(g)
    assert x.grad is not None and res.grad is not None
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(res.grad, r2.grad)


def test_an_unknown_activation_is_an_error_on_every_path(backend: str) -> None:
    x = random_input((4, C, 3, 3))
    with pytest.raises(ValueError, match="activation must be one of"):
        batch_norm_act(bnkit.BatchNorm2d(C), x, None, "gelu")
    for training in (True, False):
        m = bnkit.BatchNorm2d(C).train(training)
        for grad in (False, True):
            xi = x.clone().requires_grad_(grad)
            with pytest.raises((ValueError, RuntimeError), match="activation code 9"):
                m._forward(xi, None, 9)
    with pytest.raises(ValueError, match="activation code 9"):
        F.finish_activation(x, None, 9)


class _Net(nn.Module):
    """BatchNorm then ``act``: a module, a function or a method name."""

    def __init__(self, act: Any) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(C)
        self.act = act if isinstance(act, nn.Module) else nn.Identity()
        self.fn = None if isinstance(act, nn.Module) else act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        if self.fn is None:
            return self.act(y)  # type: ignore[no-any-return]
        if isinstance(self.fn, str):
            return getattr(y, self.fn)()  # type: ignore[no-any-return]
        return self.fn(y)  # type: ignore[no-any-return]


def _patterns() -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for row in _activations.TABLE:
        for cls, ok in row.modules:
            m = cls(0.0, 6.0) if cls is nn.Hardtanh else cls()
            assert ok(m)
            out.append((row.name, m))
        out += [(row.name, f) for f in (*row.functions, *row.methods)]
    return out


@pytest.mark.parametrize(("name", "act"), _patterns(), ids=lambda v: getattr(v, "__name__", str(v)))
def test_fx_patterns_come_from_the_table(name: str, act: Any) -> None:
    """Every module, function and method the table lists is fused by fuse_activations,
    and the fused model computes what the unfused one does."""
    x = random_input((2, C, 3, 3))
    net = _Net(act).eval()
    want = net(x)
    fused = bnkit.fuse_activations(net, x)
    assert isinstance(fused, fx.GraphModule)
    assert bnkit.fused_sites(fused) == [f"bn + {name}"]
    torch.testing.assert_close(fused(x), want)


@pytest.mark.parametrize("kind", ["bnkit", "lazy", "frozen", "renorm", "ghost"])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_every_ranked_member_has_its_ranks_and_twin(kind: str, rank: int) -> None:
    cls = _family.lookup(kind, rank)
    assert cls._ranks == _family.INPUT_RANKS[rank]
    assert _family.torch_twin(cls) is _family.TORCH[rank]
    assert _family.kind_of(cls) == kind and _family.rank_of(cls) == rank
    if kind in ("bnkit", "lazy", "renorm", "ghost"):
        assert issubclass(cls, _family.TORCH[rank]) or kind == "lazy"
        assert _family.is_batchnorm(cls(C) if kind != "lazy" else cls())
    else:
        assert not _family.is_batchnorm(cls(C))


@pytest.mark.parametrize("to", ["bnkit", "frozen", "renorm", "ghost"])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_convert_maps_rank_for_rank_by_the_table(to: str, rank: int) -> None:
    model = nn.Sequential(_family.TORCH[rank](C))
    got = bnkit.convert(model, to=to)[0]
    assert type(got) is _family.lookup(to, rank)
    back = bnkit.convert(nn.Sequential(got), to="torch")[0] if to != "frozen" else None
    assert back is None or type(back) is _family.TORCH[rank]


def test_the_fused_classes_are_the_plain_members() -> None:
    assert tuple(_family.lookup("bnkit", r) for r in (1, 2, 3)) == FUSABLE


def test_a_duplicate_member_is_refused() -> None:
    with pytest.raises(ValueError, match="already"):

        @_family.member("bnkit", 2)
        class Other(bnkit.BatchNorm2d):
            pass
