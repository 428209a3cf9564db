"""A raw timm MSQ checkpoint rebuilt by ``load_timm_checkpoint`` keeps what the run recorded: weights, bits, and
the preprocessing + class names an export needs for ``transformers.pipeline``."""

from __future__ import annotations

import json

import timm
import torch
from safetensors.torch import save_file

import msq_hf
from msq_hf.training.checkpoint import load_timm_checkpoint, write_raw_model_config


def test_rebuilt_checkpoint_keeps_preprocessing_and_labels(tmp_path) -> None:
    model = timm.create_model("test_resnet", num_classes=3)
    cfg = msq_hf.MSQConfig(init_bits=6)
    msq_hf.quantize_model(model, cfg)
    recorded = {"input_size": (3, 32, 32), "mean": (0.286,) * 3, "std": (0.353,) * 3, "crop_pct": 1.0}
    model.pretrained_cfg = {**model.pretrained_cfg, **recorded, "label_names": ["cat", "dog", "eel"]}
    write_raw_model_config(model, cfg, tmp_path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))

    rebuilt = load_timm_checkpoint(tmp_path)
    for key, value in recorded.items():
        got = rebuilt.pretrained_cfg[key]
        assert (tuple(got) if isinstance(value, tuple) else got) == value, key
    assert rebuilt.pretrained_cfg["label_names"] == ["cat", "dog", "eel"]
    assert msq_hf.bit_scheme(rebuilt) == msq_hf.bit_scheme(model)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(rebuilt.eval()(x), model.eval()(x))

    msq_hf.export(rebuilt, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32] and config["label_names"] == ["cat", "dog", "eel"]
