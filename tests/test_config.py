"""MSQConfig validation, serialisation and registration with transformers."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import typing

import pytest
import torch
from transformers import HfArgumentParser

import msq_hf
from msq_hf import BitPruningSchedule, MSQConfig, MSQQuantizer
from msq_hf.arguments import MSQArguments, cli_config_values, make_msq_arguments
from msq_hf.commands.main import main
from msq_hf.config import PARAMS, ConfigFieldError, check_bits, user_params, validate_config, validate_field
from msq_hf.fields import Param
from msq_hf.integrations.transformers import register

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
    ("reg_control", dict(reg_control="pid")),
    ("reg_gain", dict(reg_gain=0.5)),
    ("target_fraction", dict(target_fraction=0.9)),  # after final_round_fraction=0.7
    ("target_fraction", dict(warmup_fraction=0.5)),  # not after the warm-up
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
        "scale",
    )
    assert (cfg.reg_control, cfg.target_fraction, cfg.warmup_fraction) == ("trajectory", 0.5, 0.05)
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


# ------------------------------------------------------------------------------------------------
# one declaration: MSQConfig's fields -> constructor, docs, validation API, CLI arguments


def test_constructor_signature_comes_from_the_declarations() -> None:
    signature = inspect.signature(MSQConfig)
    for name, spec in PARAMS.items():
        assert signature.parameters[name].default == spec.default, name
    assert list(signature.parameters)[: len(PARAMS)] == list(PARAMS)
    assert MSQConfig(6, 2, 10.0).to_dict() == MSQConfig(init_bits=6, min_bits=2, target_compression=10.0).to_dict()
    assert {name: getattr(MSQConfig(), name) for name in PARAMS} == {n: s.default for n, s in PARAMS.items()}
    for name in PARAMS:
        assert f"    {name} = " in MSQConfig.__doc__, name


def test_serialization_fields_are_not_user_facing() -> None:
    assert {s.name for s in PARAMS.values() if not s.user} == {
        "bit_scheme",
        "msq_format",
        "dequantize",
        "format_version",
    }
    assert [s.name for s in user_params()] == [n for n, s in PARAMS.items() if s.user]


def test_validation_api() -> None:
    validate_field("init_bits", 4)
    with pytest.raises(ConfigFieldError, match=r"MSQConfig\.init_bits=9 is invalid: expected an integer in 1\.\.8"):
        validate_field("init_bits", 9)
    with pytest.raises(ConfigFieldError) as info:
        MSQConfig(init_bits=2, min_bits=3)
    assert (info.value.field, info.value.value, info.value.related) == ("min_bits", 3, {"init_bits": 2})
    assert info.value.expected(lambda name: name.upper()) == "at most INIT_BITS"
    # strict rules are for front ends: a target already met at init_bits is a valid config, not a useful run
    validate_config(MSQConfig(target_compression=2.0).to_dict())
    with pytest.raises(ConfigFieldError, match="target_compression"):
        validate_config(MSQConfig(target_compression=2.0).to_dict(), strict=True)
    # the one bit-width check (quant.functional, re-exported by config)
    assert check_bits(3, "x") == 3 and check_bits(torch.tensor(4), "x") == 4
    for bad in (0, 9, True, 4.0, "4"):
        with pytest.raises(ValueError, match=r"layer\.bits=.* is invalid: expected an integer in 1\.\.8"):
            check_bits(bad, "layer.bits")


SCHEDULE_FIELDS = {
    "target_compression": [0.5, 1, 1.0, 16.0, 32.0, float("inf"), float("nan"), True, "16"],
    "prune_threshold": [0.0, 0.01, 0.5, 0.999, 1.0, -0.1, True],
    "min_bits": [0, 1, 4, 8, 9, 2.0, True],
    "final_round_fraction": [0.0, 0.1, 1.0, 1.5, True],
    "default_k": [0, 1, 2, 3, True, 1.0],
}


@pytest.mark.parametrize("field", sorted(SCHEDULE_FIELDS))
def test_schedule_accepts_what_the_config_accepts(field: str) -> None:
    """BitPruningSchedule keeps a torch-free copy of these ranges (it is loaded standalone); they must agree."""
    for value in SCHEDULE_FIELDS[field]:
        try:
            validate_field(field, value)
            config_ok = True
        except ValueError:
            config_ok = False
        kwargs = {"target_compression": 16.0, "prune_threshold": 0.05, field: value}
        try:
            BitPruningSchedule(**kwargs)
            schedule_ok = True
        except ValueError as exc:
            assert field in str(exc)
            schedule_ok = False
        assert schedule_ok == config_ok, f"{field}={value!r}: schedule {schedule_ok}, config {config_ok}"


@pytest.mark.parametrize("spec", user_params(), ids=lambda s: s.name)
def test_every_user_field_is_an_argument(spec: Param) -> None:
    field = {f.name: f for f in dataclasses.fields(MSQArguments)}[spec.name]
    # the annotation, not field.type: HfArgumentParser narrows field.type of Optional fields in place
    assert field.default == spec.default and typing.get_type_hints(MSQArguments)[spec.name] == spec.type
    help_text = field.metadata["help"].replace("%%", "%")
    assert spec.help in help_text and spec.rule.expected in help_text
    assert spec.default is None or "(default: %(default)s)" in help_text
    assert list(field.metadata.get("aliases", [])) == list(spec.aliases)


def test_arguments_hold_only_user_fields_and_negations() -> None:
    names = {f.name for f in dataclasses.fields(MSQArguments)}
    assert names == {s.name for s in user_params()} | set(MSQArguments.NEGATIONS)
    assert MSQArguments.NEGATIONS == {"no_hessian": "hessian_guided"}
    assert MSQConfig(**MSQArguments().config_values()).to_dict() == MSQConfig().to_dict()


def parse(*argv: str, cls: type = MSQArguments) -> tuple[HfArgumentParser, object]:
    parser = HfArgumentParser(cls, prog="msq-test")
    (args,) = parser.parse_args_into_dataclasses(list(argv), args_file_flag=None)
    return parser, args


def test_generated_parser_flags_and_aliases() -> None:
    parser, args = parse(
        "--target", "10", "--init-bits", "6", "--min_bits", "2", "--hessian-probes", "3", "--no-hessian",
        "--wnorm", "dorefa", "--default-k", "2", "--act-bits", "4", "--no-act-skip-first",
        "--modules-to-not-convert", "head", "re:.*fc",
    )  # fmt: skip
    cfg = MSQConfig(**cli_config_values(parser, args))
    assert (cfg.target_compression, cfg.init_bits, cfg.min_bits, cfg.hessian_max_probes) == (10.0, 6, 2, 3)
    assert cfg.hessian_guided is False and cfg.act_skip_first is False
    assert (cfg.wnorm, cfg.default_k, cfg.act_bits) == ("dorefa", 2, 4)
    assert cfg.modules_to_not_convert == ["head", "re:.*fc"]
    assert cli_config_values(*parse("--hessian_guided", "false"))["hessian_guided"] is False
    assert cli_config_values(*parse())["hessian_guided"] is True
    assert cli_config_values(parser, args, act_bits=None)["act_bits"] is None  # overrides win
    with pytest.raises(ValueError, match="unknown field"):
        cli_config_values(parser, args, no_such_field=1)


OUT_OF_RANGE = [
    (["--init-bits", "9"], "--init-bits 9", "1..8"),
    (["--min-bits", "0"], "--min-bits 0", "1..8"),
    (["--target", "0.5"], "--target 0.5", "> 1"),
    (["--target_compression", "nan"], "--target nan", ">= 1"),
    (["--reg-strength", "-1"], "--reg-strength -1", ">= 0"),
    (["--prune-threshold", "1.5"], "--prune-threshold 1.5", "(0, 1)"),
    (["--prune-interval", "0"], "--prune-interval 0", "positive integer"),
    (["--final-round-fraction", "0"], "--final-round-fraction 0", "(0, 1]"),
    (["--hessian-probes", "0"], "--hessian-probes 0", "positive integer"),
    (["--hessian-tol", "2"], "--hessian-tol 2", "(0, 1)"),
    (["--hessian-batch-size", "-1"], "--hessian-batch-size -1", "positive integer"),
    (["--act-bits", "1"], "--act-bits 1", "2..8"),
    (["--reg-gain", "1"], "--reg-gain 1", "> 1"),
    (["--target-fraction", "0"], "--target-fraction 0", "(0, 1]"),
    (["--warmup-fraction", "1"], "--warmup-fraction 1", "[0, 1)"),
    (["--hessian-ema", "1"], "--hessian-ema 1", "[0, 1)"),
    (["--hessian-interval", "0"], "--hessian-interval 0", "positive integer"),
]


@pytest.mark.parametrize("argv, flag, allowed", OUT_OF_RANGE, ids=[a[0] for a, _, _ in OUT_OF_RANGE])
def test_generated_parser_rejects_out_of_range_values(
    capsys: pytest.CaptureFixture[str], argv: list[str], flag: str, allowed: str
) -> None:
    parser, args = parse(*argv)
    with pytest.raises(SystemExit) as info:
        cli_config_values(parser, args)
    assert info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("msq-test: error: ") and flag in line and allowed in line, line


def test_every_range_rule_is_exercised() -> None:
    """OUT_OF_RANGE covers every user field whose values are a range (the others are choices or flags)."""
    ranged = {s.name for s in user_params() if not s.rule.expected.startswith(("one of", "True or", "None or a list"))}
    covered = {cli_flag_to_field[a[0]] for a, _, _ in OUT_OF_RANGE}
    assert ranged == covered


cli_flag_to_field = {
    **{f"--{s.name.replace('_', '-')}": s.name for s in PARAMS.values()},
    **{f"--{s.name}": s.name for s in PARAMS.values()},
    **{a: s.name for s in PARAMS.values() for a in s.aliases},
}


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--min-bits", "5", "--init-bits", "4"], ["--min-bits 5", "--init-bits 4"]),
        (["--target", "40"], ["--target 40", "32x", "--min-bits 1"]),
        (["--target", "17", "--count-sign-bit"], ["--target 17", "16x", "--count-sign-bit True"]),
        (["--target", "3", "--init-bits", "8"], ["--target 3", "--init-bits 8"]),
        (["--target-fraction", "0.8"], ["--target-fraction 0.8", "--final-round-fraction 0.7"]),
        (["--warmup-fraction", "0.6"], ["--target-fraction 0.5", "--warmup-fraction 0.6"]),
    ],
)
def test_generated_parser_names_every_flag_of_a_bad_combination(argv: list[str], needles: list[str]) -> None:
    parser, args = parse(*argv)
    with pytest.raises(ValueError) as info:
        cli_config_values(parser, args)
    for needle in needles:
        assert needle in str(info.value)


def test_other_defaults_for_a_front_end() -> None:
    demo = make_msq_arguments({"prune_interval": 10, "modules_to_not_convert": ["head"]}, name="DemoArguments")
    assert demo.__name__ == "DemoArguments"
    assert demo().prune_interval == 10 and demo().config_values()["modules_to_not_convert"] == ["head"]
    assert demo().modules_to_not_convert is not demo().modules_to_not_convert  # no shared mutable default
    help_text = HfArgumentParser(demo).format_help()
    assert "(default: 10)" in " ".join(help_text.split())
    with pytest.raises(ValueError, match="prune_interval"):
        make_msq_arguments({"prune_interval": 0})
    with pytest.raises(ValueError, match="bit_scheme"):
        make_msq_arguments({"bit_scheme": {"fc": 4}})


def test_msq_hf_train_help_lists_every_user_field(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for spec in user_params():
        assert f"--{spec.name.replace('_', '-')}" in out, spec.name
