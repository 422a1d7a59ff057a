"""The training loop's thread policy (bnkit.lab.train.threads_for)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from bnkit.lab.train import SMALL_STEP, threads_for


@pytest.fixture
def two_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_small_steps_run_on_one_thread_and_restore(two_threads: None) -> None:
    with threads_for(SMALL_STEP - 1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_large_steps_keep_the_threads(two_threads: None) -> None:
    with threads_for(SMALL_STEP) as n:
        assert n == 2 and torch.get_num_threads() == 2


def test_a_users_choice_is_kept(two_threads: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    with threads_for(10) as n:
        assert n == 2 and torch.get_num_threads() == 2


def test_restored_after_an_error(two_threads: None) -> None:
    with pytest.raises(KeyError), threads_for(10):
        raise KeyError
    assert torch.get_num_threads() == 2
