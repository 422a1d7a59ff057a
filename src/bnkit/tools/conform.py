"""A conformance checker for anyone's BatchNorm: where does it depart from torch, and why?

:func:`conform` builds the implementation, finds its parameters and statistics (by torch's
names or the usual others: gamma/beta, moving_mean/moving_var, of shape (C,) or (1, C, 1, 1),
as buffers, parameters or plain attributes), runs a battery of probes against bnkit's
float64 reference of torch's semantics, and names the classic mistakes by their numerical
signature. A property it cannot probe is reported as "skipped" with the reason, never as a
pass.
"""

from __future__ import annotations

import inspect as pyinspect
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bnkit.nn import functional as F

__all__ = ["ConformReport", "Probe", "closed_form", "conform"]

_NAMES = {
    "weight": ("weight", "gamma", "scale", "g"),
    "bias": ("bias", "beta", "shift", "b"),
    "running_mean": ("running_mean", "moving_mean", "mean", "rm", "run_mean", "avg_mean"),
    "running_var": (
        "running_var",
        "moving_var",
        "moving_variance",
        "var",
        "rv",
        "run_var",
        "avg_var",
    ),
    "num_batches_tracked": ("num_batches_tracked", "num_batches", "steps", "n_batches"),
}
_C = 4


@dataclass
class Probe:
    """One property: status is "pass", "fail" or "skipped"."""

    name: str
    status: str
    deviation: float | None = None
    diagnosis: str = ""


@dataclass
class ConformReport:
    """All probes, what was found about the implementation, and the verdict."""

    target: str
    probes: list[Probe] = field(default_factory=list)
    found: dict[str, str] = field(default_factory=dict)
    momentum_convention: str = "torch"

    @property
    def ok(self) -> bool:
        """True when no probed property failed (skipped ones are listed, not passed)."""
        return all(p.status != "fail" for p in self.probes)

    @property
    def failures(self) -> list[Probe]:
        return [p for p in self.probes if p.status == "fail"]

    def to_json(self) -> str:
        data = {
            "target": self.target,
            "ok": self.ok,
            "found": self.found,
            "momentum_convention": self.momentum_convention,
            "probes": [asdict(p) for p in self.probes],
        }
        return json.dumps(data, indent=1)

    def table(self) -> str:
        rows = [f"conformance of {self.target} with torch.nn.BatchNorm semantics"]
        if self.found:
            rows.append("found: " + ", ".join(f"{k}={v}" for k, v in self.found.items()))
        width = max(len(p.name) for p in self.probes) if self.probes else 10
        for p in self.probes:
            dev = "" if p.deviation is None else f"{p.deviation:9.2e}"
            rows.append(f"  {p.status.upper():<7} {p.name:<{width}} {dev:>9}  {p.diagnosis}")
        n_fail = len(self.failures)
        n_skip = sum(p.status == "skipped" for p in self.probes)
        rows.append(
            f"{len(self.probes) - n_fail - n_skip} passed, {n_fail} failed, {n_skip} skipped"
        )
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


# ------------------------------------------------------------------ the adapter


class _Adapter:
    """Builds the implementation and reads/writes its tensors whatever their names."""

    def __init__(
        self, factory: Callable[..., Any], rank: int | None, attrs: dict[str, str], convention: str
    ) -> None:
        self.factory = factory
        self.attrs = dict(attrs)
        self.convention = convention
        self.rank = rank
        self.kwargs_used: dict[str, Any] = {}

    def _sig(self) -> pyinspect.Signature | None:
        try:
            return pyinspect.signature(self.factory)
        except (TypeError, ValueError):
            return None

    def build(self, momentum: float | None = 0.1, *, eps: float = 1e-5) -> nn.Module:
        """An instance with C channels, torch-convention ``momentum`` (converted to the
        implementation's convention); raises TypeError when it cannot be built so."""
        sig = self._sig()
        params = sig.parameters if sig is not None else {}
        kwargs: dict[str, Any] = {}
        if "momentum" in params:
            kwargs["momentum"] = (
                None
                if momentum is None
                else (1 - momentum if self.convention == "keras" else momentum)
            )
        elif momentum != 0.1:
            raise TypeError("the constructor takes no momentum argument")
        if "eps" in params:
            kwargs["eps"] = eps
        elif "epsilon" in params:
            kwargs["epsilon"] = eps
        for dims_name in ("num_dims", "dims", "ndim", "n_dims"):
            if dims_name in params:
                kwargs[dims_name] = self.rank or 4
        module = self.factory(_C, **kwargs)
        self.kwargs_used = kwargs
        if not isinstance(module, nn.Module):
            raise TypeError(f"the factory returned a {type(module).__name__}, not a Module")
        return module

    def find(self, module: nn.Module) -> None:
        for role, names in _NAMES.items():
            if role in self.attrs:
                continue
            for n in names:
                t = getattr(module, n, None)
                if isinstance(t, Tensor) and (role == "num_batches_tracked" or t.numel() == _C):
                    self.attrs[role] = n
                    break

    def get(self, module: nn.Module, role: str) -> Tensor | None:
        name = self.attrs.get(role)
        t = getattr(module, name, None) if name else None
        if not isinstance(t, Tensor):
            return None
        return t.detach().clone().reshape(-1) if role != "num_batches_tracked" else t.detach()

    def set(self, module: nn.Module, role: str, value: Tensor) -> bool:
        name = self.attrs.get(role)
        t = getattr(module, name, None) if name else None
        if not isinstance(t, Tensor):
            return False
        with torch.no_grad():
            t.copy_(value.reshape(t.shape).to(t.dtype))
        return True


# ------------------------------------------------------------------- references


def _ref_train(x: Tensor, w: Tensor | None, b: Tensor | None, eps: float) -> Tensor:
    """torch's training-mode output, in float64, from bnkit's functional (no grad)."""
    with torch.no_grad():
        return F.batch_norm(x.detach().double(), None, None, _d(w), _d(b), True, 0.0, eps)


def _d(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().double()


def closed_form(
    x: Tensor,
    w: Tensor | None,
    b: Tensor | None,
    eps: float,
    unbiased: bool = False,
    eps_outside: bool = False,
    dims: tuple[int, ...] | None = None,
) -> Tensor:
    """Training-mode BatchNorm in float64, straight from the definition; with a flag set,
    the closed form of a typical *wrong* BatchNorm (what the probes compare against)."""
    xd = x.double()
    dims = dims or (0, *range(2, x.dim()))
    mean = xd.mean(dims, keepdim=True)
    var = xd.var(dims, unbiased=unbiased, keepdim=True)
    den = var.sqrt() + eps if eps_outside else (var + eps).sqrt()
    y = (xd - mean) / den
    shape = [1, -1] + [1] * (x.dim() - 2)
    if w is not None:
        y = y * w.double().view(shape)
    if b is not None:
        y = y + b.double().view(shape)
    return y


def _ref_eval(
    x: Tensor, rm: Tensor, rv: Tensor, w: Tensor | None, b: Tensor | None, eps: float
) -> Tensor:
    """torch's eval-mode output, in float64, from bnkit's functional."""
    with torch.no_grad():
        return F.batch_norm(
            x.detach().double(), rm.double(), rv.double(), _d(w), _d(b), False, 0.0, eps
        )


def _dev(a: Tensor, b: Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    d = (a.double() - b.double()).abs().max().item()
    return d if math.isfinite(d) else math.inf


def _data(rank: int, seed: int, n: int = 6) -> Tensor:
    """Non-zero-mean data with one low-variance channel (where eps placement shows)."""
    g = torch.Generator().manual_seed(seed)
    spatial = {2: (), 3: (5,), 4: (3, 3), 5: (2, 2, 2)}[rank]
    x = torch.randn(n, _C, *spatial, generator=g, dtype=torch.float64)
    scale = torch.tensor([2.0, 0.5, 3.0, 0.01], dtype=torch.float64)
    offset = torch.tensor([3.0, -1.0, 5.0, 2.0], dtype=torch.float64)
    shape = [1, -1] + [1] * (rank - 2)
    return x * scale.view(shape) + offset.view(shape)


# ------------------------------------------------------------------------ probes


class _Checker:
    def __init__(self, adapter: _Adapter, report: ConformReport, dtype: torch.dtype) -> None:
        self.a = adapter
        self.r = report
        self.dtype = dtype
        self.tol = 1e-9 if dtype == torch.float64 else 2e-4
        self.rank = adapter.rank or 4
        # the closed form its training forward matches (torch's, or a named mistake)
        self.forward_form: dict[str, Any] | None = None

    def add(self, name: str, status: str, dev: float | None = None, why: str = "") -> None:
        self.r.probes.append(Probe(name, status, dev, why))

    def new(self, momentum: float | None = 0.1, eps: float = 1e-5) -> nn.Module:
        m = self.a.build(momentum, eps=eps).to(self.dtype)
        m.train()
        g = torch.Generator().manual_seed(1)
        self.a.set(m, "weight", torch.rand(_C, generator=g, dtype=torch.float64) + 0.5)
        self.a.set(m, "bias", torch.randn(_C, generator=g, dtype=torch.float64))
        return m

    def x(self, seed: int, n: int = 6) -> Tensor:
        return _data(self.rank, seed, n).to(self.dtype)

    def run(self) -> None:
        m = self.new()
        self.a.find(m)
        self.r.found = {k: v for k, v in self.a.attrs.items()}
        rm0, rv0 = self.a.get(m, "running_mean"), self.a.get(m, "running_var")
        self.probe_init(rm0, rv0)
        self.probe_train_output()
        self.probe_momentum_and_variance()
        self.probe_counter()
        self.probe_cumulative()
        self.probe_eval()
        self.probe_grad_mode()
        self.probe_backward()

    def probe_init(self, rm0: Tensor | None, rv0: Tensor | None) -> None:
        if rm0 is None or rv0 is None:
            self.add(
                "initial running statistics",
                "skipped",
                None,
                "running mean/var not found: name them with attrs={'running_mean': ...}",
            )
            return
        dm, dv = rm0.abs().max().item(), (rv0 - 1).abs().max().item()
        if dm == 0 and dv == 0:
            self.add("initial running statistics", "pass", 0.0)
        elif bool((rv0 == 0).all()):
            self.add(
                "initial running statistics",
                "fail",
                dv,
                "running_var initialised to 0 (torch starts at 1): eval before any "
                "training divides by sqrt(eps)",
            )
        else:
            why = []
            if dm:
                why.append("running_mean does not start at 0")
            if dv:
                why.append("running_var does not start at 1")
            self.add("initial running statistics", "fail", max(dm, dv), "; ".join(why))

    def probe_train_output(self) -> None:
        m = self.new(eps=1e-5)
        x = self.x(2)
        w, b = self.a.get(m, "weight"), self.a.get(m, "bias")
        y = m(x)
        ref = _ref_train(x, w, b, 1e-5)
        dev = _dev(y, ref)
        if dev <= self.tol * 10:
            self.forward_form = {}
            self.add("training output (batch statistics, biased variance)", "pass", dev)
            return
        match = _explain(y, x, w, b, 1e-5, self.tol * 10)
        if match is not None:
            flags, why = match
            self.forward_form = flags
            self.add("training output (batch statistics, biased variance)", "fail", dev, why)
        else:
            self.add(
                "training output (batch statistics, biased variance)",
                "fail",
                dev,
                "differs from torch in a way none of the classic mistakes explains",
            )

    def _step_stats(self, momentum: float | None, steps: int) -> tuple[nn.Module, list[Tensor]]:
        m = self.new(momentum)
        xs = [self.x(10 + i, n=3 + i) for i in range(steps)]
        for x in xs:
            m(x)
        return m, xs

    def probe_momentum_and_variance(self) -> None:
        m, xs = self._step_stats(0.1, 1)
        rm, rv = self.a.get(m, "running_mean"), self.a.get(m, "running_var")
        if rm is None or rv is None:
            self.add("running statistics update", "skipped", None, "running mean/var not found")
            return
        x = xs[0].double()
        dims = (0, *range(2, x.dim()))
        mean, var_u, var_b = x.mean(dims), x.var(dims, unbiased=True), x.var(dims, unbiased=False)
        f = 0.1
        expect_m, expect_v = f * mean, (1 - f) + f * var_u
        dm, dv = _dev(rm, expect_m), _dev(rv, expect_v)
        tol = self.tol * 10 * max(1.0, float(var_u.max()))
        # Keras-style momentum: weight f on the *old* value
        keras_m = (1 - f) * mean
        if dm > tol and _dev(rm, keras_m) <= tol:
            self.r.momentum_convention = "keras"
            self.a.convention = "keras" if self.a.convention == "torch" else "torch"
            self.add(
                "momentum convention",
                "fail",
                dm,
                "momentum weights the old value (Keras/TF style: m*old + (1-m)*new); torch "
                "weights the new batch. Checking the rest with momentum converted (1 - m)",
            )
            m, xs = self._step_stats(0.1, 1)
            rm, rv = self.a.get(m, "running_mean"), self.a.get(m, "running_var")
            assert rm is not None and rv is not None
            dm, dv = _dev(rm, expect_m), _dev(rv, expect_v)
        elif dm > tol:
            self.add(
                "momentum convention",
                "fail",
                dm,
                "running_mean is not (1-momentum)*old + momentum*batch_mean in either convention",
            )
        else:
            self.add("momentum convention", "pass", dm)
        if rm is not None and rv is not None and dv > tol:
            if _dev(rv, (1 - f) + f * var_b) <= tol:
                why = "stores the biased batch variance in running_var (torch stores unbiased)"
            else:
                why = "running_var is not (1-momentum)*old + momentum*unbiased_batch_var"
            self.add("running variance (unbiased)", "fail", dv, why)
        else:
            self.add("running variance (unbiased)", "pass", dv)

    def probe_counter(self) -> None:
        m, _ = self._step_stats(0.1, 3)
        nbt = self.a.get(m, "num_batches_tracked")
        if nbt is None:
            self.add(
                "num_batches_tracked counted",
                "skipped",
                None,
                "no num_batches_tracked attribute (name it with attrs= if it exists)",
            )
            return
        ok = int(nbt) == 3
        self.add(
            "num_batches_tracked counted",
            "pass" if ok else "fail",
            abs(int(nbt) - 3),
            "" if ok else f"counts {int(nbt)} after 3 training batches",
        )

    def probe_cumulative(self) -> None:
        try:
            m, xs = self._step_stats(None, 3)
        except (TypeError, ValueError) as exc:
            self.add(
                "momentum=None is a cumulative average",
                "skipped",
                None,
                f"cannot be built or run with momentum=None ({exc})",
            )
            return
        rm = self.a.get(m, "running_mean")
        if rm is None:
            self.add(
                "momentum=None is a cumulative average", "skipped", None, "running mean not found"
            )
            return
        dims = (0, *range(2, self.rank))
        expect = torch.stack([x.double().mean(dims) for x in xs]).mean(0)
        dev = _dev(rm, expect)
        ok = dev <= self.tol * 10 * 5
        self.add(
            "momentum=None is a cumulative average",
            "pass" if ok else "fail",
            dev,
            ""
            if ok
            else "with momentum=None the running mean is not the plain average "
            "of the batch means (torch: factor 1/num_batches_tracked)",
        )

    def probe_eval(self) -> None:
        m, _ = self._step_stats(0.1, 2)
        rm, rv = self.a.get(m, "running_mean"), self.a.get(m, "running_var")
        if rm is None or rv is None:
            self.add("eval output (running statistics)", "skipped", None, "running stats not found")
            return
        m.eval()
        x = self.x(30)
        w, b = self.a.get(m, "weight"), self.a.get(m, "bias")
        y = m(x)  # with grad enabled, as in a validation loop without no_grad
        dev = _dev(y, _ref_eval(x, rm, rv, w, b, 1e-5))
        if dev > self.tol * 10 and self.forward_form and self.forward_form.get("eps_outside"):
            # judge eval by its own (already reported) eps placement
            shape = [1, -1] + [1] * (x.dim() - 2)
            own = (x.double() - rm.double().view(shape)) / (rv.double().view(shape).sqrt() + 1e-5)
            own = own * (1 if w is None else w.double().view(shape))
            own = own + (0 if b is None else b.double().view(shape))
            dev = _dev(y, own)
        ok = dev <= self.tol * 10
        why = ""
        if not ok:
            why = "eval mode does not normalize with the running statistics" + (
                " (it uses the batch's)"
                if _dev(y, _ref_train(x, w, b, 1e-5)) <= self.tol * 10
                else ""
            )
        self.add("eval output (running statistics)", "pass" if ok else "fail", dev, why)
        rm2, rv2 = self.a.get(m, "running_mean"), self.a.get(m, "running_var")
        assert rm2 is not None and rv2 is not None
        moved = max(_dev(rm, rm2), _dev(rv, rv2))
        self.add(
            "eval leaves running statistics alone",
            "pass" if moved == 0 else "fail",
            moved,
            "" if moved == 0 else "eval mode still updates the running statistics",
        )

    def probe_grad_mode(self) -> None:
        # The same input from the same fresh state, with and without autograd: only the
        # training flag may decide, so outputs and statistics must agree.
        x = self.x(40)
        outs, stats = [], []
        for grad in (True, False):
            m = self.new()
            with torch.set_grad_enabled(grad):
                outs.append(m(x).detach())
            stats.append(self.a.get(m, "running_mean"))
        dev = _dev(outs[0], outs[1])
        stat_dev = 0.0 if stats[0] is None or stats[1] is None else _dev(stats[0], stats[1])
        if dev <= self.tol and stat_dev <= self.tol:
            self.add("train mode under no_grad (the training flag decides)", "pass", dev)
        else:
            self.add(
                "train mode under no_grad (the training flag decides)",
                "fail",
                max(dev, stat_dev),
                "switches between batch and running statistics on torch.is_grad_enabled() "
                "instead of the module's training flag: under torch.no_grad() a train-mode "
                "layer must still use batch statistics and update the running ones",
            )

    def probe_backward(self) -> None:
        name = "backward (true gradient)"
        if self.forward_form is None:
            self.add(
                name,
                "skipped",
                None,
                "the training forward matches no known closed form, "
                "so there is no reference gradient to compare with",
            )
            return
        m = self.new()
        x = self.x(50).requires_grad_()
        y = m(x)
        w, b = self.a.get(m, "weight"), self.a.get(m, "bias")
        g = torch.Generator().manual_seed(7)
        go = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
        if not y.requires_grad:
            self.add(name, "fail", None, "the output is not differentiable")
            return
        (gx,) = torch.autograd.grad(y, x, go)
        xr = x.detach().double().requires_grad_()
        # autograd of the closed form its forward matches (torch's own when it conforms)
        ref = closed_form(xr, w, b, 1e-5, **self.forward_form)
        (gref,) = torch.autograd.grad(ref, xr, go.double())
        dev = _dev(gx, gref)
        tol = self.tol * 100 * max(1.0, gref.abs().max().item())
        of = "" if not self.forward_form else " of its own (non-conforming) forward"
        if dev <= tol:
            self.add(name, "pass", dev, f"the true gradient{of}" if of else "")
        else:
            self.add(
                name,
                "fail",
                dev,
                f"the input gradient is not the true gradient{of}: a hand-written backward "
                "that drops the mean/variance terms, or detaches the statistics?",
            )


_MISTAKES = {
    "unbiased": "normalizes with the unbiased variance (output off by sqrt(n/(n-1))); torch "
    "normalizes with the biased one",
    "eps_outside": "eps added outside the square root: (x-mean)/(sqrt(var)+eps) instead of "
    "(x-mean)/sqrt(var+eps)",
    "per_element": "wrong reduction axes: statistics per element over the batch only (dim 0) "
    "instead of per channel over (N, *spatial)",
}


def _explain(
    y: Tensor, x: Tensor, w: Tensor | None, b: Tensor | None, eps: float, tol: float
) -> tuple[dict[str, Any], str] | None:
    """The smallest combination of classic mistakes whose closed form reproduces ``y``."""
    import itertools

    keys = list(_MISTAKES)
    for k in range(1, len(keys) + 1):
        for combo in itertools.combinations(keys, k):
            flags: dict[str, Any] = {
                "unbiased": "unbiased" in combo,
                "eps_outside": "eps_outside" in combo,
                "dims": (0,) if "per_element" in combo else None,
            }
            if _dev(y, closed_form(x, w, b, eps, **flags)) <= tol:
                return flags, "; ".join(_MISTAKES[c] for c in combo)
    if _dev(y, closed_form(x, None, None, eps)) <= tol:
        return {}, "the affine parameters (weight/bias) are not applied"
    return None


def conform(
    target: Callable[..., Any],
    *,
    momentum_convention: str = "auto",
    attrs: dict[str, str] | None = None,
    rank: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> ConformReport:
    """Probe a BatchNorm implementation against torch's semantics.

    Args:
        target: a class or factory; called as ``target(num_features, **kw)`` where ``kw`` has
            ``momentum``/``eps``/``num_dims`` when its signature takes them.
        momentum_convention: ``"torch"``, ``"keras"``, or ``"auto"`` (detected).
        attrs: names of the implementation's tensors when they are not guessable, e.g.
            ``{"running_mean": "mu_hat", "weight": "g"}``.
        rank: input rank to probe with (2 for BatchNorm1d-like, 4 default, 5 for 3d).
        dtype: float64 (default, tight tolerances) or float32 when it cannot run in float64.
    """
    if momentum_convention not in ("auto", "torch", "keras"):
        raise ValueError(
            f"momentum_convention must be auto, torch or keras, got {momentum_convention!r}"
        )
    if rank is not None and rank not in (2, 3, 4, 5):
        raise ValueError(f"rank must be 2, 3, 4 or 5, got {rank}")
    name = getattr(target, "__qualname__", repr(target))
    report = ConformReport(f"{getattr(target, '__module__', '?')}.{name}")
    conv = "torch" if momentum_convention == "auto" else momentum_convention
    report.momentum_convention = conv
    adapter = _Adapter(target, rank, attrs or {}, conv)
    try:
        probe_module = adapter.build()
    except Exception as exc:
        report.probes.append(
            Probe("construction", "fail", None, f"could not build it with {_C} channels: {exc}")
        )
        return report
    if rank is None:
        for r in (4, 2, 3, 5):
            try:
                probe_module.to(dtype).train()(_data(r, 0).to(dtype))
                adapter.rank = r
                break
            except Exception:
                continue
        else:
            report.probes.append(
                Probe(
                    "input rank",
                    "fail",
                    None,
                    "it runs on none of 2D..5D input with 4 channels; pass "
                    "rank= if it needs a specific one",
                )
            )
            return report
    else:
        try:
            probe_module.to(dtype).train()(_data(rank, 0).to(dtype))
        except Exception as exc:
            # a rank the layer refuses is a wrong argument, not a departure from torch
            raise ValueError(
                f"rank={rank}: {name} does not run on {rank}D input ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); leave rank out to find one "
                "it accepts"
            ) from exc
    checker = _Checker(adapter, report, dtype)
    try:
        checker.run()
    except Exception as exc:  # an implementation may fail on a probe's input
        report.probes.append(Probe("probing", "fail", None, f"{type(exc).__name__}: {exc}"))
    return report
