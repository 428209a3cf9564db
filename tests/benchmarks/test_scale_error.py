"""benchmarks/scale_error.py: the clipped scale is never worse than max|W|, and an outlier is what it clips."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import scale_error  # noqa: E402


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_clipping_never_hurts_and_an_outlier_is_what_it_clips(bits: int) -> None:
    torch.manual_seed(bits)
    w = torch.randn(256, 64) * 0.05
    plain = scale_error.squared_errors(w, bits)
    assert plain["clipped"] <= plain["max"]  # c = 1 is a candidate
    w[0, 0] = 0.5  # one weight 10 sigma out sets the max-based step of the whole layer
    outlier = scale_error.squared_errors(w, bits)
    assert outlier["max"] > 2.5 * plain["max"]
    assert outlier["max"] / outlier["clipped"] > 2 * plain["max"] / plain["clipped"]
    assert outlier["clipped"] < 1.3 * plain["clipped"]  # clipped, the outlier costs little


def test_the_script_reads_the_quantized_layers_of_a_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tensors = {"conv.weight": torch.randn(8, 3, 3, 3), "fc.weight": torch.randn(10, 8), "fc.bias": torch.randn(10)}
    save_file(tensors, tmp_path / "model.safetensors")
    assert set(scale_error.quantized_weights(tmp_path)) == {"conv.weight", "fc.weight"}
    out = tmp_path / "errors.json"
    assert scale_error.main([str(tmp_path), "--bits", "2", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["bits"] == 2 and row["clipped"] <= row["max"] and 0 < row["uniform"] < 1
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        scale_error.quantized_weights(tmp_path / "missing")
