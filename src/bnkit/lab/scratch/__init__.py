"""Typical from-scratch BatchNorms, each with classic mistakes, for the conformance checker.

Run ``bnkit conform bnkit.lab.scratch.d2l:BatchNorm`` (or any other below) to see the
checker name them. They are written the way people write them, on purpose.
"""

EXAMPLES = {
    "d2l": ("bnkit.lab.scratch.d2l", "BatchNorm"),
    "keras_momentum": ("bnkit.lab.scratch.keras_momentum", "KerasStyleBatchNorm"),
    "per_element": ("bnkit.lab.scratch.per_element", "PerElementBatchNorm2d"),
    "bad_backward": ("bnkit.lab.scratch.bad_backward", "BadBackwardBatchNorm"),
}
