"""The property of issue 12: whatever happens to one file of an export, loading either refuses with an ``MSQError``
and a one-line message, or gives a model whose logits are bit-identical to the exported one. Nothing else: no other
exception type, no silently different model; ``inspect_export`` agrees with the loader and ``msq-hf inspect`` exits
0 exactly when the export loads.

Three exports (raw timm, HF ViT, sharded HF ViT) are built once per module; every file of each is mutated from a
seeded table: byte flips at several offsets, truncation, deletion, appended bytes, and for the JSON files type changes
of each top-level key (and of the keys one level down in the manifest), deep nesting, path-traversal names and
added keys. README.md and bit_scheme.png are never read by the loader: their mutations must load identically.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from export_cases import BuiltExport, build_exports, copy_export, logits_of

from msq_hf.commands.main import main
from msq_hf.errors import MSQError
from msq_hf.io.format import CONFIG_NAME, MANIFEST_NAME, WEIGHTS_INDEX_NAME
from msq_hf.io.inspect import format_report, inspect_export
from msq_hf.io.load import from_pretrained

Mutation = Callable[[Path], None]  # changes one file in place (or deletes it)
ROLES = ("config", "manifest", "weights", "last_shard", "index", "readme", "plot")
NOT_READ = ("readme", "plot")  # never read by the loader: any mutation must load identically
TYPE_SWAPS = (None, "x", 0, -1, 1.5, True, [], {}, ["x"], {"x": 1})
CLI_EVERY = 7  # run `msq-hf inspect` on every 7th mutated export (the CLI adds argument parsing and exit codes)


@pytest.fixture(autouse=True)
def no_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BuiltExport]:
    return build_exports(tmp_path_factory.mktemp("mutations"))


def role_file(directory: Path, role: str) -> Path | None:
    shards = sorted(directory.glob("msq_model-*.safetensors"))
    paths = {
        "config": directory / CONFIG_NAME,
        "manifest": directory / MANIFEST_NAME,
        "weights": shards[0] if shards else directory / "msq_model.safetensors",
        "last_shard": shards[-1] if len(shards) > 1 else None,
        "index": directory / WEIGHTS_INDEX_NAME if shards else None,
        "readme": directory / "README.md",
        "plot": directory / "bit_scheme.png",
    }
    return paths[role]


# ------------------------------------------------------------------------------------------------
# the mutation table


def _bytes(change: Callable[[bytes], bytes]) -> Mutation:
    def apply(path: Path) -> None:
        path.write_bytes(change(path.read_bytes()))

    return apply


def _flip(where: Callable[[int], int]) -> Mutation:
    def change(data: bytes) -> bytes:
        if not data:
            return b"\x01"
        i = where(len(data)) % len(data)
        return data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1 :]

    return _bytes(change)


def _json(change: Callable[[dict], object]) -> Mutation:
    def apply(path: Path) -> None:
        data = json.loads(path.read_text())
        result = change(data)
        path.write_text(json.dumps(data if result is None else result))

    return apply


def byte_mutations(seed: int) -> Iterator[tuple[str, Mutation]]:
    rng = random.Random(seed)
    offsets = [0, 3, 7, 8, 9, 20, -1, -2, -8] + [rng.randrange(1 << 30) for _ in range(4)]
    for off in offsets:
        yield f"flip@{off}", _flip(lambda n, off=off: off if off >= 0 else n + off)
    yield "flip@middle", _flip(lambda n: n // 2)
    yield "delete", lambda path: path.unlink()
    yield "empty", _bytes(lambda d: b"")
    yield "truncate-1", _bytes(lambda d: d[:-1])
    yield "truncate-half", _bytes(lambda d: d[: len(d) // 2])
    yield "truncate-8", _bytes(lambda d: d[:8])
    yield "append-nul", _bytes(lambda d: d + b"\x00")
    yield "append-space", _bytes(lambda d: d + b" ")
    yield "append-json", _bytes(lambda d: d + b'{"x": 1}')
    yield "duplicate", _bytes(lambda d: d + d)
    yield "directory", lambda path: (path.unlink(), path.mkdir())


def json_mutations(path: Path, role: str, seed: int) -> Iterator[tuple[str, Mutation]]:
    data = json.loads(path.read_text())
    rng = random.Random(seed)
    keys = sorted(data)
    if role == "config":  # config.json is hashed: a sample of keys is enough to show it
        keys = rng.sample(keys, min(6, len(keys)))
    for key in keys:
        for value in TYPE_SWAPS:
            yield f"{key}={value!r}", _json(lambda d, key=key, value=value: d.__setitem__(key, value))
        yield f"del {key}", _json(lambda d, key=key: d.pop(key))
    if role == "manifest":  # not hashed itself: every field one level down too
        for key in ("model", "totals", "files", "layers"):
            for sub in sorted(data[key]):
                for value in (None, "x", -1, 1e300, [], {}):
                    yield f"{key}.{sub}={value!r}", _json(lambda d, k=key, s=sub, v=value: d[k].__setitem__(s, v))
        layer = next(iter(data["layers"]))
        for sub in sorted(data["layers"][layer]):
            for value in (None, "x", 0, 9, 2**62, [], {}, "../x.weight_packed"):
                yield (
                    f"layers[0].{sub}={value!r}",
                    _json(lambda d, s=sub, v=value, n=layer: d["layers"][n].__setitem__(s, v)),
                )
        weight = next(n for n in data["files"] if n.endswith(".safetensors"))
        for evil in ("../" + weight, "/tmp/" + weight, "sub/" + weight, ".", ""):
            yield (
                f"files rename {evil!r}",
                _json(lambda d, w=weight, e=evil: d["files"].__setitem__(e, d["files"].pop(w))),
            )
        yield "weights=../", _json(lambda d: d.__setitem__("weights", "../" + d["weights"]))
        yield "sha256 upper", _json(lambda d: [f.update(sha256=f["sha256"].upper()) for f in d["files"].values()])
        yield "files add README", _json(lambda d: d["files"].__setitem__("README.md", {"size": 1, "sha256": "0" * 64}))
        yield "layers add ghost", _json(lambda d: d["layers"].__setitem__("ghost", dict(d["layers"][layer])))
        yield (
            "totals scaled",
            _json(lambda d: d["totals"].update(compression_ratio=d["totals"]["compression_ratio"] * 2)),
        )
    if role == "index":
        yield (
            "weight_map ../",
            _json(lambda d: d.__setitem__("weight_map", {k: "../" + v for k, v in d["weight_map"].items()})),
        )
        yield (
            "weight_map one shard",
            _json(
                lambda d: d.__setitem__(
                    "weight_map", dict.fromkeys(d["weight_map"], sorted(d["weight_map"].values())[0])
                )
            ),
        )
    yield "added key", _json(lambda d: d.__setitem__("zz_added", {"a": [1, 2]}))
    yield "deep nesting 40", _json(lambda d: d.__setitem__("zz_deep", json.loads("[" * 40 + "]" * 40)))
    yield "deep nesting 100k", _bytes(lambda raw: b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    yield "top-level list", _json(lambda d: [d])
    yield "NaN", _bytes(lambda raw: raw.replace(b"1", b"NaN", 1))


def mutations(path: Path, role: str, seed: int) -> Iterator[tuple[str, Mutation]]:
    yield from byte_mutations(seed)
    if path.suffix == ".json":
        yield from json_mutations(path, role, seed)


# ------------------------------------------------------------------------------------------------
# the property


def outcome(directory: Path, built: BuiltExport) -> tuple[str | None, bool]:
    """(what went wrong or ``None``, whether the export loaded). Behaving = refused in one line with an
    ``MSQError``, or loaded with identical logits; ``inspect_export`` must agree either way."""
    try:
        model = from_pretrained(directory)
    except MSQError as exc:
        message = str(exc).strip()
        if not message or "\n" in message:
            return f"refused with a multi-line message: {message[:200]!r}", False
        loaded = False
    except Exception as exc:  # the property under test: nothing but MSQError
        return f"from_pretrained raised {type(exc).__name__}: {str(exc)[:200]}", False
    else:
        if not torch.equal(logits_of(model), built.logits):
            return "loaded a model with different logits", True
        loaded = True
    try:
        report = inspect_export(directory)
    except MSQError:
        inspected = False
    except Exception as exc:
        return f"inspect_export raised {type(exc).__name__}: {str(exc)[:200]}", loaded
    else:
        inspected = report.ok
        format_report(report)
        json.dumps(report.to_dict())
    if inspected != loaded:
        return f"inspect says ok={inspected} but from_pretrained {'loaded' if loaded else 'refused'}", loaded
    return None, loaded


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("case", ["timm", "hf", "hf_sharded"])
def test_every_mutation_refuses_or_loads_identically(
    built: dict[str, BuiltExport], tmp_path: Path, case: str, role: str, capsys: pytest.CaptureFixture
) -> None:
    source = role_file(built[case].directory, role)
    if source is None:
        pytest.skip(f"a {case} export has no {role} file")
    failures, count = [], 0
    for i, (label, mutate) in enumerate(mutations(source, role, seed=ROLES.index(role) * 31 + len(case))):
        directory = copy_export(built[case], tmp_path / f"m{i}")
        mutate(directory / source.name)
        problem, loaded = outcome(directory, built[case])
        if problem is None and role in NOT_READ and not loaded:
            problem = f"refused although {source.name} is never read"
        if problem is None and i % CLI_EVERY == 0:
            code = main(["inspect", str(directory)])
            if code != (0 if loaded else code) or code not in (0, 1, 2):
                problem = f"msq-hf inspect exited {code} (loads: {loaded})"
        if problem is not None:
            failures.append(f"{source.name} / {label}: {problem}")
        shutil.rmtree(directory)
        count += 1
    capsys.readouterr()  # the CLI's reports
    assert count > 10
    assert not failures, f"{len(failures)} of {count} mutations misbehave:\n" + "\n".join(failures[:40])
