"""``MSQController``: the training-loop side of MSQ (Algorithm 1), free of any trainer framework.

For one model it finds the MSQ layers, sums their LSB terms in the regularizer (:class:`~.regularizer.LSBRegularizer`),
and every ``config.prune_interval`` optimizer steps measures LSB nonzero rates and Hessian sensitivities (reduced
across ranks, so every process decides alike), asks the :class:`~.schedule.BitPruningSchedule` what to prune and
writes the new ``bits``/``k`` into the layers. The :class:`~.pacing.Pacer` holds the warm-up, the planned trajectory
and the lambda feedback. After the final round every ``k`` is 0 and training continues as plain QAT. It works in a
hand-written loop (docs/training.md) and is what :class:`msq_hf.MSQTrainer` drives from its callback.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from msq_hf.config import MSQConfig
from msq_hf.convert import msq_layers
from msq_hf.integrations.guard import mark_driven
from msq_hf.quant.functional import average_bits, compression_ratio
from msq_hf.training.allocation import pull_weights
from msq_hf.training.clipping import fit_clipped_scales, fit_final_scales
from msq_hf.training.log_metrics import msq_metrics
from msq_hf.training.measure import (
    Batch,
    LossFn,
    TraceReuse,
    check_finite_weights,
    fp32_default_loss,
    hutchinson_seed,
    layer_sensitivities,
    recalibrate_batchnorm,
)
from msq_hf.training.pacing import Pacer, PruningPlan, last_measurement, pruning_share, pull_limit, rate_change
from msq_hf.training.regularizer import LSBRegularizer
from msq_hf.training.rewind import WeightSnapshot, rewind
from msq_hf.training.schedule import BitPruningSchedule, PruneDecision, make_state
from msq_hf.training.sensitivity import reduce_across_ranks

logger = logging.getLogger(__name__)

STATE_VERSION = 2  # 2: lambda feedback, plan and averaged sensitivities (version 1 states still load)


class MSQController:
    """Pruning state and regularizer of one MSQ model, usable from any training loop.

    Args:
        model: a model converted by :func:`msq_hf.quantize_model` (the unwrapped module, not DDP).
        config: MSQ hyperparameters; defaults to ``model.msq_config``.
        total_steps: optimizer steps of the run (for the warm-up, the planned trajectory and the forced final
            round); can be set later through :attr:`total_steps`.
        seed: base seed of the Hutchinson probes (a pruning step at ``global_step`` uses a seed derived
            from ``(seed, global_step)`` only).
        loss_fn: ``loss_fn(model, batch) -> loss`` for the Hessian pass; default
            :func:`msq_hf.training.measure.default_loss` (through the fp32 forward under mixed precision).

    Typical loop (``maybe_step`` starts MSQ itself once the warm-up is over)::

        ctl = MSQController(model, total_steps=num_steps)
        for step, batch in enumerate(loader, start=1):
            loss = task_loss(model, batch) + ctl.regularization()
            loss.backward(); optimizer.step(); optimizer.zero_grad()
            ctl.learning_rate = optimizer.param_groups[0]["lr"]  # bounds lambda's pull
            ctl.maybe_step(step, batch)                # every config.prune_interval steps
    """

    def __init__(
        self,
        model: nn.Module,
        config: MSQConfig | None = None,
        total_steps: int | None = None,
        *,
        seed: int = 0,
        loss_fn: LossFn | None = None,
    ):
        config = config if config is not None else getattr(model, "msq_config", None)
        if config is None:
            raise ValueError(
                f"{type(model).__name__} has no msq_config; pass config=MSQConfig(...) or convert the "
                "model with msq_hf.quantize_model(model, config)"
            )
        if not isinstance(config, MSQConfig):
            raise TypeError(f"config must be an msq_hf.MSQConfig, got {type(config).__name__}")
        self.model = model
        self.config = config
        self.layers = msq_layers(model)
        mark_driven(model)  # MSQ is driven: no "trained without MSQ" warning (msq_hf.integrations.guard)
        self.names = list(self.layers)
        self.numels = {name: int(layer.weight.numel()) for name, layer in self.layers.items()}
        self.seed = int(seed)
        self.loss_fn = loss_fn
        self._history: list[dict[str, Any]] = []
        self._started = self._finalized = False
        self._last_rates: dict[str, float] = {}
        self._last_sens: dict[str, float] = {}
        self.traces = TraceReuse(config.hessian_interval)  # Hutchinson traces kept between Hessian passes
        self.measure_seconds = 0.0  # wall time spent measuring (nonzero rates, Hessian passes) in this process
        self.learning_rate: float | None = None  # the optimizer's, set by the trainer: bounds lambda (pull_limit)
        self.regularizer = LSBRegularizer(self.layers)  # its weights: each layer's share of lambda (lsb_pull)
        self._pacer = Pacer.from_config(config)
        self._schedule = BitPruningSchedule.from_config(config)
        self.total_steps = total_steps
        # rewind_weights: the weights the final round goes back to (msq_hf.training.rewind), on the CPU
        self.snapshot: WeightSnapshot | None = WeightSnapshot.take(model) if config.rewind_weights else None
        self.clip_ratios: dict[str, float] = {}  # qat_scale="mse": each layer's last c of its scale S = c max|W|

    # -- read-only views --------------------------------------------------------------------------
    @property
    def total_steps(self) -> int | None:
        """Optimizer steps of the whole run (``None``: unknown, no forced final round)."""
        return self._total_steps

    @total_steps.setter
    def total_steps(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or int(value) < 1):
            raise ValueError(f"total_steps={value!r} is invalid: expected a positive integer or None")
        self._total_steps = None if value is None else int(value)
        self._schedule.total_steps = self._total_steps

    @property
    def started(self) -> bool:
        """True once :meth:`start` assigned the initial ``k`` (or a state was loaded)."""
        return self._started

    @property
    def finalized(self) -> bool:
        """True after the final pruning round: no regularizer, no more pruning (plain QAT)."""
        return self._finalized

    @property
    def phase(self) -> str:
        """``"regularize"`` (LSB regularizer + pruning) or ``"qat"`` (after the final round)."""
        return "qat" if self._finalized else "regularize"

    @property
    def bits(self) -> dict[str, int]:
        """Current precision per layer."""
        return {name: layer.n_bits for name, layer in self.layers.items()}

    @property
    def ks(self) -> dict[str, int]:
        """Current ``k`` (LSBs targeted by the next pruning step) per layer."""
        return {name: layer.n_k for name, layer in self.layers.items()}

    @property
    def compression(self) -> float:
        """``32 * sum N_l / sum b_l N_l`` of the current bits (sign bit counted per the config)."""
        numels, bits = [self.numels[n] for n in self.names], [self.layers[n].n_bits for n in self.names]
        return float(compression_ratio(numels, bits, self.config.count_sign_bit))

    @property
    def avg_bits(self) -> float:
        """Parameter-weighted mean magnitude bits."""
        return average_bits([self.numels[n] for n in self.names], [self.layers[n].n_bits for n in self.names])[0]

    @property
    def history(self) -> list[dict[str, Any]]:
        """One entry per pruning step and the start (bits, k, rates, sensitivities, pruned, forced, lambda, plan...)."""
        return [dict(entry) for entry in self._history]

    @property
    def last_regularization(self) -> float:
        """Value of the last :meth:`regularization` term (already multiplied by lambda)."""
        return float(self.regularizer.last)

    @property
    def reg_strength(self) -> float:
        """The lambda in use now (``config.reg_strength`` times the pacing feedback's multiplier)."""
        return self._pacer.strength

    @property
    def plan(self) -> PruningPlan | None:
        """The planned average-bits trajectory (``None`` before :meth:`start` or without ``total_steps``)."""
        return self._pacer.plan

    @property
    def warmup_step(self) -> int:
        """Optimizer steps before the start (``warmup_fraction * total_steps``; 0 if the length is unknown)."""
        return self._pacer.warmup_step(self._total_steps)

    @property
    def regularizing(self) -> bool:
        """Whether the regularizer is on (started, not finalized, lambda > 0, some layer with k > 0)."""
        active = self._started and not self._finalized and self.reg_strength > 0
        return active and any(layer.n_k > 0 for layer in self.layers.values())

    def pruning_share(self) -> dict[str, float]:
        """Bits removed by threshold pruning vs the forced round (:func:`msq_hf.training.pacing.pruning_share`)."""
        return pruning_share(self._history, self.numels)

    # -- the regularizer ------------------------------------------------------------------------
    def regularization(self) -> torch.Tensor:
        """``lambda * sum_l R_l`` of the last training forward (MSQ Eq. 8) to add to the loss: the layers' fused terms,
        summed and cleared (``LSBRegularizer``); a 0-dim zero without gradient in eval mode, under ``no_grad``, after
        the final round, at lambda = 0 or with ``lsb_update="proximal"`` (:attr:`last_regularization` logs it)."""
        reg = self.regularizer.collect(0.0 if self._finalized else self.reg_strength)
        return torch.zeros_like(reg.detach()) if self.proximal else reg  # proximal: the value is only logged

    @property
    def proximal(self) -> bool:
        """True with ``lsb_update="proximal"``: :meth:`proximal_step` pulls, :meth:`regularization` is zero."""
        return self.config.lsb_update == "proximal"

    def proximal_step(self, learning_rate: float) -> None:
        """Call after each optimizer step at ``learning_rate``: with ``lsb_update="proximal"``, the LSB pull
        (:meth:`LSBRegularizer.proximal_step` at ``learning_rate * lambda``) while MSQ regularizes; else nothing."""
        if self.proximal and self._started and not self._finalized:
            self.regularizer.proximal_step(float(learning_rate) * self.reg_strength)

    # -- measurements ---------------------------------------------------------------------------
    def nonzero_rates(self) -> dict[str, float]:
        """LSB nonzero rate of each layer for its current ``k`` (0.0 for layers with ``k = 0``)."""
        with torch.no_grad():
            return {name: float(layer.lsb_nonzero_rate()) for name, layer in self.layers.items()}

    def sensitivities(self, batch: Batch, global_step: int = 0, loss_fn: LossFn | None = None) -> dict[str, float]:
        """HAWQ-V2 sensitivity of every layer (MSQ Eq. 9) on ``hessian_batch_size`` samples of ``batch`` (probes seeded
        by ``hutchinson_seed(seed, global_step)``; not reduced across ranks, see :meth:`maybe_step`)."""
        loss_fn = loss_fn or self.loss_fn or fp32_default_loss
        seed = hutchinson_seed(self.seed, global_step)
        return layer_sensitivities(self.model, self.layers, batch, self.config, seed, loss_fn)[0]

    def _measure(
        self, batch: Batch | None, global_step: int, loss_fn: LossFn | None
    ) -> tuple[dict[str, float], dict[str, float] | None]:
        check_finite_weights(self.layers, global_step)  # NaN weights have rate 0: never prune on them
        started, sens = time.perf_counter(), None
        rates = reduce_across_ranks(self.nonzero_rates())
        if self.config.hessian_guided:
            if batch is None:
                msg = "hessian_guided=True needs a batch for the sensitivity pass; pass batch=... (or set "
                raise ValueError(msg + "MSQConfig.hessian_guided=False)")
            seed, loss_fn = hutchinson_seed(self.seed, global_step), loss_fn or self.loss_fn or fp32_default_loss
            # the Hessian every config.hessian_interval-th pass, else its last traces with the current ||Q(W) - W||
            sens = self.traces.sensitivities(self.model, self.layers, batch, self.config, seed, loss_fn)
            sens = reduce_across_ranks(sens)
            sens = self._pacer.smooth(sens)  # the moving average steadies k (config.hessian_ema)
        self.measure_seconds += time.perf_counter() - started  # host time of rates + Hessian passes
        return rates, sens

    # -- pruning ----------------------------------------------------------------------------------
    def _apply(self, bits: Mapping[str, int], ks: Mapping[str, int], rates: Any = None, sens: Any = None) -> None:
        for name, layer in self.layers.items():
            layer.set_bits(int(bits[name]), int(ks.get(name, 0)))
        if self.config.lsb_pull == "sensitivity" and sens and rates:  # pull the layers the Hessian would cut
            tests = self._schedule.target_tests(self.numels)
            self.regularizer.weights = pull_weights(self.bits, self.config.min_bits, (sens, rates, self.numels), *tests)

    def _record(
        self, step: int, rates: Mapping[str, float], sens: Mapping[str, float] | None, done: PruneDecision | None = None
    ) -> None:
        self._last_rates = dict(rates)
        if sens is not None:
            self._last_sens = dict(sens)
        entry = {"step": int(step), "bits": self.bits, "k": self.ks, "rates": dict(rates)}
        entry.update(sensitivities=dict(sens) if sens is not None else None, compression=self.compression)
        entry.update(avg_bits=self.avg_bits, phase="final" if self._finalized else "regularize")
        entry.update(pruned=list(done.pruned) if done else [], forced=bool(done is not None and done.forced))
        entry.update(reg_strength=self.reg_strength, planned_bits=self.plan.planned_bits(step) if self.plan else None)
        entry["clip_ratios"] = dict(self.clip_ratios) if self._finalized and self.clip_ratios else None
        entry["pull"] = dict(self.regularizer.weights) if self.config.lsb_pull != "uniform" else None
        self._history.append(entry)

    def start(self, batch: Batch | None = None, loss_fn: LossFn | None = None, global_step: int = 0) -> None:
        """Initial ``k`` (sensitivities at the current bits: 1 above the mean, 2 below) and the planned trajectory,
        at ``global_step`` (end of the warm-up). ``ValueError`` naming what is reachable if the target is not."""
        self._schedule.check_reachable(self.numels)
        rates, sens = self._measure(batch, global_step, loss_fn)
        ks = self._schedule.assign_k(self.bits, sens)
        self._apply(self.bits, ks, rates, sens)
        self._started = True
        self._pacer.begin(global_step, self._total_steps, self.avg_bits)
        self._record(global_step, self.nonzero_rates(), sens)
        logger.info("msq_hf: start at step %d, %d layers, k=%s", global_step, len(self.layers), self.ks)

    def maybe_start(self, global_step: int, batch: Batch | None = None, loss_fn: LossFn | None = None) -> bool:
        """:meth:`start` once ``global_step`` reached :attr:`warmup_step`; returns whether MSQ has started (an
        unreachable target fails on the first call, before any optimizer step)."""
        if not self._started and global_step >= self.warmup_step:
            self.start(batch, loss_fn, global_step)
        elif not self._started:
            self._schedule.check_reachable(self.numels)
        return self._started

    def is_pruning_step(self, global_step: int) -> bool:
        """True if :meth:`maybe_step` would run a pruning step at ``global_step`` (the forced round's step too)."""
        if self._finalized or global_step <= 0:
            return False
        return global_step % self.config.prune_interval == 0 or global_step == self.final_round_step

    @property
    def final_round_step(self) -> int | None:
        """Optimizer step at which the final round is forced (``final_round_fraction * total_steps``)."""
        if self._total_steps is None:
            return None
        return max(1, math.ceil(self.config.final_round_fraction * self._total_steps))

    def maybe_step(
        self, global_step: int, batch: Batch | None = None, loss_fn: LossFn | None = None, optimizer: Any = None
    ) -> PruneDecision | None:
        """Run a pruning step if ``global_step`` (optimizer steps done) is one; else return ``None``.

        Measures rates and sensitivities (rank-reduced), lets the schedule decide, writes the new bits/k into the
        layers and (``bn_recalibration``) re-estimates BatchNorm statistics on ``batch`` if weights changed. At the
        final round ``rewind_weights`` puts the weights back to :attr:`snapshot` and clears ``optimizer``'s state
        (required then: a ``ValueError`` without it) and ``qat_scale`` fits each layer's scale (:mod:`.clipping`).
        """
        if self.snapshot is not None and optimizer is None:
            raise ValueError("MSQConfig.rewind_weights=True: pass maybe_step(..., optimizer=...), for the rewind")
        if self._finalized:  # QAT; qat_scale="mse" refits every layer's clipped scale each prune_interval steps
            refit = self.config.qat_scale == "mse" and global_step > 0 and global_step % self.config.prune_interval == 0
            self.clip_ratios = fit_clipped_scales(self.layers) if refit else self.clip_ratios
            return None
        was_started = self._started  # a step that starts MSQ measures once and does not also prune
        started = self.maybe_start(global_step, batch, loss_fn)
        if not (started and was_started and self.is_pruning_step(global_step)):
            return None
        rates, sens = self._measure(batch, global_step, loss_fn)
        now = {"rates": rates, "bits": self.bits, "k": self.ks}  # the precision these rates were measured at
        state = make_state(now["bits"], now["k"], self.numels)
        decision = self._schedule.step(state, rates, sens, global_step, self._pacer.floor_bits(global_step))
        self._apply(decision.bits, decision.k, rates, sens)
        self._finalized = bool(decision.finalized)
        if self._finalized and self.snapshot is not None:  # rewind_weights: the scheme is found, QAT from the start
            rewind(self.model, self.snapshot, optimizer)
            self.snapshot = None
        if clipped := self._finalized and self.config.qat_scale != "max":  # the scheme is final: fit every scale
            self.clip_ratios = fit_final_scales(self.layers, self.config.qat_scale, self.config.learned_step_init)
        if (decision.pruned or clipped) and self.config.bn_recalibration and batch is not None:  # stale otherwise
            recalibrate_batchnorm(self.model, batch, loss_fn or self.loss_fn or fp32_default_loss)
        if not self._finalized:  # the rates' trend and the learning rate bound the feedback (pacing module docstring)
            top = {name: layer.n_bits for name, layer in self.layers.items() if layer.n_k > 0}
            shares = [self.regularizer.weights[name] for name in top]
            limit = pull_limit(self.learning_rate, list(top.values()), self.config.lsb_units, shares)
            self._pacer.update(
                global_step, self.avg_bits, rate_change(last_measurement(self._history), now, self.numels), limit
            )
        self._record(global_step, rates, sens, decision)
        return decision

    # -- logging ----------------------------------------------------------------------------------
    def log_dict(self, per_layer: bool = True) -> dict[str, float]:
        """Flat numeric metrics for loggers (:func:`msq_hf.training.log_metrics.msq_metrics`): compression, average
        bits, phase, lambda * R, lambda and, per layer, bits, k and the last measured nonzero rate and sensitivity."""
        summary = {"compression": self.compression, "avg_bits": self.avg_bits, "phase": self.phase}
        summary.update(reg=self.last_regularization, reg_strength=self.reg_strength)
        summary["pruning_steps"] = max(len(self._history) - 1, 0)  # the first entry is the start
        layers = {"bits": self.bits, "k": self.ks, "nonzero": self._last_rates, "sens": self._last_sens}
        return msq_metrics(summary, layers if per_layer else None)

    # -- persistence ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: schedule state, history, bits/k, phase, seed, total steps."""
        return {
            "version": STATE_VERSION,
            "started": self._started,
            "finalized": self._finalized,
            "phase": self.phase,
            "seed": self.seed,
            "total_steps": self._total_steps,
            "bits": self.bits,
            "k": self.ks,
            "last_rates": dict(self._last_rates),
            "last_sensitivities": dict(self._last_sens),
            "history": self.history,
            "schedule": self._schedule.state_dict(),
            "pacer": self._pacer.state_dict(),
            "traces": self.traces.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (also re-applies bits/k to the layers)."""
        if (version := state.get("version")) not in (1, STATE_VERSION):
            raise ValueError(f"MSQ controller state version {version!r} is not supported (expected {STATE_VERSION})")
        unknown = sorted(set(state["bits"]) ^ set(self.names))
        if unknown:
            msg = f"MSQ controller state does not match the model: layer(s) {unknown[:5]} are in only one of them"
            raise ValueError(msg)
        self._apply(state["bits"], state["k"], state.get("last_rates"), state.get("last_sensitivities"))
        self._started = bool(state["started"])
        self._finalized = bool(state["finalized"])
        self.snapshot = None if self._finalized else self.snapshot  # a resumed rewind reads the checkpoint's copy
        if state.get("total_steps") is not None and self._total_steps is None:
            self.total_steps = state["total_steps"]
        self._last_rates = {k: float(v) for k, v in state.get("last_rates", {}).items()}
        self._last_sens = {k: float(v) for k, v in state.get("last_sensitivities", {}).items()}
        self._history = [dict(h) for h in state.get("history", [])]
        self._schedule.load_state_dict(state["schedule"])
        self._pacer.load_state_dict(state.get("pacer") or {})  # version 1: lambda from the config, no plan
        self.traces.load_state_dict(state.get("traces") or {})  # older states: the next pass runs the Hessian


__all__ = ["STATE_VERSION", "MSQController"]
