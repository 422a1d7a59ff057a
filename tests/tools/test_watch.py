"""bnkit.watch: each warning on the case that must raise it, silence on the correct loop,
with torch's and bnkit's layers; the history's numbers against float64; its files."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import bnkit
from bnkit.tools.watch import BatchNormWarning

KINDS: dict[str, Callable[[int], nn.Module]] = {"torch": nn.BatchNorm2d, "bnkit": bnkit.BatchNorm2d}


def _net(kind: str) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), KINDS[kind](8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)
    )


def _batches(k: int, n: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, 8, 8, generator=g) * 2 + 1 for _ in range(k)]


def _kinds(caught: list[warnings.WarningMessage]) -> list[str]:
    out = []
    for w in caught:
        if issubclass(w.category, BatchNormWarning):
            text = str(w.message)
            out.append(text[text.index("(") + 1 : text.index(")")])
    return out


def _run(fn: Callable[[], None]) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return _kinds(caught)


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_correct_train_eval_loop_is_silent(kind: str) -> None:
    model = _net(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def loop() -> None:
        with bnkit.watch(model, every=1):
            for _epoch in range(3):
                model.train()
                for x in _batches(4):
                    opt.zero_grad()
                    model(x).sum().backward()
                    opt.step()
                model.eval()
                with torch.no_grad():
                    for x in _batches(2):
                        model(x)

    assert _run(loop) == []


@pytest.mark.parametrize("kind", list(KINDS))
def test_validation_without_eval_warns_under_no_grad_and_inference_mode(kind: str) -> None:
    for ctx in (torch.no_grad, torch.inference_mode):
        model = _net(kind).train()

        def run(ctx: Callable[[], object] = ctx, model: nn.Module = model) -> None:
            with bnkit.watch(model), ctx():  # type: ignore[attr-defined]
                model(_batches(1)[0])

        assert _run(run) == ["no-grad training forward"]


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_same_batch_twice_warns_and_new_batches_do_not(kind: str) -> None:
    model = _net(kind).train()
    x = _batches(1)[0]
    assert _run(lambda: [model(b) for b in _batches(3)] and None) == []  # unwatched

    def twice() -> None:
        with bnkit.watch(model):
            model(x)
            model(x)

    assert _run(twice) == ["same batch twice"]

    def reused_buffer() -> None:  # a loader writing new values into the same tensor
        buf = x.clone()
        with bnkit.watch(model):
            for b in _batches(3):
                buf.copy_(b)
                model(buf)

    assert _run(reused_buffer) == []


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_classic_frozen_backbone_warns_and_bnkit_freeze_does_not(kind: str) -> None:
    model = _net(kind)
    model[1].requires_grad_(False)  # "frozen", then model.train() every epoch

    def epochs(m: nn.Module) -> None:
        with bnkit.watch(m):
            for _ in range(2):
                m.train()
                for b in _batches(2):
                    m(b).sum().backward()

    before = model[1].running_mean.clone()
    assert _run(lambda: epochs(model)) == ["frozen parameters, moving statistics"]
    assert not torch.equal(before, model[1].running_mean)  # it did drift
    fixed = _net(kind)
    bnkit.freeze(fixed, layers="1")
    assert _run(lambda: epochs(fixed)) == []


@pytest.mark.parametrize("kind", list(KINDS))
def test_tiny_batches_warn(kind: str) -> None:
    bn1 = {"torch": nn.BatchNorm1d, "bnkit": bnkit.BatchNorm1d}[kind]
    g = torch.Generator().manual_seed(0)

    def run(n: int) -> None:
        m = nn.Sequential(nn.Linear(12, 6), bn1(6)).train()
        with bnkit.watch(m):
            m(torch.randn(n, 12, generator=g))

    assert _run(lambda: run(2)) == ["tiny batch"]
    assert _run(lambda: run(8)) == []


@pytest.mark.parametrize("kind", list(KINDS))
def test_non_finite_statistics_name_the_first_layer(kind: str) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), KINDS[kind](4), nn.Conv2d(4, 4, 1), KINDS[kind](4)
    ).train()
    x = _batches(1)[0]
    x[0, 0, 0, 0] = float("inf")
    with bnkit.watch(model, every=1, warn=False) as w:
        model(x)
    found = [(d["layer"], d["kind"]) for d in w.history.warnings]
    assert found == [("1", "non-finite statistics")]


@pytest.mark.parametrize("kind", list(KINDS))
def test_drift_warns_when_the_input_moves(kind: str) -> None:
    model = nn.Sequential(KINDS[kind](3)).train()

    def shifted() -> None:
        with bnkit.watch(model, every=1, warmup=5):
            for b in _batches(8):
                model(b)
            for b in _batches(2):
                model(b + 50.0)

    assert _run(shifted) == ["drift"]
    steady = nn.Sequential(KINDS[kind](3)).train()

    def same_distribution() -> None:
        with bnkit.watch(steady, every=1, warmup=5):
            for _ in range(3):
                for b in _batches(8):
                    steady(b + 0.0)

    assert "drift" not in _run(same_distribution)


def test_warnings_come_once_per_layer_and_kind() -> None:
    model = _net("bnkit").train()
    with bnkit.watch(model, warn=False) as w, torch.no_grad():
        for b in _batches(5):
            model(b)
    assert [d["kind"] for d in w.history.warnings] == ["no-grad training forward"]


def test_records_match_float64_and_the_history_files(tmp_path: Path) -> None:
    model = _net("torch")
    xs = _batches(4)
    with bnkit.watch(model, every=2) as w:
        feats = []
        for x in xs:
            feats.append(model[0](x).detach())
            model(x)
    recs = w.history.records
    assert [r.step for r in recs] == [1, 3]  # every 2 steps
    f = feats[2].double()
    assert recs[1].batch_mean == pytest.approx(float(f.mean(dim=(0, 2, 3)).mean()), rel=1e-6)
    var = f.var(dim=(0, 2, 3), unbiased=False).mean()
    assert recs[1].batch_var == pytest.approx(float(var), rel=1e-6)
    ref = nn.BatchNorm2d(8)
    for f3 in feats[:3]:
        ref(f3)
    assert recs[1].running_mean == pytest.approx(float(ref.running_mean.double().mean()), rel=1e-6)
    assert recs[1].running_var == pytest.approx(float(ref.running_var.double().mean()), rel=1e-6)
    assert recs[1].momentum == 0.1 and recs[1].values_per_channel == 16 * 36
    w.history.to_json(tmp_path / "h.json")
    back = json.loads((tmp_path / "h.json").read_text())
    assert len(back["records"]) == 2 and back["records"][0]["layer"] == "1"
    w.history.to_csv(tmp_path / "h.csv")
    assert (tmp_path / "h.csv").read_text().splitlines()[0].startswith("step,layer")
    w.history.plot(tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".*tmp*"))


def test_hooks_are_removed_on_exit() -> None:
    model = _net("bnkit")
    with bnkit.watch(model) as w:
        model(_batches(1)[0])
    n = len(w.history.records)
    model(_batches(1)[0])
    assert len(w.history.records) == n
    assert not model[1]._forward_hooks and not model[1]._forward_pre_hooks


def test_tensorboard_events_are_written_and_read_back(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    model = _net("bnkit")
    writer = SummaryWriter(str(tmp_path))
    with bnkit.watch(model, every=1, writer=writer):
        for b in _batches(3):
            model(b)
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "batchnorm/1/running_mean" in tags and "batchnorm/1/gap" in tags
    events = acc.Scalars("batchnorm/1/running_mean")
    assert [e.step for e in events] == [1, 2, 3]
    assert events[-1].value == pytest.approx(float(model[1].running_mean.mean()), rel=1e-6)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        bnkit.watch("model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every"):
        bnkit.watch(_net("bnkit"), every=0)
    with pytest.raises(ValueError, match="drift"):
        bnkit.watch(_net("bnkit"), drift=-1)
