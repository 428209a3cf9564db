"""Faithful re-implementations of the methods MSQ is compared with (benchmarks only).

* :mod:`~msq_hf.baselines.bsq` -- BSQ (Yang et al., ICLR 2021): STE-trained bit planes, bit-level
  group Lasso, periodic re-quantization and bit-plane pruning.
* :mod:`~msq_hf.baselines.csq` -- CSQ (Xiao et al., DAC 2023): sigmoid-relaxed bits and bit masks
  with a temperature schedule and a budget-aware regularizer.
* :mod:`~msq_hf.baselines.dorefa` -- uniform DoReFa weights + optional PACT activations.
* :mod:`~msq_hf.baselines.lsq` -- uniform LSQ weights (learnable step, Esser et al. 2020) + optional PACT
  activations.

Every module exposes the same interface: ``convert(model, init_bits=8, **options)``,
``regularization(model)``, ``bit_scheme(model)``, ``compression_ratio(model)`` and
``trainable_parameters(model)``, plus the schedule hooks of its method. The MSQ code path never
imports this package.
"""

from __future__ import annotations

from msq_hf.baselines import bsq, csq, dorefa, lsq
from msq_hf.baselines.common import PACT, trainable_parameters

#: method name -> module, for benchmarks that loop over methods
METHODS = {"bsq": bsq, "csq": csq, "dorefa": dorefa, "lsq": lsq}

__all__ = ["METHODS", "PACT", "bsq", "csq", "dorefa", "lsq", "trainable_parameters"]
