"""What a loaded export holds in memory: the checked bytes, once, in tensors of its own (issue 13, load memory).

A loaded model must not alias the weight file: safetensors' memory mapping would keep the file's pages behind the
packed buffers (the packed bytes resident as file pages, with whatever the loader copied besides), and an in-place
rewrite of the file after loading would silently change the model. And the bytes in the model must be the bytes
whose sha256 was checked: a file rewritten between the hash and the build must not reach the model.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from export_cases import BuiltExport, build_exports, copy_export, logits_of
from transformers import AutoModelForImageClassification

import msq_hf.io.verify
from msq_hf.errors import MSQError
from msq_hf.io.format import MANIFEST_NAME
from msq_hf.io.load import from_pretrained, read_weight_file
from msq_hf.nn.packed import MSQPackedMixin


@pytest.fixture(autouse=True)
def no_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BuiltExport]:
    return build_exports(tmp_path_factory.mktemp("load_memory"))


LOADS = [  # (export case, loader): msq_hf.from_pretrained, and transformers' own after `import msq_hf`
    ("hf", "msq_hf"),
    ("hf_sharded", "msq_hf"),
    ("timm", "msq_hf"),
    ("hf", "transformers"),
    ("hf_sharded", "transformers"),
]


def load(directory: Path, loader: str) -> torch.nn.Module:
    if loader == "transformers":
        return AutoModelForImageClassification.from_pretrained(directory).eval()
    return from_pretrained(directory)


def weight_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("msq_model*.safetensors"))


def header(path: Path) -> tuple[int, dict]:
    """(offset of the data section, parsed header) of a safetensors file."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return 8 + length, json.loads(raw[8 : 8 + length])


def file_mappings() -> list[tuple[int, int, str]]:
    """The address ranges of this process that map a weight file (Linux)."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) > 5 and parts[5].endswith(".safetensors"):
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            out.append((lo, hi, parts[5]))
    return out


@pytest.mark.parametrize(("case", "loader"), LOADS)
def test_loaded_tensors_own_their_bytes_and_no_float_weight(
    built: dict[str, BuiltExport], case: str, loader: str
) -> None:
    model = load(built[case].directory, loader)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, t in tensors.items():  # no tensor is a window on a larger storage (a file mapping, a read buffer)
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name
    if sys.platform.startswith("linux"):
        maps = file_mappings()
        aliased = [n for n, t in tensors.items() if any(lo <= t.data_ptr() < hi for lo, hi, _ in maps)]
        assert not aliased, f"tensors inside a mapped weight file: {aliased[:5]}"
    # no float weight materialised: the storages hold the packed bytes plus the tensors that are not quantized
    totals = json.loads((built[case].directory / MANIFEST_NAME).read_text())["totals"]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors.values()}
    assert sum(storages.values()) <= totals["quantized_bytes"] + totals["unquantized_bytes"]
    for module in model.modules():
        if isinstance(module, MSQPackedMixin):
            floats = [n for n, b in module.named_buffers(recurse=False) if b.is_floating_point() and b.numel() > 1]
            assert not floats, floats
    assert torch.equal(logits_of(model), built[case].logits)


@pytest.mark.parametrize(("case", "loader"), LOADS)
def test_rewriting_the_file_in_place_after_loading_leaves_the_model_alone(
    built: dict[str, BuiltExport], tmp_path: Path, case: str, loader: str
) -> None:
    directory = copy_export(built[case], tmp_path / case)
    model = load(directory, loader)
    for path in weight_files(directory):  # same inode, data section zeroed: a mapping would see it
        start, _ = header(path)
        with open(path, "r+b") as fh:
            fh.seek(start)
            fh.write(bytes(path.stat().st_size - start))
    assert torch.equal(logits_of(model), built[case].logits)


@pytest.mark.parametrize("case", ["hf", "hf_sharded", "timm"])
def test_the_model_holds_the_bytes_that_were_hashed(
    built: dict[str, BuiltExport], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """The file is rewritten (a valid, larger scale) after its sha256 was checked and before the model is built:
    the model must get the hashed bytes, or the load must fail; never the rewritten ones."""
    directory = copy_export(built[case], tmp_path / case)
    path, key = next((p, k) for p in weight_files(directory) for k in header(p)[1] if k.endswith("weight_scale"))
    start, entries = header(path)
    offset = start + entries[key]["data_offsets"][0]
    check_headers = msq_hf.io.verify.check_headers

    def rewrite_then_check(*args, **kwargs):
        with open(path, "r+b") as fh:
            fh.seek(offset)
            (scale,) = struct.unpack("<f", fh.read(4))
            fh.seek(offset)
            fh.write(struct.pack("<f", scale * 4))
        return check_headers(*args, **kwargs)

    monkeypatch.setattr(msq_hf.io.verify, "check_headers", rewrite_then_check)
    try:
        model = from_pretrained(directory)
    except MSQError:
        return
    assert torch.equal(logits_of(model), built[case].logits), "the model holds bytes that were never hashed"


def test_read_weight_file_hashes_exactly_what_it_returns(built: dict[str, BuiltExport], tmp_path: Path) -> None:
    directory = copy_export(built["hf"], tmp_path / "hf")
    path = weight_files(directory)[0]
    digest = json.loads((directory / MANIFEST_NAME).read_text())["files"][path.name]["sha256"]
    size = path.stat().st_size
    head, tensors = read_weight_file(path, size, digest)
    assert tensors is not None and set(tensors) == set(header(path)[1]) - {"__metadata__"}
    assert head == header(path)[1]
    data = path.read_bytes()
    start, entries = header(path)
    for key, t in tensors.items():  # every tensor holds its own bytes, as stored
        lo, hi = entries[key]["data_offsets"]
        assert t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes() == data[start + lo : start + hi]
    corrupt = bytearray(data)
    corrupt[-1] ^= 1
    path.write_bytes(bytes(corrupt))
    with pytest.raises(MSQError, match="fails its sha256"):
        read_weight_file(path, size, digest)
    assert read_weight_file(path, size, None)[1] is not None  # verify=False: read, not hashed
    path.write_bytes(data + b"\0")
    with pytest.raises(MSQError, match="changed while it was read"):
        read_weight_file(path, size, None)
    path.write_bytes(b"\xff" * 8 + data[8:])  # a header length past the file: nothing split, still hashed
    with pytest.raises(MSQError, match="fails its sha256"):
        read_weight_file(path, size, digest)
    assert read_weight_file(path, size, None) == (None, None)
