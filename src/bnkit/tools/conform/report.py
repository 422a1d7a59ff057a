"""What ``conform`` reports: one :class:`Probe` per property, gathered in a
:class:`ConformReport`. Tests and tools key on :attr:`Probe.id` (stable); ``name`` and
``diagnosis`` are for people and may be reworded."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

__all__ = ["PROBES", "ConformReport", "Probe"]

# id -> what the probe checks (the display name)
PROBES: dict[str, str] = {
    "init": "initial running statistics",
    "train_output": "training output (batch statistics, biased variance)",
    "momentum_convention": "momentum convention",
    "running_var_unbiased": "running variance (unbiased)",
    "counter": "num_batches_tracked counted",
    "cumulative": "momentum=None is a cumulative average",
    "eval_output": "eval output (running statistics)",
    "eval_no_update": "eval leaves running statistics alone",
    "grad_mode": "train mode under no_grad (the training flag decides)",
    "backward": "backward (true gradient)",
}
# what stops the probing before any property is checked
SETUP = {"construction": "construction", "input_rank": "input rank", "probing": "probing"}


@dataclass
class Probe:
    """One property: status is "pass", "fail" or "skipped"."""

    id: str
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

    def by_id(self) -> dict[str, Probe]:
        """The probes keyed by their stable id (see :data:`PROBES`)."""
        return {p.id: p for p in self.probes}
