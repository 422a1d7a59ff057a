"""The report's timing is honest by construction: configurations timed in turn, so a
slow phase of the machine falls on all of them (checked with a fake clock)."""

from __future__ import annotations

import statistics

import pytest

from bnkit.lab.timing import compare, interleaved_times


class _FakeMachine:
    """A clock, and steps that advance it: 1.0 per step, 5.0 more while a background
    load runs (fake time 20..90)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[str] = []

    def clock(self) -> float:
        return self.now

    def step(self, name: str, cost: float = 1.0):
        def run() -> None:
            self.calls.append(name)
            self.now += cost + (5.0 if 20.0 <= self.now < 90.0 else 0.0)

        return run


def test_a_load_during_part_of_the_run_does_not_bias_one_configuration() -> None:
    m = _FakeMachine()
    times = interleaved_times(
        {"bnkit": m.step("bnkit"), "torch": m.step("torch")}, repeats=20, warmup=1, clock=m.clock
    )
    assert len(times["bnkit"]) == len(times["torch"]) == 20
    assert statistics.median(times["bnkit"]) == statistics.median(times["torch"]) == 1.0
    # both saw the load (the median of each is still its own cost)
    hit = [sum(t > 1 for t in times[k]) for k in ("bnkit", "torch")]
    assert min(hit) > 0, hit
    # what a sequential measurement (all of one, then the other) would have reported
    m2 = _FakeMachine()
    seq = {}
    for name in ("bnkit", "torch"):
        run = m2.step(name)
        samples = []
        for _ in range(20):
            t0 = m2.clock()
            run()
            samples.append(m2.clock() - t0)
        seq[name] = statistics.mean(samples)
    # one of them ate the whole load: a 4x "difference" between equal steps
    assert max(seq.values()) > 2 * min(seq.values()), seq


def test_order_alternates_and_each_timed_call_follows_an_untimed_one() -> None:
    m = _FakeMachine()
    interleaved_times({"a": m.step("a"), "b": m.step("b")}, repeats=2, warmup=0, clock=m.clock)
    assert m.calls == ["a", "a", "b", "b", "b", "b", "a", "a"]


def test_real_costs_are_told_apart() -> None:
    m = _FakeMachine()
    times = interleaved_times(
        {"slow": m.step("slow", 3.0), "fast": m.step("fast", 1.0)}, repeats=9, clock=m.clock
    )
    assert statistics.median(times["slow"]) == 3.0 and statistics.median(times["fast"]) == 1.0


def test_before_replaces_the_untimed_call() -> None:
    m = _FakeMachine()
    times = interleaved_times(
        {"a": m.step("a"), "b": m.step("b", 2.0)},
        repeats=2,
        warmup=0,
        clock=m.clock,
        before=lambda: m.calls.append("evict"),
    )
    assert m.calls == ["evict", "a", "evict", "b", "evict", "b", "evict", "a"]
    assert times == {"a": [1.0, 1.0], "b": [2.0, 2.0]}


def test_compare_rows_warm_and_cold() -> None:
    """Both protocols give a row per case with times, ratios and errors against float64;
    eval rows carry the copy's bandwidth."""
    for cold in (False, True):
        rows = compare([(4, 3, 5, 5)], repeats=1, formats=("contiguous",), cold=cold)
        assert [r["case"] for r in rows] == ["train fwd", "train fwd+bwd", "eval fwd"]
        for r in rows:
            assert r["torch_ms"] > 0 and r["bnkit_ms"] > 0
            assert r["ratio"] == pytest.approx(r["bnkit_ms"] / r["torch_ms"])
            assert r["bnkit_err"] < 1e-5 and r["torch_err"] < 1e-5
            assert (r["copy_GBps"] is not None) == (r["case"] == "eval fwd")
