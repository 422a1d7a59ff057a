"""The probes: one method per property of torch's semantics, each comparing the
implementation with a float64 reference (:mod:`bnkit.testing`, or bnkit's functional in
float64) and recording a :class:`~.report.Probe` under its id."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bnkit.nn import functional as F
from bnkit.testing import reference_eval, reference_train
from bnkit.tools.conform.adapter import Adapter, C
from bnkit.tools.conform.mistakes import deviation, explain
from bnkit.tools.conform.report import PROBES, ConformReport, Probe

__all__ = ["Checker", "probe_data"]

# Tolerances, as multiples of the dtype's base tolerance (1e-9 in float64, 2e-4 in float32)
OUTPUT_TOL = 10  # an output or a running statistic
CUMULATIVE_TOL = 50  # an average over three batches
BACKWARD_TOL = 100  # a gradient, relative to its largest value
GRAD_MODE_TOL = 1  # the same computation with and without autograd


def probe_data(rank: int, seed: int, n: int = 6) -> Tensor:
    """Non-zero-mean data with one low-variance channel (where eps placement shows)."""
    g = torch.Generator().manual_seed(seed)
    spatial = {2: (), 3: (5,), 4: (3, 3), 5: (2, 2, 2)}[rank]
    x = torch.randn(n, C, *spatial, generator=g, dtype=torch.float64)
    scale = torch.tensor([2.0, 0.5, 3.0, 0.01], dtype=torch.float64)
    offset = torch.tensor([3.0, -1.0, 5.0, 2.0], dtype=torch.float64)
    shape = [1, -1] + [1] * (rank - 2)  # no tensor yet to ask F.channel_shape
    return x * scale.view(shape) + offset.view(shape)


class Checker:
    def __init__(self, adapter: Adapter, report: ConformReport, dtype: torch.dtype) -> None:
        self.a = adapter
        self.r = report
        self.dtype = dtype
        self.tol = 1e-9 if dtype == torch.float64 else 2e-4
        self.rank = adapter.rank or 4
        # the closed form its training forward matches (torch's, or a named mistake)
        self.forward_form: dict[str, Any] | None = None

    def add(self, pid: str, status: str, dev: float | None = None, why: str = "") -> None:
        self.r.probes.append(Probe(pid, PROBES[pid], status, dev, why))

    def new(self, momentum: float | None = 0.1, eps: float = 1e-5) -> nn.Module:
        m = self.a.build(momentum, eps=eps).to(self.dtype)
        m.train()
        g = torch.Generator().manual_seed(1)
        self.a.set(m, "weight", torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
        self.a.set(m, "bias", torch.randn(C, generator=g, dtype=torch.float64))
        return m

    def x(self, seed: int, n: int = 6) -> Tensor:
        return probe_data(self.rank, seed, n).to(self.dtype)

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
                "init",
                "skipped",
                None,
                "running mean/var not found: name them with attrs={'running_mean': ...}",
            )
            return
        dm, dv = rm0.abs().max().item(), (rv0 - 1).abs().max().item()
        if dm == 0 and dv == 0:
            self.add("init", "pass", 0.0)
        elif bool((rv0 == 0).all()):
            self.add(
                "init",
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
            self.add("init", "fail", max(dm, dv), "; ".join(why))

    def probe_train_output(self) -> None:
        m = self.new(eps=1e-5)
        x = self.x(2)
        w, b = self.a.get(m, "weight"), self.a.get(m, "bias")
        y = m(x)
        ref = reference_train(x, w, b, 1e-5)[0]
        dev = deviation(y, ref)
        if dev <= self.tol * OUTPUT_TOL:
            self.forward_form = {}
            self.add("train_output", "pass", dev)
            return
        match = explain(y, x, w, b, 1e-5, self.tol * OUTPUT_TOL)
        if match is not None:
            flags, why = match
            self.forward_form = flags
            self.add("train_output", "fail", dev, why)
        else:
            self.add(
                "train_output",
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
            for pid in ("momentum_convention", "running_var_unbiased"):
                self.add(pid, "skipped", None, "running mean/var not found")
            return
        x = xs[0].double()
        dims = (0, *range(2, x.dim()))
        mean, var_u, var_b = x.mean(dims), x.var(dims, unbiased=True), x.var(dims, unbiased=False)
        f = 0.1
        expect_m, expect_v = f * mean, (1 - f) + f * var_u
        dm, dv = deviation(rm, expect_m), deviation(rv, expect_v)
        tol = self.tol * OUTPUT_TOL * max(1.0, float(var_u.max()))
        # Keras-style momentum: weight f on the *old* value
        keras_m = (1 - f) * mean
        if dm > tol and deviation(rm, keras_m) <= tol:
            self.r.momentum_convention = "keras"
            self.a.convention = "keras" if self.a.convention == "torch" else "torch"
            self.add(
                "momentum_convention",
                "fail",
                dm,
                "momentum weights the old value (Keras/TF style: m*old + (1-m)*new); torch "
                "weights the new batch. Checking the rest with momentum converted (1 - m)",
            )
            m, xs = self._step_stats(0.1, 1)
            rm, rv = self.a.get(m, "running_mean"), self.a.get(m, "running_var")
            assert rm is not None and rv is not None
            dm, dv = deviation(rm, expect_m), deviation(rv, expect_v)
        elif dm > tol:
            self.add(
                "momentum_convention",
                "fail",
                dm,
                "running_mean is not (1-momentum)*old + momentum*batch_mean in either convention",
            )
        else:
            self.add("momentum_convention", "pass", dm)
        if rm is not None and rv is not None and dv > tol:
            if deviation(rv, (1 - f) + f * var_b) <= tol:
                why = "stores the biased batch variance in running_var (torch stores unbiased)"
            else:
                why = "running_var is not (1-momentum)*old + momentum*unbiased_batch_var"
            self.add("running_var_unbiased", "fail", dv, why)
        else:
            self.add("running_var_unbiased", "pass", dv)

    def probe_counter(self) -> None:
        m, _ = self._step_stats(0.1, 3)
        nbt = self.a.get(m, "num_batches_tracked")
        if nbt is None:
            self.add(
                "counter",
                "skipped",
                None,
                "no num_batches_tracked attribute (name it with attrs= if it exists)",
            )
            return
        ok = int(nbt) == 3
        self.add(
            "counter",
            "pass" if ok else "fail",
            abs(int(nbt) - 3),
            "" if ok else f"counts {int(nbt)} after 3 training batches",
        )

    def probe_cumulative(self) -> None:
        try:
            m, xs = self._step_stats(None, 3)
        except (TypeError, ValueError) as exc:
            self.add(
                "cumulative",
                "skipped",
                None,
                f"cannot be built or run with momentum=None ({exc})",
            )
            return
        rm = self.a.get(m, "running_mean")
        if rm is None:
            self.add("cumulative", "skipped", None, "running mean not found")
            return
        dims = (0, *range(2, self.rank))
        expect = torch.stack([x.double().mean(dims) for x in xs]).mean(0)
        dev = deviation(rm, expect)
        ok = dev <= self.tol * CUMULATIVE_TOL
        self.add(
            "cumulative",
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
            self.add("eval_output", "skipped", None, "running stats not found")
            return
        m.eval()
        x = self.x(30)
        w, b = self.a.get(m, "weight"), self.a.get(m, "bias")
        y = m(x)  # with grad enabled, as in a validation loop without no_grad
        dev = deviation(y, reference_eval(x, rm, rv, w, b, 1e-5))
        if (
            dev > self.tol * OUTPUT_TOL
            and self.forward_form
            and self.forward_form.get("eps_outside")
        ):
            # judge eval by its own (already reported) eps placement
            shape = F.channel_shape(x)
            own = (x.double() - rm.double().view(shape)) / (rv.double().view(shape).sqrt() + 1e-5)
            own = own * (1 if w is None else w.double().view(shape))
            own = own + (0 if b is None else b.double().view(shape))
            dev = deviation(y, own)
        ok = dev <= self.tol * OUTPUT_TOL
        why = ""
        if not ok:
            why = "eval mode does not normalize with the running statistics" + (
                " (it uses the batch's)"
                if deviation(y, reference_train(x, w, b, 1e-5)[0]) <= self.tol * OUTPUT_TOL
                else ""
            )
        self.add("eval_output", "pass" if ok else "fail", dev, why)
        rm2, rv2 = self.a.get(m, "running_mean"), self.a.get(m, "running_var")
        assert rm2 is not None and rv2 is not None
        moved = max(deviation(rm, rm2), deviation(rv, rv2))
        self.add(
            "eval_no_update",
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
        dev = deviation(outs[0], outs[1])
        stat_dev = 0.0 if stats[0] is None or stats[1] is None else deviation(stats[0], stats[1])
        if dev <= self.tol * GRAD_MODE_TOL and stat_dev <= self.tol * GRAD_MODE_TOL:
            self.add("grad_mode", "pass", dev)
        else:
            self.add(
                "grad_mode",
                "fail",
                max(dev, stat_dev),
                "switches between batch and running statistics on torch.is_grad_enabled() "
                "instead of the module's training flag: under torch.no_grad() a train-mode "
                "layer must still use batch statistics and update the running ones",
            )

    def probe_backward(self) -> None:
        name = "backward"
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
        ref = reference_train(xr, w, b, 1e-5, **self.forward_form)[0]
        (gref,) = torch.autograd.grad(ref, xr, go.double())
        dev = deviation(gx, gref)
        tol = self.tol * BACKWARD_TOL * max(1.0, gref.abs().max().item())
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
