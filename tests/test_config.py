"""MSQConfig validation, serialisation and registration with transformers."""

from __future__ import annotations

import importlib
import json

import pytest

import msq_hf
from msq_hf import MSQConfig, MSQQuantizer
from msq_hf.config import register

INVALID = [
    # (field named in the message, kwargs)
    ("init_bits", dict(init_bits=0)),
    ("init_bits", dict(init_bits=9)),
    ("init_bits", dict(init_bits=True)),
    ("init_bits", dict(init_bits=4.0)),
    ("min_bits", dict(min_bits=0)),
    ("min_bits", dict(min_bits=9)),
    ("min_bits", dict(min_bits=False)),
    ("min_bits", dict(min_bits=1.5)),
    ("min_bits", dict(init_bits=2, min_bits=3)),
    ("target_compression", dict(target_compression=0.5)),
    ("target_compression", dict(target_compression=float("inf"))),
    ("target_compression", dict(target_compression=float("nan"))),
    ("target_compression", dict(target_compression="16")),
    ("target_compression", dict(target_compression=33.0)),  # > 32 / min_bits
    ("target_compression", dict(min_bits=2, target_compression=17.0)),  # > 32 / 2
    ("target_compression", dict(count_sign_bit=True, target_compression=17.0)),  # > 32 / (1 + 1)
    ("reg_strength", dict(reg_strength=-1.0)),
    ("reg_strength", dict(reg_strength=float("nan"))),
    ("prune_threshold", dict(prune_threshold=0.0)),
    ("prune_threshold", dict(prune_threshold=1.0)),
    ("prune_threshold", dict(prune_threshold=-0.1)),
    ("hessian_tol", dict(hessian_tol=0)),
    ("hessian_tol", dict(hessian_tol=1.5)),
    ("final_round_fraction", dict(final_round_fraction=0)),
    ("final_round_fraction", dict(final_round_fraction=1.1)),
    ("prune_interval", dict(prune_interval=0)),
    ("prune_interval", dict(prune_interval=2.5)),
    ("prune_interval", dict(prune_interval=True)),
    ("hessian_max_probes", dict(hessian_max_probes=0)),
    ("hessian_batch_size", dict(hessian_batch_size=-4)),
    ("default_k", dict(default_k=3)),
    ("default_k", dict(default_k=0)),
    ("wnorm", dict(wnorm="affine")),
    ("lsb_form", dict(lsb_form="cont")),
    ("lsb_units", dict(lsb_units="bits")),
    ("reg_reduction", dict(reg_reduction="avg")),
    ("sensitivity_norm", dict(sensitivity_norm="mean")),
    ("act_quantizer", dict(act_quantizer="minmax")),
    ("msq_format", dict(msq_format="int4")),
    ("act_bits", dict(act_bits=1)),
    ("act_bits", dict(act_bits=9)),
    ("act_bits", dict(act_bits=True)),
    ("act_bits", dict(act_bits=4.0)),
    ("modules_to_not_convert", dict(modules_to_not_convert=["head", 3])),
    ("bit_scheme", dict(bit_scheme={"fc": 0})),
    ("bit_scheme", dict(bit_scheme={"fc": 9})),
    ("bit_scheme", dict(bit_scheme={"fc": "4"})),
    ("bit_scheme", dict(bit_scheme={"fc": True})),
    ("bit_scheme", dict(bit_scheme={"fc": 4.0})),
    ("format_version", dict(format_version=2)),
    ("format_version", dict(format_version=0)),
    ("count_sign_bit", dict(count_sign_bit=1)),
    ("hessian_guided", dict(hessian_guided="yes")),
    ("act_skip_first", dict(act_skip_first=None)),
    ("dequantize", dict(dequantize=0)),
    ("bogus_field", dict(bogus_field=1)),
    ("init_bitz", dict(init_bitz=4)),
]


@pytest.mark.parametrize("field, kwargs", INVALID, ids=[f"{f}-{i}" for i, (f, _) in enumerate(INVALID)])
def test_invalid_values_raise_value_error_naming_the_field(field: str, kwargs: dict) -> None:
    with pytest.raises(ValueError) as info:
        MSQConfig(**kwargs)
    assert field in str(info.value)


def test_bit_scheme_error_names_the_layer() -> None:
    with pytest.raises(ValueError, match="blocks.3.mlp.fc1"):
        MSQConfig(bit_scheme={"head": 4, "blocks.3.mlp.fc1": 12})


def test_valid_edge_values() -> None:
    MSQConfig(init_bits=1, min_bits=1, target_compression=32.0)
    MSQConfig(init_bits=8, min_bits=8, target_compression=4.0)
    MSQConfig(count_sign_bit=True, target_compression=16.0)
    MSQConfig(act_bits=2, act_quantizer="pact")
    MSQConfig(act_bits=8, act_quantizer="lsq", final_round_fraction=1.0, reg_strength=0)
    MSQConfig(target_compression=1)  # an int is fine


def test_defaults() -> None:
    cfg = MSQConfig()
    assert cfg.quant_method == "msq"
    assert (cfg.init_bits, cfg.min_bits, cfg.wnorm, cfg.lsb_form, cfg.lsb_units) == (
        8,
        1,
        "signmag",
        "continuous",
        "code",
    )
    assert cfg.msq_format == "fake" and cfg.dequantize is False and cfg.bit_scheme is None


def test_dict_round_trip_and_json() -> None:
    cfg = MSQConfig(
        init_bits=6,
        min_bits=2,
        target_compression=10.0,
        reg_strength=1e-4,
        prune_threshold=0.05,
        wnorm="dorefa",
        lsb_form="discrete",
        lsb_units="value",
        reg_reduction="mean",
        act_bits=4,
        modules_to_not_convert=["head", "re:.*downsample.*"],
        bit_scheme={"a.b": 3, "c": 6},
        hessian_guided=False,
        default_k=2,
    )
    data = cfg.to_dict()
    assert data["quant_method"] == "msq"
    text = json.dumps(data)  # JSON serialisable
    back = MSQConfig.from_dict(json.loads(text))
    assert back.to_dict() == data
    back2, unused = MSQConfig.from_dict(data, return_unused_kwargs=True)
    assert unused == {} and back2.to_dict() == data
    assert json.loads(cfg.to_json_string(use_diff=False)) == data
    # to_dict is a copy: mutating it does not touch the config
    data["bit_scheme"]["a.b"] = 1
    assert cfg.bit_scheme["a.b"] == 3
    # copy() validates its changes
    assert cfg.copy(init_bits=4).init_bits == 4
    with pytest.raises(ValueError, match="init_bits"):
        cfg.copy(init_bits=1)  # below min_bits=2
    assert "MSQConfig" in repr(cfg)


def test_from_dict_rejects_unknown_keys() -> None:
    data = MSQConfig().to_dict()
    data["future_option"] = True
    with pytest.raises(ValueError, match="future_option"):
        MSQConfig.from_dict(data)


def test_registered_with_transformers() -> None:
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        AutoHfQuantizer,
        AutoQuantizationConfig,
    )

    assert AUTO_QUANTIZATION_CONFIG_MAPPING["msq"] is MSQConfig
    assert AUTO_QUANTIZER_MAPPING["msq"] is MSQQuantizer
    cfg = AutoQuantizationConfig.from_dict(MSQConfig(init_bits=5).to_dict())
    assert isinstance(cfg, MSQConfig) and cfg.init_bits == 5
    quantizer = AutoHfQuantizer.from_config(cfg, pre_quantized=False)
    assert isinstance(quantizer, MSQQuantizer)
    assert quantizer.is_trainable and quantizer.is_qat_trainable and quantizer.is_serializable()


def test_import_and_register_twice_is_fine() -> None:
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert importlib.import_module("msq_hf") is msq_hf
    register()
    register()
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["msq"] is MSQConfig
    assert AUTO_QUANTIZER_MAPPING["msq"] is MSQQuantizer
