"""Every test under tests/nn runs on every backend present: the plain path and the C++
fast path (skipped where it cannot be built, e.g. no compiler)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bnkit.nn import _kernels


@pytest.fixture(params=["plain", "cpp"], autouse=True)
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    before = _kernels.backend()
    if request.param == "cpp":
        _kernels.set_backend("auto")
        if not _kernels.available():
            pytest.skip("the C++ fast path is not available here")
    _kernels.set_backend(request.param)
    yield request.param
    _kernels.set_backend(before)
