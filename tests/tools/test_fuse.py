"""bnkit.fuse_activations: which patterns it fuses, that the fused model computes what the
model computed (outputs, gradients, running statistics, state_dict), and that torch's
helpers and tools that replace a layer keep it correct."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import bnkit
from bnkit.nn import _kernels
from bnkit.testing import random_input
from tests.models import SmallResNet


class Patterns(nn.Module):
    """Every pattern the pass knows, and some it must leave alone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn_module = nn.BatchNorm2d(6)  # -> shared nn.ReLU(inplace=True)
        self.relu = nn.ReLU(inplace=True)
        self.bn_add = nn.BatchNorm2d(6)  # -> out += x; relu (module reused)
        self.bn_fn = nn.BatchNorm2d(6)  # -> F.relu6
        self.bn_method = nn.BatchNorm2d(6)  # -> .relu_()
        self.bn_plain_add = nn.BatchNorm2d(6)  # -> x + bn(...) (no activation)
        self.bn_hardtanh = nn.BatchNorm2d(6)  # -> Hardtanh(0, 6): relu6
        self.ht = nn.Hardtanh(0.0, 6.0)
        self.bn_two_users = nn.BatchNorm2d(6)  # used twice: left alone
        self.bn_into_residual = nn.BatchNorm2d(6)  # r.add_(bn(x)): mutates r, left alone
        self.bn_silu = nn.BatchNorm2d(6)  # SiLU: not fused
        self.silu = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu(self.bn_module(self.conv(x)))
        out = self.bn_add(a)
        out += a
        b = self.relu(out)
        c = nn.functional.relu6(self.bn_fn(b))
        d = self.bn_method(c).relu_()
        e = d + self.bn_plain_add(d)
        f = self.ht(self.bn_hardtanh(e))
        g = self.bn_two_users(f)
        h = torch.relu(g) * g
        r = h * 0.5
        r.add_(self.bn_into_residual(h))
        return self.silu(self.bn_silu(r)) + r


_SHAPES = {Patterns: (4, 3, 8, 8), SmallResNet: (8, 1, 16, 16)}

EXPECTED = [
    "bn_module + relu",
    "bn_add + add + relu",
    "bn_fn + relu6",
    "bn_method + relu",
    "bn_plain_add + add",
    "bn_hardtanh + relu6",
]


def _pair(model: nn.Module) -> tuple[nn.Module, torch.fx.GraphModule]:
    """The model converted to bnkit's layers, and fused (checked on an example input)."""
    torch.manual_seed(0)
    for m in model.modules():  # statistics that are not the defaults
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    unfused = bnkit.convert(copy.deepcopy(model), to="bnkit")
    example = random_input(_SHAPES[type(model)], torch.float32, 99)
    return unfused, bnkit.fuse_activations(copy.deepcopy(model), example)


def test_fuses_the_known_patterns_and_only_those() -> None:
    _, gm = _pair(Patterns())
    assert bnkit.fused_sites(gm) == EXPECTED
    code = gm.code
    assert code.count("bnkit_nn_fused_batch_norm_act(") == len(EXPECTED)
    for name in ("bn_two_users", "bn_into_residual", "bn_silu"):
        assert f"self.{name}(" in code, name


@pytest.mark.parametrize("backend", ["plain", "cpp"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_fused_model_computes_what_the_model_computed(
    backend: str, channels_last: bool, training: bool
) -> None:
    if backend == "cpp" and not _kernels.available():
        pytest.skip("no C++ fast path here")
    before = _kernels.backend()
    _kernels.set_backend(backend)
    try:
        for model, shape in ((Patterns(), (4, 3, 8, 8)), (SmallResNet(), (8, 1, 16, 16))):
            unfused, fused = _pair(model)
            unfused.train(training)
            fused.train(training)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            unfused, fused = unfused.to(memory_format=fmt), fused.to(memory_format=fmt)
            x = random_input(shape, torch.float32, 1, channels_last)
            for _ in range(2):  # two steps: the running statistics move twice
                xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
                ya, yb = unfused(xs[0]), fused(xs[1])
                torch.testing.assert_close(yb, ya, rtol=1e-6, atol=1e-6)
                go = random_input(ya.shape, torch.float32, 2)
                (ya * go).sum().backward()
                (yb * go).sum().backward()
                torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-5, atol=1e-6)
                pa, pb = dict(unfused.named_parameters()), dict(fused.named_parameters())
                assert pa.keys() == pb.keys()
                # sums over the batch; some are 0 in theory (a BatchNorm follows in
                # training mode) and come out as rounding noise in both models: the
                # tolerance is float32's, relative to the model's largest gradient
                big = max(p.grad.abs().max().item() for p in pa.values())
                for k in pa:
                    torch.testing.assert_close(pb[k].grad, pa[k].grad, rtol=1e-4, atol=1e-6 * big)
            sa, sb = unfused.state_dict(), fused.state_dict()
            assert sa.keys() == sb.keys()
            for k in sa:
                torch.testing.assert_close(sb[k], sa[k], rtol=1e-6, atol=1e-7)
    finally:
        _kernels.set_backend(before)


def test_torch_helpers_see_the_same_layers() -> None:
    """swa_utils.update_bn recomputes the fused model's statistics as the model's; a layer
    replaced by torch's own (convert to="torch") is still called, unfused, correctly."""
    unfused, fused = _pair(SmallResNet())
    loader = [random_input((8, 1, 16, 16), torch.float32, s) for s in range(3)]
    torch.optim.swa_utils.update_bn(loader, unfused)
    torch.optim.swa_utils.update_bn(loader, fused)
    for k, v in unfused.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[k], v, rtol=1e-6, atol=1e-7)
    x = random_input((4, 1, 16, 16), torch.float32, 9)
    unfused.eval(), fused.eval()
    expected = unfused(x)
    bnkit.convert(fused, to="torch")
    assert not any(isinstance(m, bnkit.BatchNorm2d) for m in fused.modules())
    torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-6)


def test_jit_trace_of_the_fused_model_records_torch_ops() -> None:
    _, fused = _pair(SmallResNet())
    fused.eval()
    x = random_input((4, 1, 16, 16), torch.float32, 3)
    traced = torch.jit.trace(fused, x)
    assert "aten::batch_norm" in str(traced.inlined_graph)
    y = random_input((2, 1, 16, 16), torch.float32, 4)
    torch.testing.assert_close(traced(y), fused(y), rtol=1e-5, atol=1e-6)


def test_torch_fx_traces_bnkit_layers_as_it_traces_torchs() -> None:
    """fx's default tracer goes into bnkit's layers (only torch's own are leaves): the
    graph holds torch's batch_norm and counts batches as the layer does."""
    model = bnkit.convert(SmallResNet(), to="bnkit")
    gm = torch.fx.symbolic_trace(model)
    x = random_input((8, 1, 16, 16), torch.float32, 5)
    expected = copy.deepcopy(model)(x)
    torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)
    assert int(model.stem[1].num_batches_tracked) == 1


def test_untraceable_model_is_a_clear_error() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.bn(x)) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="torch.fx cannot trace Branchy"):
        bnkit.fuse_activations(Branchy(), torch.randn(2, 2, 3, 3))
    with pytest.raises(TypeError, match="expected an nn.Module"):
        bnkit.fuse_activations("model", torch.randn(2, 2))  # type: ignore[arg-type]


def test_a_trace_that_is_not_the_model_is_refused() -> None:
    """torch.fx traces a shape-dependent branch as whatever the tracer saw: the graph is
    then another function. The example input shows it, and the user is told, instead of
    getting a GraphModule that fails or differs later."""

    class ShapeBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn(x))
            # torch.jit.is_tracing/scripting-style checks read False under fx: a Proxy is
            # not a Tensor, so fx keeps the other branch
            return y * 2 if isinstance(x, torch.Tensor) else y

    with pytest.raises(ValueError, match=r"trace of ShapeBranch is not the model.*differs"):
        bnkit.fuse_activations(ShapeBranch(), random_input((4, 2, 3, 3), torch.float32, 1))


def test_random_layers_are_not_taken_for_an_unfaithful_trace() -> None:
    """Dropout in training mode: the check runs model and graph from one random state."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5))
    fused = bnkit.fuse_activations(model.train(), random_input((4, 2, 6, 6), torch.float32, 2))
    assert bnkit.fused_sites(fused) == ["1 + relu"]


def test_a_graph_true_in_one_mode_only_is_named() -> None:
    class ModeBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn(x))
            return y * 2 if self.training else y

    x = random_input((4, 2, 3, 3), torch.float32, 3)
    with pytest.warns(UserWarning, match="computes the model in training mode only"):
        fused = bnkit.fuse_activations(ModeBranch().train(), x)
    assert bnkit.fused_sites(fused) == ["bn + relu"]


@pytest.mark.parametrize("where", ["bn", "relu"])
def test_layers_with_hooks_are_not_fused_away(where: str) -> None:
    # a fused call replaces the BatchNorm's and the activation module's calls: hooks
    # registered on them (a recorder, here) would silently stop running
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    net.eval()
    seen: list[torch.Tensor] = []
    net[1 if where == "bn" else 2].register_forward_hook(lambda m, a, out: seen.append(out))
    x = random_input((2, 3, 8, 8))
    fused = bnkit.fuse_activations(net, x)
    assert bnkit.fused_sites(fused) == []
    seen.clear()
    torch.testing.assert_close(fused(x), net(x))
    assert len(seen) == 2  # the hook ran in both


class _UntraceableBlock(nn.Module):
    """Conv -> BN -> ReLU6 modules behind a data-dependent branch: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) != float(x.sum()):
            return x
        return self.act(self.bn(self.conv(x)))


def test_an_untraceable_model_is_fused_by_its_data_flow() -> None:
    model = nn.Sequential(_UntraceableBlock())
    with torch.no_grad():
        model[0].bn.running_mean.uniform_(-1, 1)
        model[0].bn.running_var.uniform_(0.5, 2)
    x = random_input((2, 3, 8, 8), torch.float32, 3)
    for training in (False, True):
        ref = copy.deepcopy(model).train(training)
        fused = bnkit.fuse_activations(copy.deepcopy(model).train(training), x)
        assert bnkit.fused_sites(fused) == ["0.bn + relu6"]
        assert isinstance(fused[0].act, nn.Identity)
        assert set(fused.state_dict()) == set(ref.state_dict())  # names kept
        torch.testing.assert_close(fused(x), ref(x))
        assert "fused_activation='relu6'" in repr(fused[0].bn)
    scripted = torch.jit.script(bnkit.fuse_activations(copy.deepcopy(model).eval(), x))
    torch.testing.assert_close(scripted(x), copy.deepcopy(model).eval()(x))


def test_transformers_mobilenet_v2_is_fused_by_data_flow() -> None:
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tf.MobileNetV2Model(tf.MobileNetV2Config(depth_multiplier=0.35, image_size=64))
        model.eval()
        x = torch.randn(1, 3, 64, 64)
        want = model(x).last_hidden_state
        fused = bnkit.fuse_activations(model, x)
    sites = bnkit.fused_sites(fused)
    assert len(sites) == 35 and all(s.endswith("+ relu6") for s in sites)
    torch.testing.assert_close(fused(x).last_hidden_state, want, rtol=1e-5, atol=1e-5)
