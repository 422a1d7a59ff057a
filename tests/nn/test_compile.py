"""bnkit's layers under ``torch.compile``: no graph breaks in training or eval (so
``fullgraph=True`` works, ``momentum=None`` included), and the compiled forward,
gradients and running statistics are eager's."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch._dynamo as dynamo
from torch import nn

import bnkit
from tests.conftest import random_input

LAYERS: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    "2d": lambda: (bnkit.BatchNorm2d(4), random_input((3, 4, 5, 5), seed=1)),
    "2d-cumulative": lambda: (bnkit.BatchNorm2d(4, momentum=None), random_input((3, 4, 5, 5))),
    "1d-rows-no-affine": lambda: (bnkit.BatchNorm1d(4, affine=False), random_input((6, 4))),
    "1d-ncl-no-bias": lambda: (bnkit.BatchNorm1d(4, bias=False), random_input((3, 4, 7))),
    "3d-no-stats": lambda: (
        bnkit.BatchNorm3d(4, track_running_stats=False),
        random_input((2, 4, 3, 3, 3)),
    ),
    "channels-last": lambda: (
        bnkit.BatchNorm2d(4, momentum=None),
        random_input((3, 4, 5, 5)).to(memory_format=torch.channels_last),
    ),
    "lazy": lambda: (bnkit.LazyBatchNorm2d(), random_input((3, 4, 5, 5), seed=2)),
}


def _net(momentum: float | None) -> nn.Module:
    torch.manual_seed(0)
    return bnkit.convert(
        nn.Sequential(
            nn.Conv2d(3, 8, 3),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3),
            nn.BatchNorm2d(8, momentum=momentum),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 6 * 6, 10),
        )
    )


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", sorted(LAYERS))
def test_no_graph_breaks(case: str, training: bool) -> None:
    layer, x = LAYERS[case]()
    layer(x)  # materializes the lazy form
    layer.train(training)
    x.requires_grad_(True)
    dynamo.reset()
    explained = dynamo.explain(layer)(x)
    reasons = [str(r.reason).splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", sorted(LAYERS))
def test_fullgraph_matches_eager(case: str, training: bool) -> None:
    """Two steps (the counter and the cumulative average move), compiled with
    ``fullgraph=True`` (aot_eager: dynamo and AOTAutograd, no code generation): output,
    input/weight/bias gradients, running statistics and counter are eager's."""
    layer, x = LAYERS[case]()
    layer(x)
    layer.train(training)
    eager = copy.deepcopy(layer)
    dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for step in range(2):
        xs = [(x + step).detach().requires_grad_(True) for _ in range(2)]
        outs = [compiled(xs[0]), eager(xs[1])]
        torch.testing.assert_close(outs[0], outs[1])
        g = torch.randn_like(outs[1]) + 0.5
        for o in outs:
            o.backward(g)
        torch.testing.assert_close(xs[0].grad, xs[1].grad)
    for (name, p), (_, q) in zip(layer.named_parameters(), eager.named_parameters(), strict=True):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    for (name, b), (_, c) in zip(layer.named_buffers(), eager.named_buffers(), strict=True):
        exact = not b.is_floating_point()  # the counter; the statistics to rounding (the
        # eager C++ path and the compiled torch ops sum in different orders)
        torch.testing.assert_close(b, c, msg=name, **({"rtol": 0, "atol": 0} if exact else {}))


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_inductor_training_step_matches_eager(momentum: float | None) -> None:
    """A real compile (inductor's generated code) of a CNN's training step with SGD."""
    model = _net(momentum)
    eager = copy.deepcopy(model)
    dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, eager)]
    torch.manual_seed(3)
    for _ in range(2):
        x = torch.randn(4, 3, 10, 10) * 2 + 1
        target = torch.randint(0, 10, (4,))
        losses = []
        for opt, run in ((opts[0], compiled), (opts[1], eager)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(run(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (name, p), (_, q) in zip(
        model.state_dict().items(), eager.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    model.eval()
    eager.eval()
    x = torch.randn(2, 3, 10, 10) + 1
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)
