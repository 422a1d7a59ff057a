"""Every test under tests/torch_suite runs on every backend present, as tests/nn does: the
plain path and the C++ fast path."""

from tests.nn.conftest import backend  # noqa: F401 - the autouse fixture, shared
