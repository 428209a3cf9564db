"""Writing an export never loses a user file (issue 12, items 5-7 and the unwritable-output message).

* ``overwrite=True`` only replaces an msq_hf export; the current directory, ``$HOME``, a folder holding the
  source or anything that is not an export needs ``overwrite="force"``, and the refusal lists what would go;
* check and install are one step (``renameat2``; a locked fallback elsewhere): files written into the target
  meanwhile survive, and of two racing exports exactly one wins;
* a kill at any point leaves the old or the new export; temporaries of dead processes are cleaned up.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import timm
import torch

import msq_hf
import msq_hf.io.card as card
import msq_hf.io.files as files
from msq_hf.commands.main import main
from msq_hf.errors import MSQExportError
from msq_hf.io.files import TMP_MARK, atomic_directory, check_target, clean_stale_temporaries
from msq_hf.io.format import MANIFEST_NAME

FALLBACK = pytest.param(True, id="lock-fallback")
RENAMEAT2 = pytest.param(
    False,
    id="renameat2",
    marks=pytest.mark.skipif(files._RENAMEAT2 is None, reason="no renameat2 on this platform"),
)


def quantized_resnet() -> torch.nn.Module:
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    msq_hf.quantize_model(model, msq_hf.MSQConfig(init_bits=4))
    return model


def fake_export(folder: Path, tag: str = "old") -> Path:
    """A folder that looks like an export (flat, with a manifest), tagged to tell old from new."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST_NAME).write_text(json.dumps({"tag": tag}))
    (folder / "msq_model.safetensors").write_bytes(tag.encode() * 100)
    return folder


def tag_of(folder: Path) -> str:
    return json.loads((folder / MANIFEST_NAME).read_text())["tag"]


def temporaries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if TMP_MARK in p.name)


@pytest.fixture(params=[RENAMEAT2, FALLBACK])
def fallback(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run a test with renameat2 and with the lock-file fallback (as on macOS/Windows or NFS)."""
    if request.param:
        monkeypatch.setattr(files, "_RENAMEAT2", None)
    return request.param


# ------------------------------------------------------------------------------------------------
# 5. what overwrite=True may replace


def test_cli_refuses_to_overwrite_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``msq-hf export myexport . --overwrite`` used to replace the whole working directory."""
    msq_hf.export(quantized_resnet(), tmp_path / "myexport")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "train.py").write_text("print()")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path)
    code = main(["export", "myexport", ".", "--overwrite"])
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in ("current directory", "contains the model being exported", "--force-overwrite", "notes.txt"):
        assert needle in lines[0], lines[0]
    assert "would delete 7 files and 2 folders" in lines[0]  # 5 export files + notes.txt + src/train.py
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    "case, reason",
    [
        ("cwd", "current directory"),
        ("home", "home directory"),
        ("ancestor", "contains the model being exported"),
        ("not_export", "not an msq_hf export (no msq_manifest.json)"),
        ("subfolders", "sub-folders"),
    ],
)
def test_overwrite_needs_force_for_anything_but_an_export(
    case: str, reason: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "target"
    sources: list[Path] = []
    if case == "not_export":
        target.mkdir()
        (target / "thesis.tex").write_text("x")
    else:
        fake_export(target)
    if case == "cwd":
        monkeypatch.chdir(target)
    elif case == "home":
        monkeypatch.setenv("HOME", str(target))
    elif case == "ancestor":
        sources = [fake_export(target / "runs" / "src")]
    elif case == "subfolders":
        (target / "data").mkdir()
    listing = sorted(p.name for p in target.rglob("*"))
    with pytest.raises(MSQExportError, match="refusing to overwrite") as info:
        check_target(target, True, sources)
    assert reason in str(info.value) and "would delete" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(MSQExportError, match="refusing to overwrite"), atomic_directory(target, True, sources) as tmp:
        (tmp / MANIFEST_NAME).write_text("{}")
    assert sorted(p.name for p in target.rglob("*")) == listing and temporaries(tmp_path) == []
    # the stronger argument replaces it
    assert check_target(target, "force", sources) == target
    with atomic_directory(target, "force", sources) as tmp:
        (tmp / MANIFEST_NAME).write_text(json.dumps({"tag": "new"}))
    assert sorted(p.name for p in target.iterdir()) == [MANIFEST_NAME] and tag_of(target) == "new"


def test_export_overwrite_replaces_an_export_and_refuses_other_folders(tmp_path: Path) -> None:
    model = quantized_resnet()
    msq_hf.export(model, tmp_path / "exp")
    msq_hf.export(model, tmp_path / "exp", overwrite=True)  # an export: replaced as before
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "results.csv").write_text("1,2")
    with pytest.raises(MSQExportError, match=r"not an msq_hf export.*1 file and 0 folders \(results.csv\)"):
        msq_hf.export(model, tmp_path / "work", overwrite=True)
    assert (tmp_path / "work" / "results.csv").read_text() == "1,2"
    msq_hf.export(model, tmp_path / "work", overwrite="force")
    assert (tmp_path / "work" / MANIFEST_NAME).is_file() and not (tmp_path / "work" / "results.csv").exists()
    with pytest.raises(MSQExportError, match="False, True or 'force'"):
        msq_hf.export(model, tmp_path / "exp", overwrite="yes")  # type: ignore[arg-type]


def test_root_is_never_replaced() -> None:
    with pytest.raises(MSQExportError, match="root of the file system"):
        check_target("/", "force")


# ------------------------------------------------------------------------------------------------
# 6. check and install in one step


@pytest.mark.parametrize("empty_at_start", [False, True])
def test_files_written_into_the_target_meanwhile_survive(tmp_path: Path, fallback: bool, empty_at_start: bool) -> None:
    target = tmp_path / "exp"
    if empty_at_start:
        target.mkdir()
    with pytest.raises(MSQExportError, match="while the export was written"), atomic_directory(target) as tmp:
        fake_export(tmp, "new")
        target.mkdir(exist_ok=True)
        (target / "user.txt").write_text("keep me")
    assert (target / "user.txt").read_text() == "keep me" and sorted(os.listdir(target)) == ["user.txt"]
    assert temporaries(tmp_path) == []


def test_overwrite_keeps_an_export_that_changed_meanwhile(tmp_path: Path, fallback: bool) -> None:
    target = fake_export(tmp_path / "exp")
    with pytest.raises(MSQExportError, match="changed while"), atomic_directory(target, True) as tmp:
        fake_export(tmp, "new")
        (target / "notes.md").write_text("added while exporting")
    assert (target / "notes.md").is_file() and tag_of(target) == "old"
    assert temporaries(tmp_path) == []
    with atomic_directory(target, True) as tmp:  # unchanged: replaced, nothing left over
        fake_export(tmp, "new")
    assert tag_of(target) == "new" and sorted(os.listdir(tmp_path)) == ["exp"]


FORK = multiprocessing.get_context("fork")  # real processes that need not import torch again


def race(target: Path, me: str, go: Path, fallback: bool) -> None:
    if fallback:
        files._RENAMEAT2 = None
    try:
        with atomic_directory(target) as tmp:
            (tmp / MANIFEST_NAME).write_text(json.dumps({"tag": me}))
            Path(f"{go}.{me}").touch()  # ready
            while not go.exists():
                time.sleep(0.01)
    except MSQExportError as exc:
        Path(f"{go}.{me}.error").write_text(str(exc))
        os._exit(3)
    os._exit(0)


def test_two_processes_racing_for_one_folder(tmp_path: Path, fallback: bool) -> None:
    target, go = tmp_path / "out" / "exp", tmp_path / "go"
    procs = {me: FORK.Process(target=race, args=(target, me, go, fallback)) for me in ("a", "b")}
    for proc in procs.values():
        proc.start()
    deadline = time.time() + 60
    while not all(Path(f"{go}.{me}").exists() for me in procs):  # both have written their folder
        assert time.time() < deadline and all(p.is_alive() for p in procs.values())
        time.sleep(0.01)
    assert not target.exists()  # neither is installed before it finishes
    go.touch()
    for proc in procs.values():
        proc.join(60)
    codes = {me: p.exitcode for me, p in procs.items()}
    assert sorted(codes.values()) == [0, 3], codes
    message = Path(f"{go}.{next(me for me, code in codes.items() if code == 3)}.error").read_text()
    assert "appeared while the export was written" in message and str(target) in message
    assert tag_of(target) == next(me for me, code in codes.items() if code == 0)
    assert temporaries(target.parent) == []


def test_two_threads_exporting_to_one_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_a, model_b = quantized_resnet(), quantized_resnet()
    msq_hf.set_bit_scheme(model_b, {n: 2 for n in msq_hf.bit_scheme(model_b)})
    barrier = threading.Barrier(2, timeout=60)
    plot = card.plot_bit_scheme

    def plot_then_wait(*args, **kwargs):  # both finish writing before either installs
        plot(*args, **kwargs)
        barrier.wait()

    monkeypatch.setattr(card, "plot_bit_scheme", plot_then_wait)
    outcome: dict[str, object] = {}

    def run(name: str, model) -> None:
        try:
            outcome[name] = msq_hf.export(model, tmp_path / "exp")
        except Exception as exc:  # noqa: BLE001 - recorded and checked below
            outcome[name] = exc

    threads = [threading.Thread(target=run, args=(n, m)) for n, m in (("a", model_a), ("b", model_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [n for n, r in outcome.items() if isinstance(r, msq_hf.ExportResult)]
    losers = [r for r in outcome.values() if not isinstance(r, msq_hf.ExportResult)]
    assert len(winners) == 1 and len(losers) == 1 and isinstance(losers[0], MSQExportError), outcome
    manifest = json.loads((tmp_path / "exp" / MANIFEST_NAME).read_text())
    assert manifest == outcome[winners[0]].manifest
    assert sorted(os.listdir(tmp_path)) == ["exp"]


# ------------------------------------------------------------------------------------------------
# 7. kills and stale temporaries


def killed_export(target: Path, point: str) -> None:
    """Replace ``target`` with a new export and die (``os._exit``, no clean-up) at ``point``."""
    if point.startswith("fallback"):
        files._RENAMEAT2 = None
    real_rename, real_rmtree, renames = os.rename, shutil.rmtree, []

    def rename(src, dst):
        renames.append(dst)
        if point == "fallback-between-renames" and len(renames) == 2:
            os._exit(9)  # the old export has been moved aside, the new one is not yet in place
        real_rename(src, dst)

    def rmtree(path, *args, **kwargs):
        if point in ("after-install", "fallback-after-install"):
            os._exit(9)  # the new export is in place, the old one not yet deleted
        real_rmtree(path, *args, **kwargs)

    files.os.rename, files.shutil.rmtree = rename, rmtree  # only in this forked child
    with atomic_directory(target, True) as tmp:
        (tmp / MANIFEST_NAME).write_text(json.dumps({"tag": "new"}))
        if point == "writing":
            os._exit(9)
    os._exit(0)


@pytest.mark.parametrize(
    "point, survivor",
    [
        ("writing", "old"),
        pytest.param(
            "after-install",
            "new",
            marks=pytest.mark.skipif(files._RENAMEAT2 is None, reason="no renameat2 on this platform"),
        ),
        ("fallback-between-renames", "old"),
        ("fallback-after-install", "new"),
    ],
)
def test_a_kill_leaves_the_old_or_the_new_export(tmp_path: Path, point: str, survivor: str) -> None:
    target = fake_export(tmp_path / "exp")
    proc = FORK.Process(target=killed_export, args=(target, point))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 9
    assert temporaries(tmp_path), "the killed export left its temporary folder"
    # the next export cleans up (and puts an old export that was moved aside back first)
    with pytest.raises(MSQExportError, match="not empty"), atomic_directory(target):
        pass
    assert temporaries(tmp_path) == []
    assert tag_of(target) == survivor


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid is free
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "dead": f".exp{TMP_MARK}{files._HOST}-{dead.pid}-new-x1",
            "dead_other_name": f".other{TMP_MARK}{files._HOST}-{dead.pid}-old-x2",
            "alive": f".exp{TMP_MARK}{files._HOST}-{alive.pid}-new-x3",
            "other_host": f".exp{TMP_MARK}{'0' * 8}-{dead.pid}-new-x4",
            "ours": f".exp{TMP_MARK}{files._HOST}-{os.getpid()}-new-x5",
        }
        for name in names.values():
            (tmp_path / name).mkdir()
            (tmp_path / name / "w.safetensors").write_bytes(b"0")
        with atomic_directory(tmp_path / "exp") as tmp:
            fake_export(tmp, "new")
        left = set(temporaries(tmp_path))
        assert left == {names["alive"], names["other_host"], names["ours"]}
        assert tag_of(tmp_path / "exp") == "new"
        assert not (tmp_path / "other").exists()  # an "old" aside with no export to restore is just removed
        assert clean_stale_temporaries(tmp_path) == []
    finally:
        alive.kill()
        alive.wait()


# ------------------------------------------------------------------------------------------------
# 10. errors name the user's path, never a temporary one


def test_unwritable_output_names_the_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(prefix: str, dir: str) -> str:  # as in a read-only folder (the tests may run as root)
        raise PermissionError(13, "Permission denied", os.path.join(dir, prefix + "abc"))

    monkeypatch.setattr(files.tempfile, "mkdtemp", denied)
    with pytest.raises(MSQExportError) as info:
        msq_hf.export(quantized_resnet(), tmp_path / "exp")
    message = str(info.value)
    assert str(tmp_path / "exp") in message and "not writable" in message and TMP_MARK not in message


def test_failed_write_names_the_file_and_the_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(manifest, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(card, "plot_bit_scheme", disk_full)
    with pytest.raises(MSQExportError) as info:
        msq_hf.export(quantized_resnet(), tmp_path / "exp")
    message = str(info.value)
    assert "bit_scheme.png" in message and str(tmp_path / "exp") in message and TMP_MARK not in message
    assert os.listdir(tmp_path) == []
