"""Deprecated name of :mod:`bnkit.tools.checkpoints` (it shadowed the standard library's
``inspect`` inside the package)."""

import warnings

from bnkit.tools.checkpoints import *  # noqa: F403
from bnkit.tools.checkpoints import __all__ as __all__

warnings.warn(
    "bnkit.tools.inspect is now bnkit.tools.checkpoints", DeprecationWarning, stacklevel=2
)
