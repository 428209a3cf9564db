"""Going back to the start weights once MSQ has found its bit scheme (``MSQConfig.rewind_weights``).

Why. On the one-epoch ResNet-18 fine-tune (docs/results.md, "Where the accuracy goes"), plain QAT of the float
checkpoint at the bit scheme an MSQ run ended with scored about half a point above that MSQ run, even when it
trained only the steps the run had left after its final round. So the bits MSQ chose were not what cost accuracy;
the weights the LSB pull had moved onto the coarse grids were. With ``rewind_weights`` MSQ still searches the scheme
(regularizer, threshold pruning, Hessian-guided ``k``); at the final round every weight and buffer goes back to
its value at the start of training (a fine-tune's checkpoint), the optimizer state is cleared, and the remaining
steps train those weights as QAT at the scheme found. Search-then-QAT is how HAWQ and HAQ use a scheme too.

The snapshot is one CPU copy of the model's state (host memory, not accelerator memory), taken when the controller
is built (before the first step) and dropped at the rewind; checkpoints written before the rewind carry it as
``msq_rewind.safetensors`` (:data:`msq_hf.io.format.REWIND_NAME`), so a resumed run goes back to the same weights.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from msq_hf.convert import iter_msq_layers
from msq_hf.errors import MSQFormatError, MSQMissingFileError
from msq_hf.io.format import REWIND_NAME

MSQ_BUFFERS = ("bits", "k")  # the bit scheme: found by the search, never rewound


def rewound_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live parameters and persistent buffers of ``model`` by ``state_dict`` name, without MSQ's ``bits``/``k``."""
    scheme = {f"{name}.{buffer}" for name, _ in iter_msq_layers(model) for buffer in MSQ_BUFFERS}
    return {name: t for name, t in model.state_dict(keep_vars=True).items() if name not in scheme}


class WeightSnapshot:
    """A CPU copy of a model's tensors (:func:`rewound_tensors`) that can be written back into the live model."""

    def __init__(self, tensors: dict[str, torch.Tensor], source: str = "the snapshot"):
        self.tensors = tensors
        self.source = source  # named in errors: where the tensors came from

    @classmethod
    def take(cls, model: nn.Module) -> WeightSnapshot:
        """Copy ``model``'s tensors to the CPU."""
        tensors = {name: t.detach().to("cpu", copy=True) for name, t in rewound_tensors(model).items()}
        return cls(tensors, f"the snapshot of {type(model).__name__}")

    def restore(self, model: nn.Module) -> None:
        """Write the snapshot into ``model`` in place (the optimizer keeps its parameters); ``MSQFormatError`` naming
        the tensors if the snapshot and the model differ in names, shapes or dtypes, before anything is written."""
        live = rewound_tensors(model)
        missing, extra = sorted(set(live) - set(self.tensors)), sorted(set(self.tensors) - set(live))
        if missing or extra:
            raise MSQFormatError(
                f"{self.source} does not match {type(model).__name__}: missing {missing[:5]}, not in the model "
                f"{extra[:5]}"
            )
        wrong = [n for n, t in live.items() if (t.shape, t.dtype) != (self.tensors[n].shape, self.tensors[n].dtype)]
        if wrong:
            name = wrong[0]
            raise MSQFormatError(
                f"{self.source}: {len(wrong)} tensor(s) differ from the model's, e.g. {name} "
                f"{tuple(self.tensors[name].shape)} {self.tensors[name].dtype} vs {tuple(live[name].shape)} "
                f"{live[name].dtype}"
            )
        with torch.no_grad():
            for name, tensor in live.items():
                tensor.copy_(self.tensors[name])

    def save(self, folder: str | os.PathLike[str]) -> str:
        """Write ``<folder>/msq_rewind.safetensors`` atomically (never a half-written file); return its path."""
        path = os.path.join(folder, REWIND_NAME)
        tmp = path + ".tmp"
        save_file({name: t.contiguous() for name, t in self.tensors.items()}, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> WeightSnapshot:
        """Read ``<folder>/msq_rewind.safetensors``; ``MSQMissingFileError`` naming it if absent."""
        path = os.path.join(folder, REWIND_NAME)
        if not os.path.isfile(path):
            raise MSQMissingFileError(
                f"{path} is missing: the checkpoint was written before the final round of a run with "
                "MSQConfig.rewind_weights=True, so it must carry the weights that run goes back to"
            )
        return cls(load_file(path), path)


def rewind(model: nn.Module, snapshot: WeightSnapshot, optimizer: Any = None) -> None:
    """Put ``model`` back to ``snapshot`` and clear ``optimizer``'s state (momentum and Adam moments of the search
    belong to other weights; a cleared state starts as a new optimizer would). MSQ's ``bits``/``k`` stay."""
    snapshot.restore(model)
    if optimizer is not None:
        optimizer.state.clear()


__all__ = ["MSQ_BUFFERS", "WeightSnapshot", "rewind", "rewound_tensors"]
