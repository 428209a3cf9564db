"""Exports shared by the trust tests (test_export_trust.py, test_mutations.py): a raw timm model, an HF ViT and a
sharded HF ViT, built from the tiny models of tests/conftest.py, with their reference logits; plus the edits an
attacker or a careless user makes (JSON edits, re-signing a file in the manifest)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from conftest import IMAGE_SIZE, TINY_MODELS, forward_logits

import msq_hf
from msq_hf.convert import iter_msq_layers
from msq_hf.io.export import export
from msq_hf.io.format import MANIFEST_NAME, file_entry

CASES = {  # name -> (tiny model, export kwargs)
    "timm": ("timm/test_resnet", {}),
    "hf": ("hf/vit", {}),
    "hf_sharded": ("hf/vit", {"max_shard_size": "8KB"}),
}


@dataclass
class BuiltExport:
    """An export folder and the logits its model gives on ``images``."""

    directory: Path
    logits: torch.Tensor


def images() -> torch.Tensor:
    """The fixed input batch of the trust tests."""
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(7))


def build_exports(root: Path) -> dict[str, BuiltExport]:
    """Quantize each tiny model with a mixed bit scheme, export it, record the exported model's logits."""
    out = {}
    for name, (model_name, kwargs) in CASES.items():
        torch.manual_seed(0)
        model = TINY_MODELS[model_name]().eval()
        msq_hf.quantize_model(model, msq_hf.MSQConfig(init_bits=4))
        with torch.no_grad():
            for i, (_, layer) in enumerate(iter_msq_layers(model)):
                layer.bits.fill_(1 + (3 * i) % 8)  # every width 1..8 somewhere
            logits = forward_logits(model, images())
        export(model, root / name, **kwargs)
        out[name] = BuiltExport(root / name, logits)
    return out


def copy_export(built: BuiltExport, target: Path) -> Path:
    """A private copy of an export folder to mutate."""
    shutil.copytree(built.directory, target)
    return target


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def resign(directory: Path, name: str) -> None:
    """Record a file's current size and sha256 in the manifest (what someone who edits both files does)."""
    manifest = read_json(directory / MANIFEST_NAME)
    manifest["files"][name] = file_entry(directory / name)
    weights = [f for n, f in manifest["files"].items() if n.endswith(".safetensors")]
    manifest["totals"]["weight_file_bytes"] = sum(f["size"] for f in weights)
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))


def edit_json(path: Path, change: Callable[[dict], object], sign: bool = False) -> None:
    """Apply ``change`` to a JSON file in place; ``sign`` re-signs it in the manifest."""
    data = read_json(path)
    change(data)
    path.write_text(json.dumps(data))
    if sign:
        resign(path.parent, path.name)


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    """Logits of a loaded model on :func:`images`."""
    with torch.no_grad():
        return forward_logits(model, images())
