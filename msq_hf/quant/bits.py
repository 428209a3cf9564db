"""The supported bit widths, declared once, and the one check against them (pure Python, no torch).

:class:`msq_hf.MSQConfig`'s declarations (:mod:`msq_hf.params`), the layers, the packing codec and the
baselines validate against these through :func:`check_bits`. :mod:`msq_hf.quant.functional` re-exports them.
Keeping them out of the tensor math lets ``msq-hf train --help`` build its flags without importing torch.
"""

from __future__ import annotations

import operator

# Activations: no 1-bit quantizer (PACT/LSQ need 2+ levels).
MIN_BITS = 1
MAX_BITS = 8
MIN_ACT_BITS = 2
MAX_ACT_BITS = 8


def check_bits(bits: int, what: str = "bits", lo: int = MIN_BITS, hi: int = MAX_BITS) -> int:
    """The one bit-width check: ``bits`` as a Python int, or ``ValueError`` naming ``what`` and the range.

    Accepts ints and integer scalars (numpy, 0-d integer tensors: anything with ``__index__``); rejects
    bools, floats and strings.
    """
    try:
        value = None if isinstance(bits, bool) else operator.index(bits)
    except TypeError:
        value = None
    if value is None or not lo <= value <= hi:
        raise ValueError(f"{what}={bits!r} is invalid: expected an integer in {lo}..{hi}")
    return value


__all__ = ["MAX_ACT_BITS", "MAX_BITS", "MIN_ACT_BITS", "MIN_BITS", "check_bits"]
