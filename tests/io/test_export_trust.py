"""Issue 12 (read side): everything the loader reads is hashed, nothing outside the folder is read, no pickle,
every bad input is a one-line ``MSQError``, and wrong data (scales, totals) is refused.

Each test fails on the code before issue 12: the index and config.json were not hashed, timm ``model_args``
went unfiltered into ``timm.create_model``, several malformed manifests crashed with AttributeError /
RecursionError, and huge or mistyped scales loaded.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from export_cases import BuiltExport, build_exports, copy_export, edit_json, logits_of, read_json, resign
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageClassification

import msq_hf.integrations.timm
import msq_hf.io.load
from msq_hf.commands.main import main
from msq_hf.errors import MSQError, MSQFormatError, MSQIntegrityError, MSQMissingFileError
from msq_hf.io.format import CONFIG_NAME, MANIFEST_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, layer_totals
from msq_hf.io.inspect import format_report, inspect_export
from msq_hf.io.load import from_pretrained


@pytest.fixture(autouse=True)
def no_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    """No load may reach ``torch.load`` (pickle)."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BuiltExport]:
    return build_exports(tmp_path_factory.mktemp("trust"))


@pytest.fixture
def copy(built: dict[str, BuiltExport], tmp_path: Path):
    def make(name: str) -> Path:
        return copy_export(built[name], tmp_path / name)

    return make


def refused(directory: Path, error: type[MSQError] = MSQError, match: str | None = None) -> MSQError:
    """``from_pretrained`` raises ``error`` (one line, matching ``match``); inspect reports it; the CLI exits 1/2."""
    with pytest.raises(error, match=match) as info:
        from_pretrained(directory)
    message = str(info.value)
    assert message and "\n" not in message.strip(), message
    try:
        report = inspect_export(directory)
    except MSQError:
        assert main(["inspect", str(directory)]) == 2
    else:
        assert not report.ok and report.errors
        format_report(report)  # renders whatever the broken manifest holds
        assert main(["inspect", str(directory)]) == 1
    return info.value


def loads_identically(directory: Path, built: BuiltExport) -> None:
    assert torch.equal(logits_of(from_pretrained(directory)), built.logits)
    assert inspect_export(directory).ok


# ------------------------------------------------------------------------------------------------
# 1. the sharded export's index


def _point_index_at(directory: Path, target: str, sign: bool) -> None:
    def change(index: dict) -> None:
        key = next(iter(index["weight_map"]))
        index["weight_map"][key] = target

    edit_json(directory / WEIGHTS_INDEX_NAME, change, sign=sign)


@pytest.mark.parametrize("target", ["../outside/evil.safetensors", "/tmp/evil.safetensors", "..\\evil.safetensors"])
def test_index_cannot_reach_outside_the_folder(copy, tmp_path: Path, target: str) -> None:
    directory = copy("hf_sharded")
    outside = tmp_path / "outside"
    outside.mkdir()
    first = sorted(directory.glob("msq_model-*.safetensors"))[0]
    (outside / "evil.safetensors").write_bytes(first.read_bytes())
    _point_index_at(directory, target, sign=False)
    refused(directory, MSQIntegrityError, r"msq_model\.safetensors\.index\.json (fails its sha256|has \d+ bytes)")
    with pytest.raises(MSQIntegrityError):  # the AutoModel path after `import msq_hf` checks it too
        AutoModelForImageClassification.from_pretrained(directory)
    resign(directory, WEIGHTS_INDEX_NAME)  # even a consistent manifest cannot name a file outside
    refused(directory, MSQFormatError, r"weight_map.*is invalid: expected a plain file name")
    with pytest.raises(MSQFormatError):
        AutoModelForImageClassification.from_pretrained(directory)


def test_index_names_exactly_the_manifest_weight_files(copy) -> None:
    directory = copy("hf_sharded")
    first = sorted(directory.glob("msq_model-*.safetensors"))[0]
    (directory / "extra.safetensors").write_bytes(first.read_bytes())
    _point_index_at(directory, "extra.safetensors", sign=True)
    refused(directory, MSQFormatError, r"weight files .* differ from the ones the export loads")


def test_index_must_be_hashed(copy) -> None:
    directory = copy("hf_sharded")
    edit_json(directory / MANIFEST_NAME, lambda m: m["files"].pop(WEIGHTS_INDEX_NAME))
    refused(directory, MSQFormatError, r"'files' does not list msq_model\.safetensors\.index\.json")


def test_index_and_headers_agree(copy) -> None:
    """An index that moves a tensor to another (listed) shard is refused before transformers reads it."""
    directory = copy("hf_sharded")
    shards = sorted(p.name for p in directory.glob("msq_model-*.safetensors"))

    def move(index: dict) -> None:
        key, shard = next((k, v) for k, v in index["weight_map"].items() if v == shards[0])
        index["weight_map"][key] = shards[1]

    edit_json(directory / WEIGHTS_INDEX_NAME, move, sign=True)
    refused(directory, MSQFormatError, r"puts tensor .* but msq_model-00001")


# ------------------------------------------------------------------------------------------------
# 2. config.json is hashed; the weight file name comes from the manifest


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("hf", lambda c: c.update(hidden_act="relu")),
        ("hf", lambda c: c.update(layer_norm_eps=0.1)),
        ("hf", lambda c: c["id2label"].update({"0": "cat"})),
        ("hf", lambda c: c.update(transformers_weights="evil.safetensors")),
        ("hf", lambda c: c.update(msq_weights="evil.safetensors")),
        ("timm", lambda c: c["model_args"].update(act_layer="gelu")),
        ("timm", lambda c: c.update(msq_weights="evil.safetensors")),
    ],
)
def test_config_edits_fail_the_hash(copy, name: str, change) -> None:
    directory = copy(name)
    edit_json(directory / CONFIG_NAME, change)
    refused(directory, MSQIntegrityError, r"config\.json (fails its sha256|has \d+ bytes but)")


@pytest.mark.parametrize("key", ["transformers_weights", "msq_weights"])
def test_config_cannot_name_the_weight_file(copy, key: str) -> None:
    """Even re-signed, a weight file name in config.json other than the manifest's is refused."""
    directory = copy("hf")
    (directory / "evil.safetensors").write_bytes((directory / WEIGHTS_NAME).read_bytes())
    edit_json(directory / CONFIG_NAME, lambda c: c.update({key: "evil.safetensors"}), sign=True)
    refused(directory, MSQFormatError, r"the weight files come from msq_manifest\.json only")


def test_automodel_takes_the_weight_file_from_the_manifest(copy, built) -> None:
    """After `import msq_hf`, AutoModel ignores a transformers_weights that config.json carries."""
    directory = copy("hf")
    (directory / "evil.safetensors").write_bytes(b"not even safetensors")
    edit_json(directory / CONFIG_NAME, lambda c: c.update(transformers_weights="evil.safetensors"), sign=True)
    model = AutoModelForImageClassification.from_pretrained(directory)
    assert torch.equal(logits_of(model), built["hf"].logits)


def test_config_must_be_hashed(copy) -> None:
    directory = copy("timm")
    edit_json(directory / MANIFEST_NAME, lambda m: m["files"].pop(CONFIG_NAME))
    refused(directory, MSQFormatError, r"'files' does not list config\.json.*export it again")


def test_processor_files_are_hashed(copy, built) -> None:
    """Every file written before the manifest is hashed (a saved processor too), README and plot are not."""
    manifest = read_json(built["hf"].directory / MANIFEST_NAME)
    on_disk = {p.name for p in built["hf"].directory.iterdir()}
    assert set(manifest["files"]) == on_disk - {MANIFEST_NAME, "README.md", "bit_scheme.png"}


# ------------------------------------------------------------------------------------------------
# 3. timm model_args are allow-listed; torch.load is unreachable


def _set_model_args(directory: Path, **values) -> None:
    """Edit timm's model_args in config.json (re-signed) and in the manifest: a consistent, hostile export."""
    edit_json(directory / CONFIG_NAME, lambda c: c["model_args"].update(values), sign=True)
    args = read_json(directory / CONFIG_NAME)["model_args"]
    edit_json(directory / MANIFEST_NAME, lambda m: m["model"].update(model_args=args))


def test_checkpoint_path_is_refused_and_torch_load_never_called(copy, tmp_path: Path) -> None:
    directory = copy("timm")
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"state_dict": {}}))
    _set_model_args(directory, checkpoint_path=str(evil))
    refused(directory, MSQFormatError, r"model_args\.checkpoint_path is not allowed")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("pretrained", True),
        ("pretrained_cfg_overlay", {"file": "/tmp/x.pth"}),
        ("cache_dir", "/tmp"),
        ("features_only", True),
    ],
)
def test_other_create_model_arguments_are_refused(copy, key: str, value) -> None:
    directory = copy("timm")
    _set_model_args(directory, **{key: value})
    refused(directory, MSQFormatError, rf"model_args\.{key} is not allowed")


def test_allowed_arguments_take_plain_values_only(copy, built) -> None:
    directory = copy("timm")
    _set_model_args(directory, drop_rate=0.5)
    loads_identically(directory, built["timm"])  # eval mode: dropout is the identity
    _set_model_args(directory, act_layer={"x": 1})
    refused(directory, MSQFormatError, r"model_args\.act_layer=.* is not a plain value")


# ------------------------------------------------------------------------------------------------
# 4. provenance: the Hub revision reaches snapshot_download


def test_revision_is_passed_to_the_hub(built, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def fake_snapshot_download(**kwargs):
        seen.append(kwargs["revision"])
        return str(built["timm"].directory)

    monkeypatch.setattr(msq_hf.io.load, "snapshot_download", fake_snapshot_download)
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert torch.equal(logits_of(from_pretrained("me/tiny-msq", revision=commit)), built["timm"].logits)
    assert inspect_export("me/tiny-msq", revision=commit).ok
    assert seen == [commit, commit]


# ------------------------------------------------------------------------------------------------
# 8. malformed input: one-line errors, never a traceback


@pytest.mark.parametrize("name", ["hf", "timm"])
@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m: m.update(model="ViTForImageClassification"), r"'model' must be an object"),
        (lambda m: m.update(model=["hf"]), r"'model' must be an object"),
        (lambda m: m["files"].update({WEIGHTS_NAME: "deadbeef"}), r"files\['msq_model\.safetensors'\] is malformed"),
        (lambda m: m.update(files=["config.json"]), r"'files' must map every file"),
        (lambda m: m["model"].update(dtype="load"), r"model\.dtype='load'"),
        (lambda m: m.update(totals="big"), r"'totals' must be an object"),
        (lambda m: m["totals"].update(compression_ratio="16"), r"totals\.compression_ratio='16' disagrees"),
        (lambda m: m.update(layers=[]), r"'layers' must be a non-empty object"),
    ],
)
def test_malformed_manifest(copy, name: str, change, match: str) -> None:
    directory = copy(name)
    edit_json(directory / MANIFEST_NAME, change)
    refused(directory, MSQFormatError, match)


@pytest.mark.parametrize("depth", [40, 100_000])
def test_deeply_nested_json(copy, depth: int) -> None:
    directory = copy("hf")
    manifest = read_json(directory / MANIFEST_NAME)
    text = json.dumps(manifest)
    (directory / MANIFEST_NAME).write_text(text[:-1] + ', "x": ' + "[" * depth + "]" * depth + "}")
    refused(directory, MSQFormatError, r"nested")


@pytest.mark.parametrize("model_class", ["BertForSequenceClassification", "ViTModel", "load_tf_weights_in_vit", "nope"])
def test_wrong_model_class(copy, model_class: str) -> None:
    directory = copy("hf")
    edit_json(directory / MANIFEST_NAME, lambda m: m["model"].update({"class": model_class}))
    refused(directory, MSQFormatError, r"model\.class=.* is not a transformers")


def _rewrite_tensors(directory: Path, change) -> None:
    path = directory / WEIGHTS_NAME
    with safe_open(path, framework="pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)
    resign(directory, WEIGHTS_NAME)


def test_bad_header_of_an_unquantized_tensor(copy) -> None:
    """A valid-JSON header whose non-packed tensor has impossible offsets: refused, and inspect is not OK."""
    directory = copy("timm")
    path = directory / WEIGHTS_NAME
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    key = next(k for k in header if k != "__metadata__" and not k.rsplit(".", 1)[-1].startswith("weight_"))
    begin, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [begin, end + 4]
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    assert len(raw) == length
    path.write_bytes(data[:8] + raw + data[8 + length :])
    resign(directory, WEIGHTS_NAME)
    refused(directory, MSQIntegrityError, r"is not a valid safetensors file")


def _never_called(*args, **kwargs):
    raise AssertionError("a model was built for a config the weights cannot hold")


def test_huge_num_classes_is_bounded_by_the_weights(copy, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = copy("timm")

    def huge(config: dict) -> None:
        config["num_classes"] = config["model_args"]["num_classes"] = 10**9

    edit_json(directory / CONFIG_NAME, huge, sign=True)
    edit_json(
        directory / MANIFEST_NAME,
        lambda m: m["model"].update(num_classes=10**9, model_args=read_json(directory / CONFIG_NAME)["model_args"]),
    )
    # refused from the headers, before any model is built (building would allocate a 1e9-class head)
    monkeypatch.setattr(msq_hf.integrations.timm.timm, "create_model", _never_called)
    refused(directory, MSQFormatError, r"num_classes=1000000000 is impossible")


def test_timm_config_that_does_not_fit_the_weights_allocates_nothing(copy) -> None:
    """Within the bound, the meta-device skeleton still catches a classifier the weights do not hold."""
    directory = copy("timm")

    def more(config: dict) -> None:
        config["num_classes"] = config["model_args"]["num_classes"] = 11

    edit_json(directory / CONFIG_NAME, more, sign=True)
    edit_json(
        directory / MANIFEST_NAME,
        lambda m: m["model"].update(num_classes=11, model_args=read_json(directory / CONFIG_NAME)["model_args"]),
    )
    with pytest.raises(MSQFormatError, match=r"tensor '.*' has shape \[10"):
        from_pretrained(directory)


def test_huge_label_count_hf(copy) -> None:
    directory = copy("hf")
    labels = {str(i): f"c{i}" for i in range(200_000)}

    def huge(config: dict) -> None:
        config["id2label"], config["label2id"] = labels, {v: int(k) for k, v in labels.items()}

    edit_json(directory / CONFIG_NAME, huge, sign=True)
    refused(directory, MSQFormatError, r"len\(id2label\)=200000 is impossible")


def test_hf_config_larger_than_the_weights(copy) -> None:
    """Few labels more than the weights can hold: the meta-device skeleton refuses before anything loads."""
    directory = copy("hf")
    labels = {str(i): f"c{i}" for i in range(2000)}

    def more(config: dict) -> None:
        config["id2label"], config["label2id"] = labels, {v: int(k) for k, v in labels.items()}

    edit_json(directory / CONFIG_NAME, more, sign=True)
    with pytest.raises(MSQFormatError, match=r"describes a ViTForImageClassification with [\d,]+ parameters"):
        from_pretrained(directory)


# ------------------------------------------------------------------------------------------------
# 9/10. wrong data, confusing messages


def _first_scale_key(directory: Path) -> str:
    return next(k for k in load_file(str(directory / WEIGHTS_NAME)) if k.endswith("weight_scale"))


@pytest.mark.parametrize("name", ["hf", "timm"])
@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda t: torch.tensor([3e38], dtype=torch.float32), r"weight_scale=[\d.]+e\+38 is invalid: .* finite"),
        (lambda t: t.to(torch.float64), r"weight_scale' is stored as F64 \[1\]"),
        (lambda t: torch.tensor([1], dtype=torch.int32), r"weight_scale' is stored as I32 \[1\]"),
        (lambda t: torch.tensor([-0.5], dtype=torch.float32), r"weight_scale=-0\.5 is invalid"),
    ],
)
def test_wrong_scales_are_refused(copy, name: str, make, match: str) -> None:
    directory = copy(name)
    key = _first_scale_key(directory)
    _rewrite_tensors(directory, lambda t: t.update({key: make(t[key])}))
    error = refused(directory, MSQFormatError, match)
    assert key.removesuffix("weight_scale") in str(error)  # names the tensor


def test_false_compression_ratio_is_refused_and_inspect_shows_the_recomputed_one(copy, built) -> None:
    directory = copy("timm")
    manifest = read_json(directory / MANIFEST_NAME)
    true_ratio = layer_totals(manifest["layers"])["compression_ratio"]
    report = inspect_export(directory)
    assert report.ok and report.totals["compression_ratio"] == true_ratio
    edit_json(directory / MANIFEST_NAME, lambda m: m["totals"].update(compression_ratio=32.0))
    refused(directory, MSQFormatError, rf"totals\.compression_ratio=32\.0 disagrees .*\({true_ratio!r}\)")


def test_uppercase_sha256_is_accepted(copy, built) -> None:
    directory = copy("hf")
    edit_json(directory / MANIFEST_NAME, lambda m: [f.update(sha256=f["sha256"].upper()) for f in m["files"].values()])
    loads_identically(directory, built["hf"])


def test_malformed_sha256_says_malformed_not_corrupt(copy) -> None:
    directory = copy("hf")
    edit_json(directory / MANIFEST_NAME, lambda m: m["files"][WEIGHTS_NAME].update(sha256="sha256:abc"))
    error = refused(directory, MSQFormatError, r"manifest\.json: files\['msq_model\.safetensors'\] is malformed")
    assert "corrupt" not in str(error)


def test_inspect_on_a_non_export_exits_2(tmp_path: Path, copy) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["inspect", str(empty)]) == 2
    plain = copy("hf")
    (plain / MANIFEST_NAME).unlink()  # e.g. a plain transformers folder
    with pytest.raises(MSQMissingFileError, match="is not an msq_hf export"):
        inspect_export(plain)
    assert main(["inspect", str(plain)]) == 2


def test_readme_and_plot_are_not_read(copy, built) -> None:
    for name in ("hf", "timm"):
        directory = copy(name)
        (directory / "README.md").write_text("---\nlicense: [\n---\nanything")
        (directory / "bit_scheme.png").unlink()
        loads_identically(directory, built[name])
