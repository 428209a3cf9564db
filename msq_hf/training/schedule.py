"""The MSQ bit-pruning decision (Algorithm 1 of MSQ; see docs/pruning.md).

This module is pure Python on purpose (it imports nothing from torch): it only sees numbers -- per
layer precision ``bits``, LSB count ``k``, weight count ``numel``, LSB nonzero rate and HAWQ-V2
sensitivity -- and decides which layers drop bits. The controller measures those numbers on the
model, calls :meth:`BitPruningSchedule.step` and writes the returned ``bits``/``k`` back into the
layers. Keeping the decision separate makes it unit-testable exhaustively and identical on every
rank (give it rank-reduced inputs and it returns the same answer everywhere).

Contract of one pruning step (``step(state, rates, sensitivities, global_step)``):

* ``state`` holds the bits/k/numel of every layer *as they are now* (before this step);
* ``rates[l]`` is the nonzero rate of the ``k_l`` LSBs of layer ``l`` at those bits;
* ``sensitivities[l]`` (optional) is HAWQ-V2 ``S_l`` measured at those same bits;
* the returned :class:`PruneDecision` carries the bits after this step and the ``k`` to regularize
  until the next step, computed from ``sensitivities`` (so ``k`` reacts to the Hessian one step
  late for the layers pruned now; call :meth:`BitPruningSchedule.assign_k` with fresh sensitivities
  if you want to remove that lag).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "BitPruningSchedule",
    "LayerState",
    "PruneDecision",
    "compression",
    "make_state",
]

STATE_VERSION = 1
PHASES = ("regularize", "final", "qat")
_SUPPORTED_BITS = (1, 8)  # same range as msq_hf.quant.functional.MIN_BITS..MAX_BITS (kept torch-free here)


def compression(bits: Mapping[str, int], numels: Mapping[str, int], count_sign_bit: bool = False) -> float:
    """Compression ratio ``C = 32 * sum_l N_l / sum_l b_l N_l`` (``b_l = bits_l`` or ``bits_l + 1``).

    Same formula as :func:`msq_hf.quant.functional.compression_ratio`, re-implemented here so that this
    module stays importable without torch.
    """
    if not bits:
        raise ValueError("compression needs at least one layer")
    extra = 1 if count_sign_bit else 0
    total = sum(int(numels[name]) for name in bits)
    stored = sum(int(numels[name]) * (int(b) + extra) for name, b in bits.items())
    if stored <= 0:
        raise ValueError(f"compression is undefined: the layers store {stored} bits (all numels zero?)")
    return 32.0 * total / stored


@dataclass(frozen=True)
class LayerState:
    """Pruning-relevant state of one quantized layer: precision, LSB count, number of weights."""

    bits: int
    k: int
    numel: int


def make_state(bits: Mapping[str, int], k: Mapping[str, int], numels: Mapping[str, int]) -> dict[str, LayerState]:
    """``{name: LayerState}`` from three ``{name: value}`` maps (keys of ``bits`` define the order)."""
    missing = [name for name in bits if name not in k or name not in numels]
    if missing:
        raise KeyError(f"make_state: layer(s) {missing[:5]} have bits but no k or numel")
    return {name: LayerState(int(bits[name]), int(k[name]), int(numels[name])) for name in bits}


@dataclass(frozen=True)
class PruneDecision:
    """What one pruning step decided.

    Attributes:
        bits: precision of every layer after this step.
        k: LSBs to regularize (and test for pruning) until the next step; 0 = not regularized.
        pruned: layers whose bits were lowered in this step, in the order they were pruned.
        phase: ``"regularize"`` (ordinary step), ``"final"`` (this step was the final round) or
            ``"qat"`` (already finalized; nothing changes any more).
        compression: compression ratio of ``bits``.
        finalized: True from the final round on (regularizer and pruning are off).
        reason: one human-readable sentence explaining the decision (for logs).
        step: the ``global_step`` the decision was taken at.
    """

    bits: dict[str, int]
    k: dict[str, int]
    pruned: list[str]
    phase: str
    compression: float
    finalized: bool
    reason: str
    step: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PruneDecision:
        """Inverse of :meth:`to_dict`."""
        return cls(
            bits={n: int(b) for n, b in d["bits"].items()},
            k={n: int(v) for n, v in d["k"].items()},
            pruned=list(d["pruned"]),
            phase=str(d["phase"]),
            compression=float(d["compression"]),
            finalized=bool(d["finalized"]),
            reason=str(d["reason"]),
            step=int(d.get("step", 0)),
        )


@dataclass
class _Memory:
    finalized: bool = False
    finalized_step: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


class BitPruningSchedule:
    """MSQ's pruning rule: threshold pruning, Hessian-guided ``k``, a final round and a forced fallback.

    Args:
        target_compression: stop once ``C = 32 sum N / sum b N`` reaches this (>= 1).
        prune_threshold: a layer whose LSB nonzero rate is below this drops its ``k`` LSBs (0 < tau < 1).
        min_bits: no layer goes below this precision (1..8).
        count_sign_bit: count ``bits + 1`` per weight in ``C`` (what a sign-magnitude file stores).
        final_round_fraction: once ``global_step >= final_round_fraction * total_steps`` and the target
            is not reached, a final round over all layers is forced (0 < f <= 1).
        total_steps: optimizer steps of the run; ``None`` disables the forced round. Assignable later
            through the :attr:`total_steps` attribute.
        default_k: ``k`` given to every layer when no sensitivities are available (1 or 2).
    """

    def __init__(
        self,
        target_compression: float,
        prune_threshold: float,
        min_bits: int = 1,
        count_sign_bit: bool = False,
        final_round_fraction: float = 0.7,
        total_steps: int | None = None,
        default_k: int = 1,
    ):
        if (
            isinstance(target_compression, bool)
            or not isinstance(target_compression, (int, float))
            or not math.isfinite(target_compression)
            or target_compression < 1
        ):
            raise ValueError(f"target_compression={target_compression!r} is invalid: expected a finite number >= 1")
        if (
            isinstance(prune_threshold, bool)
            or not isinstance(prune_threshold, (int, float))
            or not 0 < prune_threshold < 1
        ):
            raise ValueError(f"prune_threshold={prune_threshold!r} is invalid: expected a number in (0, 1)")
        lo, hi = _SUPPORTED_BITS
        if isinstance(min_bits, bool) or not isinstance(min_bits, int) or not lo <= min_bits <= hi:
            raise ValueError(f"min_bits={min_bits!r} is invalid: expected an integer in {lo}..{hi}")
        if (
            isinstance(final_round_fraction, bool)
            or not isinstance(final_round_fraction, (int, float))
            or not 0 < final_round_fraction <= 1
        ):
            raise ValueError(f"final_round_fraction={final_round_fraction!r} is invalid: expected a number in (0, 1]")
        if default_k not in (1, 2) or isinstance(default_k, bool):
            raise ValueError(f"default_k={default_k!r} is invalid: expected 1 or 2")
        self.target_compression = float(target_compression)
        self.prune_threshold = float(prune_threshold)
        self.min_bits = int(min_bits)
        self.count_sign_bit = bool(count_sign_bit)
        self.final_round_fraction = float(final_round_fraction)
        self.default_k = int(default_k)
        self.total_steps = total_steps
        self._mem = _Memory()

    # -- configuration ----------------------------------------------------------------------------
    @property
    def total_steps(self) -> int | None:
        """Optimizer steps of the run (``None``: unknown, no forced final round)."""
        return self._total_steps

    @total_steps.setter
    def total_steps(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"total_steps={value!r} is invalid: expected a positive integer or None")
        self._total_steps = value

    @property
    def finalized(self) -> bool:
        """True once the final round happened (every later :meth:`step` is a no-op)."""
        return self._mem.finalized

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every decision taken so far, as dicts (see :meth:`PruneDecision.to_dict`)."""
        return [dict(h) for h in self._mem.history]

    def forced_round_due(self, global_step: int) -> bool:
        """Whether ``global_step`` is at or past the forced-final-round cut-off."""
        return self._total_steps is not None and global_step >= self.final_round_fraction * self._total_steps

    def compression(self, bits: Mapping[str, int], numels: Mapping[str, int]) -> float:
        """:func:`compression` with this schedule's sign-bit accounting."""
        return compression(bits, numels, self.count_sign_bit)

    def _reached(self, bits: Mapping[str, int], numels: Mapping[str, int]) -> bool:
        # a tiny relative slack so that a target equal to an exactly representable ratio
        # (e.g. 16.0 with every layer at 2 bits) counts as reached despite float rounding
        return self.compression(bits, numels) >= self.target_compression * (1 - 1e-12)

    # -- checks -----------------------------------------------------------------------------------
    def check_reachable(self, numels: Mapping[str, int]) -> None:
        """Raise ``ValueError`` if even every layer at ``min_bits`` cannot reach the target compression."""
        if not numels:
            raise ValueError("check_reachable: no quantized layers (empty numels)")
        bad = [name for name, n in numels.items() if int(n) < 0]
        if bad:
            raise ValueError(f"check_reachable: layer(s) {bad[:5]} have a negative numel")
        best = self.compression({name: self.min_bits for name in numels}, numels)
        if not self._reached({name: self.min_bits for name in numels}, numels):
            sign = " (sign bit counted)" if self.count_sign_bit else ""
            raise ValueError(
                f"target_compression={self.target_compression:g} is unreachable: with every quantized layer at "
                f"min_bits={self.min_bits}{sign} the best achievable compression is {best:.4f}x; lower "
                f"target_compression or min_bits"
            )

    def _validate_state(self, state: Mapping[str, LayerState]) -> None:
        if not state:
            raise ValueError("the schedule needs at least one layer (state is empty)")
        lo, hi = _SUPPORTED_BITS
        for name, layer in state.items():
            if not isinstance(layer, LayerState):
                raise TypeError(f"state[{name!r}] must be a LayerState, got {type(layer).__name__}")
            if not max(lo, self.min_bits) <= layer.bits <= hi:
                raise ValueError(
                    f"layer {name!r} has bits={layer.bits}, outside {max(lo, self.min_bits)}..{hi} "
                    f"(min_bits={self.min_bits})"
                )
            if layer.k < 0 or (layer.k > 0 and layer.bits - layer.k < self.min_bits):
                raise ValueError(
                    f"layer {name!r} has k={layer.k} with bits={layer.bits}: expected 0 <= k <= "
                    f"bits - min_bits = {layer.bits - self.min_bits}"
                )
            if layer.numel < 0:
                raise ValueError(f"layer {name!r} has numel={layer.numel}: expected >= 0")

    # -- k assignment ---------------------------------------------------------------------------------
    def assign_k(self, bits: Mapping[str, int], sensitivities: Mapping[str, float] | None) -> dict[str, int]:
        """HAWQ-guided ``k`` per layer (MSQ §3.7).

        ``k = 1`` if ``S_l >= mean(S)`` (sensitive layers lose one bit at a time; equality counts as
        sensitive, with a 1e-9 relative tolerance so that all-equal sensitivities give ``k = 1``
        everywhere despite float rounding of the mean), else ``k = 2``. The mean is the unweighted
        mean over *all* layers in ``bits``. ``k`` is capped at ``bits - min_bits``, so a layer at
        ``min_bits`` gets ``k = 0`` (frozen, not regularized). Without sensitivities every layer gets
        ``default_k`` (capped the same way).
        """
        out: dict[str, int] = {}
        if sensitivities is None:
            for name, b in bits.items():
                out[name] = min(self.default_k, max(int(b) - self.min_bits, 0))
            return out
        missing = [name for name in bits if name not in sensitivities]
        if missing:
            raise KeyError(f"assign_k: no sensitivity for layer(s) {missing[:5]} (got {len(sensitivities)} values)")
        values = {name: float(sensitivities[name]) for name in bits}
        bad = [name for name, s in values.items() if not math.isfinite(s)]
        if bad:
            raise ValueError(
                f"assign_k: sensitivity of layer(s) {bad[:5]} is not finite "
                f"({[values[n] for n in bad[:5]]}); the Hessian pass diverged"
            )
        mean = math.fsum(values.values()) / len(values) if values else 0.0
        for name, b in bits.items():
            s = values[name]
            sensitive = s > mean or math.isclose(s, mean, rel_tol=1e-9, abs_tol=0.0)
            out[name] = min(1 if sensitive else 2, max(int(b) - self.min_bits, 0))
        return out

    # -- the step ---------------------------------------------------------------------------------
    def step(
        self,
        state: Mapping[str, LayerState],
        nonzero_rates: Mapping[str, float],
        sensitivities: Mapping[str, float] | None,
        global_step: int,
    ) -> PruneDecision:
        """Take one pruning decision (see the module docstring for the contract).

        Order of the rules: (1) already finalized -> no-op ``"qat"``; (2) target already met ->
        finalize without pruning; (3) at/after the forced-round cut-off -> forced final round over all
        layers; (4) if pruning every candidate (rate < threshold, ``k >= 1``, ``bits - k >= min_bits``)
        reaches the target -> final round, candidates by ascending rate (ties by name), stopping at
        the first crossing; (5) otherwise prune every candidate and reassign ``k``.
        """
        self._validate_state(state)
        bits = {name: layer.bits for name, layer in state.items()}
        numels = {name: layer.numel for name, layer in state.items()}
        global_step = int(global_step)

        if self._mem.finalized:
            return PruneDecision(
                bits=bits,
                k={name: 0 for name in state},
                pruned=[],
                phase="qat",
                compression=self.compression(bits, numels),
                finalized=True,
                reason=f"finalized at step {self._mem.finalized_step}; plain QAT",
                step=global_step,
            )

        if self._reached(bits, numels):
            return self._finalize(
                bits, numels, [], global_step, f"target {self.target_compression:g}x already met; no pruning needed"
            )

        missing = [name for name in state if name not in nonzero_rates]
        if missing:
            raise KeyError(f"step: no LSB nonzero rate for layer(s) {missing[:5]}")
        rates = {name: float(nonzero_rates[name]) for name in state}
        bad = [name for name, r in rates.items() if math.isnan(r)]
        if bad:
            raise ValueError(f"step: LSB nonzero rate of layer(s) {bad[:5]} is NaN")

        if self.forced_round_due(global_step):
            return self._forced_round(state, bits, numels, rates, global_step)

        candidates = [
            name
            for name, layer in state.items()
            if rates[name] < self.prune_threshold and layer.k >= 1 and layer.bits - layer.k >= self.min_bits
        ]
        after_all = dict(bits)
        for name in candidates:
            after_all[name] -= state[name].k
        if candidates and self._reached(after_all, numels):
            new_bits = dict(bits)
            pruned: list[str] = []
            for name in sorted(candidates, key=lambda n: (rates[n], n)):
                new_bits[name] -= state[name].k
                pruned.append(name)
                if self._reached(new_bits, numels):
                    break
            return self._finalize(
                new_bits,
                numels,
                pruned,
                global_step,
                f"final round: pruned {len(pruned)} of {len(candidates)} candidate(s) by ascending "
                f"nonzero rate until compression >= {self.target_compression:g}x",
            )

        new_k = self.assign_k(after_all, sensitivities)
        src = "sensitivities" if sensitivities is not None else f"default_k={self.default_k}"
        reason = (
            f"pruned {len(candidates)} layer(s) with nonzero rate < {self.prune_threshold:g}; k from {src}"
            if candidates
            else f"no layer below nonzero rate {self.prune_threshold:g}; k from {src}"
        )
        return self._record(
            PruneDecision(
                bits=after_all,
                k=new_k,
                pruned=list(candidates),
                phase="regularize",
                compression=self.compression(after_all, numels),
                finalized=False,
                reason=reason,
                step=global_step,
            )
        )

    def _forced_round(
        self,
        state: Mapping[str, LayerState],
        bits: dict[str, int],
        numels: dict[str, int],
        rates: dict[str, float],
        global_step: int,
    ) -> PruneDecision:
        # all layers that can still lose a bit, least-used LSBs first (threshold ignored)
        order = sorted((name for name in state if bits[name] > self.min_bits), key=lambda n: (rates[n], n))
        new_bits = dict(bits)
        pruned: list[str] = []
        first_pass = True
        reached = False
        while not reached:
            progressed = False
            for name in order:
                room = new_bits[name] - self.min_bits
                if room <= 0:
                    continue
                # first pass: the layer's own k (>= 1); later passes: one bit at a time
                drop = min(max(state[name].k, 1), room) if first_pass else 1
                new_bits[name] -= drop
                progressed = True
                if name not in pruned:
                    pruned.append(name)
                if self._reached(new_bits, numels):
                    reached = True
                    break
            first_pass = False
            if not progressed:
                break
        cutoff = f"step {global_step} >= {self.final_round_fraction:g} * total_steps={self._total_steps}"
        if reached:
            reason = f"forced final round ({cutoff}): pruned {len(pruned)} layer(s) by ascending nonzero rate"
        else:  # only possible if check_reachable was skipped
            reason = (
                f"forced final round ({cutoff}): every layer is at min_bits={self.min_bits} and the target "
                f"{self.target_compression:g}x is still not met"
            )
        return self._finalize(new_bits, numels, pruned, global_step, reason)

    def _finalize(
        self, bits: dict[str, int], numels: dict[str, int], pruned: list[str], global_step: int, reason: str
    ) -> PruneDecision:
        self._mem.finalized = True
        self._mem.finalized_step = global_step
        return self._record(
            PruneDecision(
                bits=bits,
                k={name: 0 for name in bits},
                pruned=pruned,
                phase="final",
                compression=self.compression(bits, numels),
                finalized=True,
                reason=reason,
                step=global_step,
            )
        )

    def _record(self, decision: PruneDecision) -> PruneDecision:
        self._mem.history.append(decision.to_dict())
        return decision

    # -- persistence ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (finalized flag, step, history and the hyperparameters for a sanity check)."""
        return {
            "version": STATE_VERSION,
            "finalized": self._mem.finalized,
            "finalized_step": self._mem.finalized_step,
            "history": self.history,
            "hyperparameters": self._hyperparameters(),
        }

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output. Warns if the stored hyperparameters differ from this schedule's."""
        version = d.get("version")
        if version != STATE_VERSION:
            raise ValueError(
                f"BitPruningSchedule state version {version!r} is not supported (expected {STATE_VERSION})"
            )
        stored = d.get("hyperparameters", {})
        changed = {
            key: (stored[key], value)
            for key, value in self._hyperparameters().items()
            if key in stored and stored[key] != value
        }
        if changed:
            warnings.warn(
                "BitPruningSchedule: resuming with changed hyperparameter(s) "
                + ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items()),
                stacklevel=2,
            )
        step = d.get("finalized_step")
        self._mem = _Memory(
            finalized=bool(d["finalized"]),
            finalized_step=None if step is None else int(step),
            history=[dict(h) for h in d.get("history", [])],
        )

    def _hyperparameters(self) -> dict[str, Any]:
        return {
            "target_compression": self.target_compression,
            "prune_threshold": self.prune_threshold,
            "min_bits": self.min_bits,
            "count_sign_bit": self.count_sign_bit,
            "final_round_fraction": self.final_round_fraction,
            "default_k": self.default_k,
        }

    def __repr__(self) -> str:
        return (
            f"BitPruningSchedule(target_compression={self.target_compression:g}, "
            f"prune_threshold={self.prune_threshold:g}, min_bits={self.min_bits}, "
            f"count_sign_bit={self.count_sign_bit}, final_round_fraction={self.final_round_fraction:g}, "
            f"total_steps={self._total_steps}, finalized={self.finalized})"
        )
