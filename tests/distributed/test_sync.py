"""SyncBatchNorm with real processes (2 and 3 ranks, gloo over loopback), no mocks.

Each rank runs its slice of a global batch; the parent checks that the outputs, input
gradients, summed weight/bias gradients and running statistics equal those of one bnkit
BatchNorm on the concatenated batch (float64, tolerance 1e-10), including uneven and empty
per-rank batches.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bnkit
from tests.distributed import _workers

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="no gloo backend"
)


def _spawn(fn, world: int, tmp_path: Path) -> list[Path]:
    init = tmp_path / "init"
    mp.spawn(fn, args=(world, str(init), str(tmp_path)), nprocs=world, join=True)
    return sorted(tmp_path.glob("rank*"))


def _reference(case: dict, step_states: int = 2) -> list[dict]:
    torch.manual_seed(0)
    tail = case["tail"]
    kind = {1: bnkit.BatchNorm1d, 2: bnkit.BatchNorm1d, 3: bnkit.BatchNorm2d, 4: bnkit.BatchNorm3d}[
        len(tail)
    ]
    bn = kind(tail[0], **case["kw"]).double()
    if bn.weight is not None:
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(0.5, 1.5, bn.num_features))
    out = []
    for step in range(step_states):
        x, go = _workers.global_data(case, step)
        x = x.requires_grad_()
        y = bn(x)
        y.backward(go)
        out.append(
            {
                "y": y.detach(),
                "gx": x.grad,
                "gw": None if bn.weight is None else bn.weight.grad.clone(),
                "gb": None if bn.bias is None else bn.bias.grad.clone(),
            }
        )
        bn.zero_grad()
    out.append({k: v.clone() for k, v in bn.state_dict().items()})
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_sync_equals_batchnorm_on_the_global_batch(world: int, tmp_path: Path) -> None:
    _spawn(_workers.run_cases, world, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    cases = [c for c in _workers.CASES if len(c["sizes"]) == world]
    assert len(ranks[0]) == len(cases) > 0
    for ci, case in enumerate(cases):
        ref = _reference(case)
        for step in range(2):
            for key in ("y", "gx"):
                got = torch.cat([ranks[r][ci]["steps"][step][key] for r in range(world)])
                torch.testing.assert_close(got, ref[step][key], atol=1e-10, rtol=0)
            for key in ("gw", "gb"):
                if ref[step][key] is None:
                    continue
                total = sum(ranks[r][ci]["steps"][step][key] for r in range(world))
                torch.testing.assert_close(total, ref[step][key], atol=1e-9, rtol=0)
        for r in range(world):
            state = ranks[r][ci]["state"]
            assert list(state) == list(ref[-1])
            for k, v in ref[-1].items():
                torch.testing.assert_close(state[k], v, atol=1e-12, rtol=0, msg=f"{case} {k}")


def test_ranks_that_disagree_fail_with_the_layer_named(tmp_path: Path) -> None:
    _spawn(_workers.run_mismatch, 2, tmp_path)
    msgs = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    for msg in msgs:
        assert "call #1" in msg and "SyncBatchNorm '" in msg, msg
    assert "'0'" in msgs[0] and "'1'" in msgs[1]


def test_directly_built_layers_do_not_collide(tmp_path: Path) -> None:
    _spawn(_workers.run_direct_layers_swapped, 2, tmp_path)
    for r in range(2):
        msg = (tmp_path / f"rank{r}.txt").read_text()
        assert "the ranks run different BatchNorm calls" in msg, msg


def test_two_layers_of_one_process_under_one_name_are_refused() -> None:
    import bnkit.nn.sync as sync

    a = bnkit.SyncBatchNorm(3, sync_name="same")
    b = bnkit.SyncBatchNorm(3, sync_name="same")
    assert bnkit.SyncBatchNorm(3).sync_name != bnkit.SyncBatchNorm(3).sync_name
    sync._by_name["same"] = a  # as if a had run under a process group
    with pytest.raises(RuntimeError, match="already runs as 'same'"):
        b.train()._check_name()


def test_consistency_check_resync_and_global_recalibrate(tmp_path: Path) -> None:
    _spawn(_workers.run_consistency_and_recalibrate, 2, tmp_path)
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert outs[0]["inconsistent"] == ["1"] and outs[0]["after_resync"] == []
    assert outs[1]["inconsistent"] == ["1"]
    # the global population statistics, from one process on all shards
    single = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    single.load_state_dict(outs[0]["state"])
    bnkit.recalibrate(single, outs[0]["shard"] + outs[1]["shard"], progress=False)
    for r in range(2):
        torch.testing.assert_close(outs[r]["running_mean"], single[1].running_mean)
        torch.testing.assert_close(outs[r]["running_var"], single[1].running_var)


def test_convert_to_sync_and_back_keeps_state() -> None:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3),
        torch.nn.BatchNorm2d(3),
        torch.nn.Flatten(),
        torch.nn.BatchNorm1d(27),
    )
    model(torch.randn(4, 1, 5, 5) + 1)
    sync = bnkit.convert(model, to="sync")
    assert isinstance(sync[1], bnkit.SyncBatchNorm) and sync[1].sync_name == "1"
    x = torch.randn(2, 1, 5, 5)
    model.eval(), sync.eval()
    torch.testing.assert_close(sync(x), model(x))  # world size 1: a plain BatchNorm
    back = bnkit.convert(sync, to="torch")
    assert type(back[1]) is torch.nn.BatchNorm2d and type(back[3]) is torch.nn.BatchNorm1d
    torch.testing.assert_close(back[3].running_var, model[3].running_var)
    torch_sync = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    plain = bnkit.convert(torch_sync, to="bnkit", sync_rank=2)
    assert type(plain[1]) is bnkit.BatchNorm2d
