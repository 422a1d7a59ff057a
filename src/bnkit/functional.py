"""``bnkit.functional``: the functional forms and the math, the same names as
:mod:`bnkit.nn.functional` (one namespace, two spellings)."""

from bnkit.nn.functional import *  # noqa: F403
from bnkit.nn.functional import __all__ as __all__
