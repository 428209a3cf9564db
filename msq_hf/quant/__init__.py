"""Pure math of MSQ: RoundClamp codes, LSBs, compression accounting, fused kernels and the bit-packing codec.

Nothing here knows about modules, models or frameworks; everything above builds on it.
"""
