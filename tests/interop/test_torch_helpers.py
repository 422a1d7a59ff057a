"""torch's own helpers treat bnkit's layers as they treat torch's (no mocks: the real
helpers, on the same model with torch's and with bnkit's BatchNorms)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnkit
from tests.conftest import random_input

TORCH_OF = {
    bnkit.BatchNorm1d: nn.BatchNorm1d,
    bnkit.BatchNorm2d: nn.BatchNorm2d,
    bnkit.BatchNorm3d: nn.BatchNorm3d,
    bnkit.LazyBatchNorm1d: nn.LazyBatchNorm1d,
    bnkit.LazyBatchNorm2d: nn.LazyBatchNorm2d,
    bnkit.LazyBatchNorm3d: nn.LazyBatchNorm3d,
    bnkit.BatchRenorm2d: nn.BatchNorm2d,
    bnkit.GhostBatchNorm2d: nn.BatchNorm2d,
    bnkit.SyncBatchNorm: nn.modules.batchnorm._BatchNorm,  # not nn.SyncBatchNorm: see below
}


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
        nn.BatchNorm1d(5),
    )


def pair() -> tuple[nn.Module, nn.Module]:
    ref = cnn()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
    return ref, bnkit.convert(copy.deepcopy(ref), to="bnkit")


def batches(k: int = 3) -> list[torch.Tensor]:
    return [random_input((6, 3, 12, 12), seed=s) for s in range(k)]


def assert_same_state(ref: nn.Module, ours: nn.Module) -> None:
    for (name, a), (_, b) in zip(ref.state_dict().items(), ours.state_dict().items(), strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("cls", list(TORCH_OF))
def test_isinstance_of_torch_classes(cls: type) -> None:
    kwargs = {} if "Lazy" in cls.__name__ else {"num_features": 4}
    m = cls(**kwargs)
    assert isinstance(m, TORCH_OF[cls])
    assert isinstance(m, nn.modules.batchnorm._BatchNorm)
    assert type(m).__module__.startswith("bnkit.")


def test_sync_is_deliberately_not_torch_sync_class() -> None:
    """DDP refuses torch.nn.SyncBatchNorm (and its subclasses) on CPU; bnkit's works there."""
    assert not isinstance(bnkit.SyncBatchNorm(4), nn.SyncBatchNorm)


def test_frozen_is_deliberately_not_a_torch_batchnorm() -> None:
    assert not isinstance(bnkit.FrozenBatchNorm2d(4), nn.modules.batchnorm._BatchNorm)


def test_convert_to_torch_still_gives_torch_classes() -> None:
    _, ours = pair()
    back = bnkit.convert(ours, to="torch")
    assert {type(m) for m in back.modules()} >= {nn.BatchNorm2d, nn.BatchNorm1d}
    assert not any(type(m).__module__.startswith("bnkit") for m in back.modules())


def test_swa_update_bn() -> None:
    from torch.optim.swa_utils import update_bn

    ref, ours = pair()
    update_bn(batches(), ref)
    update_bn(batches(), ours)
    assert int(ours[1].num_batches_tracked) == 3
    assert_same_state(ref, ours)


def test_convert_sync_batchnorm() -> None:
    ref, ours = pair()
    s_ref = nn.SyncBatchNorm.convert_sync_batchnorm(ref)
    s_ours = nn.SyncBatchNorm.convert_sync_batchnorm(ours)
    assert [type(m) for m in s_ours.modules()] == [type(m) for m in s_ref.modules()]
    assert sum(type(m) is nn.SyncBatchNorm for m in s_ours.modules()) == 3
    assert_same_state(s_ref, s_ours)


def test_replace_all_batch_norm_modules_then_vmap_in_training() -> None:
    from torch.func import replace_all_batch_norm_modules_, vmap

    ref, ours = pair()
    replace_all_batch_norm_modules_(ref)
    replace_all_batch_norm_modules_(ours)
    assert all(m.running_mean is None for m in ours.modules() if hasattr(m, "running_mean"))
    xs = torch.stack(batches(2))
    torch.testing.assert_close(vmap(ours.train())(xs), vmap(ref.train())(xs))


@pytest.mark.parametrize("layout", ["plain", "relu"])
def test_quantization_fuse_modules_eval(layout: str) -> None:
    from torch.ao.quantization import fuse_modules

    ref, ours = pair()
    for _ in range(2):
        for x in batches():
            ref(x), ours(x)
    ref.eval(), ours.eval()
    groups = [["0", "1", "2"], ["3", "4"]] if layout == "relu" else [["0", "1"], ["3", "4"]]
    f_ref = fuse_modules(copy.deepcopy(ref), groups)
    f_ours = fuse_modules(copy.deepcopy(ours), groups)
    assert [type(m).__name__ for m in f_ours.modules()] == [
        type(m).__name__ for m in f_ref.modules()
    ]
    x = random_input((5, 3, 12, 12), seed=9)
    torch.testing.assert_close(f_ours(x), f_ref(x))
    torch.testing.assert_close(f_ours(x), ours(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rank", [2, 3])
def test_eager_static_quantization_of_a_standalone_batchnorm(rank: int) -> None:
    # prepare/convert swap an unfused BatchNorm (one after a ReLU, say) for torch's
    # quantized BatchNorm; bnkit's stayed float and failed on the quantized input
    import torch.ao.quantization as tq

    conv = nn.Conv2d if rank == 2 else nn.Conv3d
    bn = nn.BatchNorm2d if rank == 2 else nn.BatchNorm3d
    shape = (4, 3, 8, 8) if rank == 2 else (2, 3, 5, 6, 6)
    outs, kinds = [], []
    for to in ("torch", "bnkit"):
        torch.manual_seed(0)
        m = nn.Sequential(tq.QuantStub(), conv(3, 4, 3), nn.ReLU(), bn(4), tq.DeQuantStub())
        with torch.no_grad():
            m[3].running_mean.uniform_(0, 1)
            m[3].running_var.uniform_(0.5, 2)
            m[3].weight.uniform_(0.5, 1.5)
        m = bnkit.convert(m, to=to).eval()
        m.qconfig = tq.get_default_qconfig("fbgemm")
        prepared = tq.prepare(m)
        for s in range(3):
            prepared(random_input(shape, seed=s))
        q = tq.convert(prepared)
        kinds.append(type(q[3]))
        outs.append(q(random_input(shape, seed=9)))
    assert kinds[1] is kinds[0] and kinds[0].__module__.startswith("torch.ao.nn.quantized")
    torch.testing.assert_close(outs[1], outs[0])


def test_quantization_fuse_modules_qat_keeps_the_tensors() -> None:
    from torch.ao.quantization import fuse_modules_qat

    _, ours = pair()
    fused = fuse_modules_qat(ours.train(), [["0", "1"]], inplace=False)
    assert type(fused[0]).__name__ == "ConvBn2d"
    assert type(fused[0][1]) is nn.BatchNorm2d  # QAT's ConvBn2d demands torch's class
    torch.testing.assert_close(fused[0][1].weight, ours[1].weight)


def test_fuse_conv_bn_eval() -> None:
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    ref, ours = pair()
    for x in batches():
        ref(x), ours(x)
    ref.eval(), ours.eval()
    f_ref = fuse_conv_bn_eval(ref[0], ref[1])
    f_ours = fuse_conv_bn_eval(ours[0], ours[1])
    x = random_input((5, 3, 12, 12), seed=9)
    torch.testing.assert_close(f_ours(x), f_ref(x))


def test_fvcore_precise_bn() -> None:
    from fvcore.nn.precise_bn import get_bn_modules, update_bn_stats

    ref, ours = pair()
    assert len(get_bn_modules(ours.train())) == 3
    update_bn_stats(ref.train(), batches(4), num_iters=4)
    update_bn_stats(ours.train(), batches(4), num_iters=4)
    assert_same_state(ref, ours)
    assert any((m.running_var != 1).any() for m in get_bn_modules(ours))


@pytest.mark.parametrize(
    "make",
    [
        lambda: bnkit.BatchNorm2d(4),
        lambda: bnkit.BatchRenorm2d(4),
        lambda: bnkit.GhostBatchNorm2d(4, virtual_batch_size=2),
        lambda: bnkit.SyncBatchNorm(4),
        lambda: bnkit.FrozenBatchNorm2d(4),
    ],
    ids=["bn", "renorm", "ghost", "sync", "frozen"],
)
def test_whole_module_pickles_and_state_dicts_cross_with_torch(make, tmp_path) -> None:
    m = make().train()
    x = random_input((4, 4, 3, 3), seed=5)
    m(x)
    path = tmp_path / "m.pt"
    torch.save(m, path)
    back = torch.load(path, weights_only=False)
    assert type(back) is type(m)
    m.eval(), back.eval()
    torch.testing.assert_close(back(x), m(x))
    ref = nn.BatchNorm2d(4)
    ref.load_state_dict(m.state_dict(), strict=False)
    torch.testing.assert_close(ref.eval()(x), m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("hooks", ["checkpoint", "save_on_cpu"])
def test_activation_checkpointing_and_saved_tensor_hooks(training: bool, hooks: str) -> None:
    # torch.utils.checkpoint recomputes the forward in the backward (the running statistics
    # are updated twice, as torch's are); save_on_cpu packs every saved tensor: both go
    # through bnkit's autograd nodes as through torch's, and change none of bnkit's bits
    from torch.utils.checkpoint import checkpoint

    ref, ours = pair()
    plain, exact = copy.deepcopy(ours), copy.deepcopy(ref).double()

    def run(m: nn.Module, hooked: bool) -> list[torch.Tensor]:
        m.train(training)
        x = batches(1)[0].to(next(m.parameters()).dtype).requires_grad_()
        if hooked and hooks == "checkpoint":
            y = checkpoint(m, x, use_reentrant=False)
        elif hooked:
            with torch.autograd.graph.save_on_cpu():
                y = m(x)
        else:
            y = m(x)
        y.square().sum().backward()
        return [x.grad, *(p.grad for p in m.parameters())]

    theirs, mine = run(ref, True), run(ours, True)
    unhooked, float64 = run(plain, False), run(exact, False)
    # (a conv bias before a BatchNorm has a zero gradient: rounding noise on the scale of
    # the gradients that cancel there, so the slack is relative to the largest gradient)
    scale = max(d.abs().max().item() for d in float64)
    for a, b, c, d in zip(theirs, mine, unhooked, float64, strict=True):
        assert torch.equal(b, c)
        # as close to the float64 model's gradient as torch's is (or closer)
        err_ours, err_torch = ((t.double() - d).abs().max().item() for t in (b, a))
        assert err_ours <= 2 * err_torch + 1e-6 * scale
    assert_same_state(ref, ours)


class _Scale(nn.Module):
    """A parametrization: the layer's weight is 0.5 + this tensor squared."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 0.5 + w * w


def _modify(model: nn.Module, how: str) -> None:
    import torch.nn.utils.parametrize as parametrize
    import torch.nn.utils.prune as prune

    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if how == "prune":  # network slimming: the smallest scales go to zero
                prune.l1_unstructured(m, "weight", amount=0.4)
                prune.random_unstructured(m, "bias", amount=0.3)
            else:
                parametrize.register_parametrization(m, "weight", _Scale())


@pytest.mark.parametrize("how", ["prune", "parametrize"])
@pytest.mark.parametrize("training", [True, False])
def test_pruned_and_parametrized_weights_are_used(how: str, training: bool) -> None:
    # prune and parametrize take the weight out of _parameters and compute it on access:
    # bnkit's layers must normalize with what they compute, as torch's do, and their
    # gradients must reach the original tensors
    ref, ours = pair()
    for m in (ref, ours):
        torch.manual_seed(3)  # the same random pruning of both
        _modify(m, how)
        m.train(training)
    results = []
    for m in (ref, ours):
        x = batches(1)[0].requires_grad_()
        y = m(x)
        y.square().sum().backward()
        results.append([y, x.grad, *(p.grad for p in m.parameters())])
    # (a conv bias before a BatchNorm has a zero gradient, rounding noise on the scale of
    # the gradients that cancel there: the slack is relative to the largest gradient)
    scale = max(float(a.abs().max()) for a in results[0][1:])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * scale)
    assert_same_state(ref, ours)
    if not training:  # folded into the convolution by torch's fuser, as torch's layer is
        from torch.ao.quantization import fuse_modules

        with torch.no_grad():
            x = random_input((5, 3, 12, 12), seed=9)
            before = ours(x)
            # (in place: a pruned model cannot be deep-copied, torch's neither)
            f_ref = fuse_modules(ref, [["0", "1"]], inplace=True)
            f_ours = fuse_modules(ours, [["0", "1"]], inplace=True)
            torch.testing.assert_close(f_ours(x), f_ref(x))
            torch.testing.assert_close(f_ours(x), before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_functional_call_and_ensembles_with_vmap(training: bool) -> None:
    # torch.func.functional_call swaps parameters and buffers in for one call; with
    # stack_module_state and vmap it runs an ensemble of models at once (eval mode: vmap
    # cannot update running statistics in place, for torch's layers either)
    ref, ours = pair()
    params = {k: v.detach() * 1.5 for k, v in ref.named_parameters()}
    x = batches(1)[0]
    for m in (ref, ours):
        m.train(training)
    y_ref = torch.func.functional_call(ref, params, (x,))
    y_ours = torch.func.functional_call(ours, params, (x,))
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-5, atol=1e-5)
    if training:
        return
    copies = [pair() for _ in range(3)]
    outs = []
    for k in (0, 1):
        models = [c[k].eval() for c in copies]
        p, b = torch.func.stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")

        def call(p, b, x, base=base):  # type: ignore[no-untyped-def]
            return torch.func.functional_call(base, (p, b), (x,))

        outs.append(torch.vmap(call, in_dims=(0, 0, None))(p, b, x))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_batched_gradients_and_vectorized_jacobian(training: bool) -> None:
    # autograd.grad(is_grads_batched=True) and jacobian(vectorize=True) run the backward
    # under vmap: its gradient is a batched tensor, which no kernel can read (bnkit's
    # nodes take torch's ops for it)
    ref, ours = pair()
    x = batches(1)[0][:2]
    v = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0))
    results = []
    for m in (ref, ours):
        m.train(training)
        xi = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(m(xi), xi, v, is_grads_batched=True)
        small = x[:, :, :6, :6].contiguous()
        jac = torch.autograd.functional.jacobian(m, small, vectorize=True)
        results.append((g, jac))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * float(a.abs().max()))
