"""Fuzz worker, run in a subprocess by test_fuzz.py: random (often bad) calls of every
bnkit layer kind next to torch's. Prints one JSON line of counts; exits 1 on a mismatch
(the first few are printed). A crash by a signal is what the parent test looks for."""

from __future__ import annotations

import copy
import json
import os
import sys
from collections import Counter
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import bnkit
from bnkit.nn import _kernels
from bnkit.nn.fused import batch_norm_act

counts: Counter[str] = Counter()
failures: list[str] = []

KINDS = ["bn", "renorm", "ghost", "sync", "frozen", "functional"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool]
TENSORS = ["running_mean", "running_var", "weight", "bias"]
DEFECTS = ["none", "size", "dtype", "device", "strided", "nan"]
ACTS = {None: lambda t: t, "relu": torch.relu, "relu6": nn.functional.relu6}
RESIDUALS = ["none", "same", "broadcast", "other_dtype", "other_layout"]


def torch_bn(rank: int, c: int) -> nn.Module:
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(
        rank, nn.BatchNorm2d
    )
    return cls(c)


def bnkit_of(kind: str, ref: nn.Module) -> Any:
    if kind in ("bn", "functional"):
        return bnkit.convert(copy.deepcopy(ref), to="bnkit")
    if kind == "renorm":
        return bnkit.convert(copy.deepcopy(ref), to="renorm")
    if kind == "ghost":
        return bnkit.convert(copy.deepcopy(ref), to="ghost", virtual_batch_size=2)
    if kind == "sync":
        return bnkit.convert(copy.deepcopy(ref), to="sync")
    return bnkit.convert(copy.deepcopy(ref), to="frozen")


def damage(m: nn.Module, name: str, defect: str, c: int) -> None:
    t = getattr(m, name, None)
    if t is None or defect == "none":
        return
    with torch.no_grad():
        if defect == "size":
            new = torch.ones(max(c + 1, 2))
        elif defect == "dtype":
            new = t.detach().to(torch.float64 if t.dtype != torch.float64 else torch.float32)
        elif defect == "device":
            new = torch.ones(c, device="meta")
        elif defect == "strided":
            new = torch.ones(2 * c)[::2].mul_(t.detach().float())
        else:
            new = t.detach().clone()
            if new.numel():
                new[0] = float("nan")
    if isinstance(t, nn.Parameter):
        m._parameters[name] = nn.Parameter(new, requires_grad=t.requires_grad)
    else:
        m._buffers[name] = new


def same(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_meta or b.is_meta:  # a damaged buffer left on meta: no values to compare
        return a.device == b.device
    a, b = a.detach().double(), b.detach().double()
    if not torch.equal(a.isnan(), b.isnan()):
        return False
    fin = a.isfinite() & b.isfinite()
    if not torch.equal(a[~fin].nan_to_num(0.0), b[~fin].nan_to_num(0.0)):
        return False
    tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float32: 1e-3}.get(dtype, 1e-8)
    return bool(torch.allclose(a[fin], b[fin], rtol=tol, atol=tol))


@st.composite
def cases(draw: Any) -> dict[str, Any]:
    rank = draw(st.integers(1, 5))
    c = draw(st.integers(1, 4))
    shape = [draw(st.integers(0, 4))] + [c] + [draw(st.integers(0, 3)) for _ in range(rank - 2)]
    if rank == 1:
        shape = [draw(st.integers(0, 4))]
    return {
        "kind": draw(st.sampled_from(KINDS)),
        "backend": draw(st.sampled_from(["plain", "cpp"])),
        "training": draw(st.booleans()),
        "rank": rank,
        "c": c,
        "shape": shape,
        "dtype": draw(st.sampled_from(DTYPES)),
        "layout": draw(st.sampled_from(["contiguous", "channels_last", "transposed", "offset"])),
        "values": draw(st.sampled_from(["normal", "nan", "inf", "big"])),
        "tensor": draw(st.sampled_from(TENSORS)),
        "defect": draw(st.sampled_from(DEFECTS)),
        "seed": draw(st.integers(0, 2**16)),
        "act": draw(st.sampled_from(list(ACTS))),
        "residual": draw(st.sampled_from(RESIDUALS)),
    }


def make_input(case: dict[str, Any]) -> torch.Tensor:
    g = torch.Generator().manual_seed(case["seed"])
    shape = case["shape"]
    x = torch.randn(
        shape if case["layout"] != "offset" else [shape[0] + 1, *shape[1:]], generator=g
    )
    x = x * 3 + 2
    if case["values"] == "nan" and x.numel():
        x.view(-1)[0] = float("nan")
    elif case["values"] == "inf" and x.numel():
        x.view(-1)[-1] = float("inf")
    elif case["values"] == "big":
        x = x * 1e4
    x = x.to(case["dtype"])
    if case["layout"] == "offset":
        x = x[1:]
    elif case["layout"] == "channels_last" and x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    elif case["layout"] == "transposed" and x.dim() >= 3:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x


def make_residual(case: dict[str, Any], x: torch.Tensor) -> torch.Tensor | None:
    """What the fused call adds before its activation: nothing, a tensor like x, or one it
    cannot take (a broadcast, another dtype, another memory format)."""
    kind = case["residual"]
    if kind == "none" or not x.is_floating_point():
        return None
    g = torch.Generator().manual_seed(case["seed"] + 1)
    r = torch.randn(x.shape, generator=g).to(x.dtype)
    if kind == "same" and x.dim() in (4, 5) and not x.is_contiguous():
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        r = r.contiguous(memory_format=fmt)
    elif kind == "broadcast" and x.dim() >= 2:
        r = r[:1]
    elif kind == "other_dtype":
        r = r.to(torch.float64 if x.dtype != torch.float64 else torch.float32)
    elif kind == "other_layout" and x.dim() == 4:
        fmt = torch.channels_last if x.is_contiguous() else torch.contiguous_format
        r = r.contiguous(memory_format=fmt)
    return r


def run(fn: Any) -> tuple[Any, BaseException | None]:
    try:
        return fn(), None
    except Exception as exc:
        return None, exc


@settings(
    max_examples=int(os.environ.get("BNKIT_FUZZ_EXAMPLES", "400")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(cases())
def fuzz(case: dict[str, Any]) -> None:
    _kernels.set_backend(case["backend"])
    counts["cases"] += 1
    c, rank = case["c"], case["rank"]
    ref = torch_bn(rank, c)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
        ref.running_mean.uniform_(-1, 1)
        ref.running_var.uniform_(0.5, 2)
    ours = bnkit_of(case["kind"], ref)
    damage(ref, case["tensor"], case["defect"], c)
    if case["kind"] == "frozen" and case["tensor"] in ("weight", "bias"):
        damage(ours, case["tensor"], case["defect"], c)  # buffers there: damage alike
    else:
        damage(ours, case["tensor"], case["defect"], c)
    training = case["training"] and case["kind"] != "frozen"
    ref.train(training)
    ours.train(case["training"])
    x = make_input(case)
    if case["kind"] == "functional":
        args = lambda m: (m.running_mean, m.running_var, m.weight, m.bias, training, 0.1, 1e-5)  # noqa: E731
        y_ref, e_ref = run(lambda: torch.nn.functional.batch_norm(x, *args(ref)))
        y, e = run(lambda: bnkit.functional.batch_norm(x, *args(ours)))
    elif case["act"] is not None or case["residual"] != "none":
        # the fused call: activation(bn(x) + residual), against torch's ops
        r, act = make_residual(case, x), case["act"]
        y_ref, e_ref = run(lambda: ACTS[act](ref(x) + (r if r is not None else 0)))
        y, e = run(lambda: batch_norm_act(ours, x, r, act))
    else:
        y_ref, e_ref = run(lambda: ref(x))
        y, e = run(lambda: ours(x))
    comparable = case["kind"] in ("bn", "sync", "functional", "frozen") or not training
    if e is not None and e_ref is not None:
        if isinstance(e, type(e_ref)) or not comparable:
            counts["both raised"] += 1
        else:  # the same bad input gets torch's exception type
            key = (
                f"MISMATCH: exception type: torch {type(e_ref).__name__}, bnkit {type(e).__name__}"
            )
            counts[key] += 1
            failures.append(f"{case}: torch raised {e_ref!r}, bnkit {e!r}")
    elif e is not None and not comparable:
        # e.g. Ghost BatchNorm's last virtual batch holding one value per channel
        counts["variant raised (no torch counterpart in training)"] += 1
    elif e is not None:
        counts["bnkit stricter (raised where torch ran)"] += 1
        what = str(e).partition(": ")[2] or str(e)
        empty = " (empty input)" if x.numel() == 0 else ""
        counts[f"  stricter{empty}: {type(e).__name__}: {what[:50]}"] += 1
    elif e_ref is not None:
        if comparable:
            counts["MISMATCH: bnkit ran where torch raised"] += 1
            failures.append(f"{case}: torch raised {e_ref!r}")
        else:
            counts["variant ran (no torch counterpart in training)"] += 1
    elif not comparable:
        counts["variant ran (no torch counterpart in training)"] += 1
    else:
        ok = same(y_ref, y, x.dtype)
        if ok and training and getattr(ref, "running_mean", None) is not None:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                a, b = getattr(ref, name), getattr(ours, name)
                if a is not None and b is not None and not same(a, b, torch.float32):
                    ok = False
        counts["matched torch" if ok else "MISMATCH: different result"] += 1
        if not ok:
            failures.append(f"{case}")
        elif backward_comparable(case, x):
            pairs = zip(grads(ref, x, case), grads(ours, x, case), strict=True)
            grads_ok = all(same(a, b, x.dtype) for a, b in pairs)
            counts["gradients matched torch" if grads_ok else "MISMATCH: gradients"] += 1
            if not grads_ok:
                failures.append(f"gradients: {case}")


def backward_comparable(case: dict[str, Any], x: torch.Tensor) -> bool:
    """An undamaged layer on float input: the plain call's backward is compared too."""
    return (
        case["kind"] == "bn"
        and case["defect"] == "none"
        and x.dtype in (torch.float32, torch.float64)
        and x.numel() > 0
    )


def grads(m: nn.Module, x: torch.Tensor, case: dict[str, Any]) -> list[torch.Tensor]:
    """d(sum(g * m(x))) / d(x, weight, bias) for a random g, on a copy of m."""
    m = copy.deepcopy(m)
    xi = x.detach().clone().requires_grad_()
    y = m(xi)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(case["seed"] + 2))
    params = [p for p in (m.weight, m.bias) if p is not None]
    return list(torch.autograd.grad(y, [xi, *params], g.to(y.dtype)))


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    fuzz()
    print(json.dumps(dict(counts)))
    for f in failures[:10]:
        print("FAIL", f[:600], file=sys.stderr)
    sys.exit(1 if failures else 0)
