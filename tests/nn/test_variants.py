"""Batch Renorm, Ghost BatchNorm and accumulation-aware statistics against closed forms."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnkit
from tests.conftest import random_input, reference_eval, reference_train


def _renorm_reference(x, w, b, rm, rv, eps, rmax, dmax):
    """The paper's equations in float64; r and d detached (constants in backward)."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dims)
    var = ((x - mean.view(shape)) ** 2).mean(dims)
    sigma_b = torch.sqrt(var + eps)
    sigma = torch.sqrt(rv + eps)
    r = (sigma_b / sigma).clamp(1 / rmax, rmax).detach()
    d = ((mean - rm) / sigma).clamp(-dmax, dmax).detach()
    xhat = (x - mean.view(shape)) / sigma_b.view(shape) * r.view(shape) + d.view(shape)
    return xhat * w.view(shape) + b.view(shape)


def _expected_running(
    x: torch.Tensor, rm: torch.Tensor, rv: torch.Tensor, momentum: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's rule from the definition: (1 - m) * old + m * batch, unbiased batch var."""
    xd = x.double()
    dims = [0, *range(2, x.dim())]
    mean = xd.mean(dims)
    var = xd.var(dims, correction=1)
    f = 1.0 if momentum is None else momentum
    return (1 - f) * rm.double() + f * mean, (1 - f) * rv.double() + f * var


@pytest.mark.parametrize(
    "cls,shape",
    [
        (bnkit.BatchRenorm1d, (8, 3)),
        (bnkit.BatchRenorm2d, (4, 3, 3, 2)),
        (bnkit.BatchRenorm3d, (2, 3, 2, 2, 2)),
    ],
)
def test_batch_renorm_matches_the_paper_with_gradients(cls, shape) -> None:
    m = cls(3, rmax=1.5, dmax=0.3).double()
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([1.0, -2.0, 4.0]))  # far from the data: clips bind
        m.running_var.copy_(torch.tensor([0.5, 9.0, 2.0]))
        m.weight.copy_(torch.tensor([0.7, 1.3, 1.1]))
        m.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    x = random_input(shape, torch.float64, seed=3).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    w = m.weight.detach().clone().requires_grad_()
    b = m.bias.detach().clone().requires_grad_()
    y = m(x)
    ref = _renorm_reference(xr, w, b, rm, rv, m.eps, 1.5, 0.3)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)
    g = random_input(shape, torch.float64, seed=9)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-11, rtol=0)
    torch.testing.assert_close(m.weight.grad, w.grad, atol=1e-11, rtol=0)
    torch.testing.assert_close(m.bias.grad, b.grad, atol=1e-11, rtol=0)
    # running statistics follow BatchNorm's rule (float64 closed form, every rank)
    exp_mean, exp_var = _expected_running(x.detach(), rm, rv, m.momentum)
    torch.testing.assert_close(m.running_mean, exp_mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(m.running_var, exp_var, atol=1e-12, rtol=0)
    # eval is BatchNorm's eval
    m.eval()
    ref_eval = reference_eval(x.detach(), m.running_mean, m.running_var, m.weight, m.bias, m.eps)
    torch.testing.assert_close(m(x.detach()), ref_eval, atol=1e-12, rtol=0)
    assert int(m.renorm_steps) == 1


def test_batch_renorm_warmup_is_plain_batchnorm_then_relaxes() -> None:
    m = bnkit.BatchRenorm2d(3, warmup_steps=2, relax_steps=4, rmax=3, dmax=5)
    with torch.no_grad():
        m.running_var.fill_(4.0)
    x = random_input((4, 3, 2, 2))
    y64, _, _ = reference_train(x, m.weight, m.bias, m.eps)
    torch.testing.assert_close(m(x).double(), y64, atol=1e-5, rtol=0)  # r=1, d=0
    assert m.clips() == (1.0, 0.0)
    for _ in range(3):
        m(x)
    assert m.clips() == pytest.approx((2.0, 2.5))  # half-way through relaxation
    for _ in range(10):
        m(x)
    assert m.clips() == (3.0, 5.0)


def test_batch_renorm_loads_batchnorm_checkpoint_and_converts() -> None:
    bn = nn.BatchNorm2d(3)
    bn(random_input((4, 3, 2, 2)))
    r = bnkit.BatchRenorm2d(3)
    r.load_state_dict(bn.state_dict())
    assert int(r.renorm_steps) == 0
    torch.testing.assert_close(r.running_var, bn.running_var)
    with pytest.raises(ValueError, match="track_running_stats must be True"):
        bnkit.BatchRenorm2d(3, track_running_stats=False)


@pytest.mark.parametrize("n", [8, 11, 3])
def test_ghost_batchnorm_normalizes_each_virtual_batch(n: int) -> None:
    m = bnkit.GhostBatchNorm2d(3, virtual_batch_size=4).double()
    with torch.no_grad():
        m.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        m.bias.copy_(torch.tensor([1.0, 0.0, -1.0]))
    x = random_input((n, 3, 2, 2), torch.float64, seed=n).requires_grad_()
    y = m(x)
    chunks = [x[i : i + 4] for i in range(0, n, 4)]
    ref = torch.cat([reference_train(c, m.weight, m.bias, m.eps)[0] for c in chunks])
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)
    # gradient: each chunk's BatchNorm gradient
    (y * torch.arange(y.numel()).view_as(y)).sum().backward()
    xr = x.detach().clone().requires_grad_()
    parts = [
        bnkit.functional.batch_norm(xr[i : i + 4], None, None, m.weight, m.bias, True)
        for i in range(0, n, 4)
    ]
    (torch.cat(parts) * torch.arange(y.numel()).view_as(y)).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-10, rtol=0)
    # running statistics: the exact statistics of the whole batch (float64 closed form)
    exp_mean, exp_var = _expected_running(x.detach(), torch.zeros(3), torch.ones(3), m.momentum)
    torch.testing.assert_close(m.running_mean, exp_mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(m.running_var, exp_var, atol=1e-12, rtol=0)
    m.eval()
    ref_eval = reference_eval(x.detach(), m.running_mean, m.running_var, m.weight, m.bias, m.eps)
    torch.testing.assert_close(m(x.detach()), ref_eval, atol=1e-12, rtol=0)


def test_ghost_batchnorm_errors_and_half() -> None:
    with pytest.raises(ValueError, match="virtual_batch_size"):
        bnkit.GhostBatchNorm1d(3, virtual_batch_size=0)
    with pytest.raises(ValueError, match="virtual batch of 1"):
        bnkit.GhostBatchNorm1d(3, virtual_batch_size=4)(random_input((5, 3)))
    y = bnkit.GhostBatchNorm2d(3, virtual_batch_size=2)(random_input((4, 3, 2, 2)).half())
    assert y.dtype == torch.float16


@pytest.mark.parametrize("pooled", [False, True])
def test_accumulation_updates_once_with_the_concatenated_statistics(pooled: bool) -> None:
    """The first BatchNorm sees the same values as in one large batch, so its running
    statistics match the large batch's exactly; a deeper one sees activations normalized
    per micro-batch, and gets the exact statistics of what it saw."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4), bnkit.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2), nn.BatchNorm1d(2)
    ).double()
    big = copy.deepcopy(model)
    x = random_input((12, 3), torch.float64, seed=4)
    big(x)
    seen: list[torch.Tensor] = []
    model[4].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with bnkit.accumulate(model, pooled=pooled):
        for i in range(0, 12, 4):  # 3 micro-batches of 4
            model(x[i : i + 4]).sum().backward()
    torch.testing.assert_close(model[1].running_mean, big[1].running_mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(model[1].running_var, big[1].running_var, atol=1e-12, rtol=0)
    cat = torch.cat(seen)
    torch.testing.assert_close(model[4].running_mean, 0.1 * cat.mean(0), atol=1e-12, rtol=0)
    torch.testing.assert_close(model[4].running_var, 0.9 + 0.1 * cat.var(0), atol=1e-12, rtol=0)
    assert int(model[1].num_batches_tracked) == 1 == int(model[4].num_batches_tracked)
    assert model[1].track_running_stats and model[4].track_running_stats


def test_pooled_normalization_uses_statistics_so_far() -> None:
    bn = bnkit.BatchNorm1d(3).double()
    x = random_input((8, 3), torch.float64, seed=2)
    with bnkit.accumulate(bn, pooled=True):
        bn(x[:4])
        y2 = bn(x[4:])
    y_ref, _, _ = reference_train(x, bn.weight, bn.bias, bn.eps)  # pooled over all 8
    torch.testing.assert_close(y2, y_ref[4:], atol=1e-12, rtol=0)


def test_variants_work_with_freeze_fold_and_convert() -> None:
    for m in (bnkit.BatchRenorm2d(3), bnkit.GhostBatchNorm2d(3, virtual_batch_size=2)):
        model = nn.Sequential(nn.Conv2d(2, 3, 3), m)
        model(random_input((4, 2, 5, 5)))
        bnkit.freeze(model)
        before = m.running_mean.clone()
        model.train()(random_input((4, 2, 5, 5), seed=1))
        assert torch.equal(m.running_mean, before)
        bnkit.unfreeze(model)
        model.eval()
        x = random_input((2, 2, 5, 5), seed=2)
        folded, report = bnkit.fold(model, x)
        assert report.folded == ["1"]
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
        frozen = bnkit.convert(copy.deepcopy(model), to="frozen")
        torch.testing.assert_close(frozen(x), model(x))


def test_convert_to_variants_keeps_state_and_back() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(27, 4), nn.BatchNorm1d(4)
    )
    model(random_input((8, 1, 5, 5)))
    model.eval()
    x = random_input((3, 1, 5, 5), seed=1)
    want = model(x)
    renorm = bnkit.convert(copy.deepcopy(model), to="renorm", rmax=2.0, warmup_steps=10)
    assert isinstance(renorm[1], bnkit.BatchRenorm2d) and renorm[1].rmax == 2.0
    assert isinstance(renorm[4], bnkit.BatchRenorm1d)
    torch.testing.assert_close(renorm(x), want)
    ghost = bnkit.convert(copy.deepcopy(model), to="ghost", virtual_batch_size=2)
    assert isinstance(ghost[1], bnkit.GhostBatchNorm2d) and ghost[1].virtual_batch_size == 2
    torch.testing.assert_close(ghost(x), want)
    back = bnkit.convert(ghost, to="torch")
    assert type(back[1]) is nn.BatchNorm2d and type(back[4]) is nn.BatchNorm1d
    torch.testing.assert_close(back(x), want)
    with pytest.raises(TypeError, match="apply to to='renorm'"):
        bnkit.convert(model, to="bnkit", rmax=3)
