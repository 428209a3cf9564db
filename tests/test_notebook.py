"""``notebooks/quickstart.ipynb`` runs top to bottom (fast settings) and its export reloads bit-identically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif out.get("output_type") in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def test_notebook_is_stored_without_outputs() -> None:
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, "the notebook has no code cell"
    for i, cell in enumerate(code):
        assert cell.get("outputs") == [] and cell.get("execution_count") is None, f"code cell {i} has stored outputs"


def test_quickstart_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # the kernel inherits this environment: fast settings, eager kernels, one thread, outputs in tmp_path
    monkeypatch.setenv("MSQ_QUICKSTART_FAST", "1")
    monkeypatch.setenv("MSQ_QUICKSTART_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("MSQ_HF_COMPILE", "0")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError (with the traceback) if any cell fails
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    texts = [_text(c) for c in code]
    last = next(t for t in texts if "logits equal:" in t)
    assert "logits equal: True" in last, last
    # the bits-timeline plot was displayed as an image, and the bits did fall
    assert any(
        o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
        for c in code
        for o in c.get("outputs", [])
    )
    history = next(t for t in texts if "avg bits" in t)
    assert "avg bits 8.00" in history and "final" in history
    assert (tmp_path / "work" / "export" / "msq_manifest.json").is_file()
