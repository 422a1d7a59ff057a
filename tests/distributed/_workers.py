"""Code run inside the spawned ranks (real processes, gloo over loopback)."""

from __future__ import annotations

import datetime
import os
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import bnkit

CASES: list[dict[str, Any]] = [
    # sizes per rank (world = len(sizes)), input tail shape, options
    {"sizes": [3, 5], "tail": (4, 3, 3), "kw": {}},
    {"sizes": [4, 4], "tail": (4,), "kw": {"momentum": None}},
    {"sizes": [2, 0], "tail": (4, 5), "kw": {"affine": False}},
    {"sizes": [1, 6], "tail": (4, 2, 2, 2), "kw": {"bias": False, "eps": 1e-3}},
    {"sizes": [3, 1, 0], "tail": (4, 3, 3), "kw": {}},
    {"sizes": [2, 2, 3], "tail": (4, 5), "kw": {"momentum": None, "track_running_stats": False}},
]


def global_data(case: dict[str, Any], step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + 7)
    n = sum(case["sizes"])
    x = torch.randn(n, *case["tail"], generator=g, dtype=torch.float64) * 3 + 2
    go = torch.randn(n, *case["tail"], generator=g, dtype=torch.float64)
    return x, go


def _init(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )


def run_cases(rank: int, world: int, init_file: str, out_dir: str) -> None:
    try:
        _init(rank, world, init_file)
        results = []
        for ci, case in enumerate(CASES):
            if len(case["sizes"]) != world:
                continue
            torch.manual_seed(0)
            bn = bnkit.SyncBatchNorm(case["tail"][0], **case["kw"]).double()
            if bn.weight is not None:
                with torch.no_grad():
                    bn.weight.copy_(torch.linspace(0.5, 1.5, bn.num_features))
            lo = sum(case["sizes"][:rank])
            hi = lo + case["sizes"][rank]
            steps = []
            for step in range(2):
                x, go = global_data(case, step)
                xl = x[lo:hi].clone().requires_grad_()
                y = bn(xl)
                y.backward(go[lo:hi])
                steps.append(
                    {
                        "y": y.detach(),
                        "gx": xl.grad,
                        "gw": None if bn.weight is None else bn.weight.grad.clone(),
                        "gb": None if bn.bias is None else bn.bias.grad.clone(),
                    }
                )
                bn.zero_grad()
            results.append(
                {
                    "case": ci,
                    "steps": steps,
                    "state": {k: v.clone() for k, v in bn.state_dict().items()},
                }
            )
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()
    except Exception:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def run_mismatch(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Rank 1 skips the first BatchNorm: both ranks must raise naming the layer."""
    _init(rank, world, init_file)
    model = bnkit.convert(
        torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)), to="sync"
    )
    for m in model:
        m.timeout = 20
    x = torch.randn(4, 3)
    try:
        if rank == 1:
            model[1](x)
        else:
            model(x)
        msg = "no error"
    except RuntimeError as exc:
        msg = str(exc)
    (Path(out_dir) / f"rank{rank}.txt").write_text(msg)
    os._exit(0)  # the group is in an unknown state: do not wait in destroy


def run_direct_layers_swapped(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Two SyncBatchNorm(4) built directly (no names given); rank 0 runs the first, rank 1
    the second: both must raise instead of merging the wrong layers' statistics."""
    _init(rank, world, init_file)
    model = torch.nn.Sequential(
        bnkit.SyncBatchNorm(4, timeout=20), bnkit.SyncBatchNorm(4, timeout=20)
    )
    x = torch.randn(4, 4) + rank
    try:
        model[rank](x)
        msg = "no error"
    except RuntimeError as exc:
        msg = str(exc)
    (Path(out_dir) / f"rank{rank}.txt").write_text(msg)
    os._exit(0)


def run_consistency_and_recalibrate(rank: int, world: int, init_file: str, out_dir: str) -> None:
    _init(rank, world, init_file)
    out: dict[str, Any] = {}
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    torch.manual_seed(0)
    model = bnkit.convert(model, to="sync")
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4, 3) + 0.1)
        model[0].bias.zero_()
    # buffers drift on one rank (e.g. a local eval-time update), then get re-synced
    with torch.no_grad():
        model[1].running_mean.add_(float(rank))
    out["inconsistent"] = bnkit.check_consistency(model)
    bnkit.resync(model)
    out["after_resync"] = bnkit.check_consistency(model)
    # every rank recalibrates on its own shard; the result is the global statistics
    g = torch.Generator().manual_seed(rank)
    shard = [
        torch.randn(2 + rank, 3, generator=g, dtype=torch.float32) * (rank + 1) + rank
        for _ in range(3)
    ]
    bnkit.recalibrate(model, shard, progress=False)
    out["shard"] = shard
    out["running_mean"] = model[1].running_mean.clone()
    out["running_var"] = model[1].running_var.clone()
    out["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()
