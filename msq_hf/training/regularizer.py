"""The LSB regularizer (MSQ Eq. 8) of a model's MSQ layers: as a loss term, or as a proximal step.

The fused quantizer of every MSQ layer computes its ``R_l`` during the forward and keeps it on the layer
(:meth:`msq_hf.nn.layers.MSQLayerMixin.pop_regularization`); this module only adds them up, times lambda. It
costs no pass over the weights and never reads a value on the host. With ``lsb_update="proximal"`` the pull is
instead a step on the weights after the optimizer's (:meth:`LSBRegularizer.proximal_step`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["LSBRegularizer"]


class LSBRegularizer:
    """``lambda * sum_l w_l R_l`` of the last training forward of ``layers`` (name -> MSQ layer); ``weights``
    holds each layer's share ``w_l`` of lambda (1, or 0 for a layer ``lsb_pull="sensitivity"`` leaves alone:
    :func:`msq_hf.training.allocation.pull_weights`)."""

    def __init__(self, layers: Mapping[str, nn.Module]):
        self.layers = dict(layers)
        self.weights: dict[str, float] = dict.fromkeys(self.layers, 1.0)
        self.last: torch.Tensor | float = 0.0  # the last lambda * R (a device tensor while training)

    def collect(self, strength: float) -> torch.Tensor:
        """Pop every layer's term and return their sum times ``strength`` (a 0-d zero without gradient when no
        layer recorded a term -- eval mode, ``no_grad``, every ``k = 0`` -- or ``strength == 0``).

        Raises ``RuntimeError`` if, in one training forward, some layers recorded their term and a layer with
        ``k > 0`` ran without gradients: the signature of reentrant activation checkpointing, under which the
        checkpointed layers cannot record their term and the regularizer would silently skip them. (A forward
        entirely under ``no_grad`` records nothing and is fine.)
        """
        silent = [name for name, layer in self.layers.items() if layer.forward_without_grad and layer.n_k > 0]
        popped = ((name, layer.pop_regularization()) for name, layer in self.layers.items())
        # a uniform pull multiplies nothing: the default graph is the paper's sum
        terms = [t if self.weights[n] == 1 else t * self.weights[n] for n, t in popped if t is not None]
        if terms and silent:
            # some layers recorded a term in this forward, others ran without gradients: checkpointed segments
            raise RuntimeError(
                f"msq_hf: MSQ layer(s) {silent[:3]} ran their training forward without gradients while others "
                "recorded their LSB term, so the regularizer would silently skip them. This is reentrant "
                "activation checkpointing (torch.utils.checkpoint(..., use_reentrant=True), or "
                "gradient_checkpointing_kwargs={'use_reentrant': True}): use use_reentrant=False, which MSQ supports"
            )
        if not terms or strength == 0:
            self.last = 0.0
            return torch.zeros((), device=next(iter(self.layers.values())).weight.device)
        reg = torch.stack([t.float() for t in terms]).sum() * strength
        self.last = reg.detach()  # read on the host only when logged: no device sync per step
        return reg

    def add_gradients(self, strength: float) -> None:
        """``W.grad += strength * w_l * dR_l/dW`` for every layer that got a gradient this step: the regularizer's
        gradient joining after the Trainer's clipping (``regularizer_after_clipping``). Device-side, no host read."""
        for name, layer in self.layers.items():
            grad = layer.weight.grad
            if grad is not None and strength * self.weights[name] != 0:
                grad.add_(layer.regularizer_gradient().to(grad.dtype), alpha=strength * self.weights[name])

    def proximal_step(self, amount: float) -> None:
        """Move every layer's weights one proximal step of ``amount * w_l * R_l`` (``amount = lr * lambda``) toward
        their zero-LSB grid points (:meth:`msq_hf.nn.layers.MSQLayerMixin.apply_lsb_proximal`; layers at ``k = 0`` stay
        as they are). Device-side, no host read."""
        if amount > 0:
            for name, layer in self.layers.items():
                layer.apply_lsb_proximal(amount * self.weights[name])
