"""Two CPU ranks (torchrun, gloo) must take identical MSQ pruning decisions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "scripts" / "ddp_train.py"

pytestmark = pytest.mark.distributed


def _torchrun() -> list[str] | None:
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if exe:
        return [exe]
    try:
        import torch.distributed.run  # noqa: F401
    except ImportError:
        return None
    return [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.parametrize("qat_scale", ["mse", "learned"])
def test_two_ranks_write_identical_bit_schemes(qat_scale: str, tmp_path) -> None:
    import torch.distributed as dist

    launcher = _torchrun()
    if launcher is None or not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torchrun / torch.distributed with the gloo backend is not available in this environment")
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    cmd = launcher + ["--standalone", "--nproc_per_node", "2", str(SCRIPT), str(tmp_path), qat_scale]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    results = [json.loads((tmp_path / f"scheme_rank{r}.json").read_text()) for r in (0, 1)]
    for r, res in enumerate(results):
        assert res["rank"] == r and res["world_size"] == 2 and res["distributed"]
    a, b = results
    assert len(a["history"]) > 1, "some pruning steps must have run"
    assert a["history"] == b["history"], "ranks took different pruning decisions"
    assert a["bits"] == b["bits"] and a["phase"] == b["phase"] == "qat"
    assert a["compression"] >= 5.0
    assert min(a["bits"].values()) < 8
    # rewind_weights: each rank went back to its (identical) start, clipped it to the same fitted scales
    # (qat_scale="mse") or started every learned step there ("learned"), and cleared its optimizer state
    assert a["at_final_round"]["clip_ratios"] == b["at_final_round"]["clip_ratios"]
    assert any(c < 1 for c in a["at_final_round"]["clip_ratios"].values())
    if qat_scale == "learned":  # the steps started alike, the loss moved them, and DDP kept the ranks' steps equal
        start, end = a["at_final_round"]["steps"], a["learned_steps"]
        assert start == b["at_final_round"]["steps"] and end == b["learned_steps"]
        assert start.keys() == end.keys() == set(a["bits"]) and all(end[n] != start[n] for n in start)
    else:
        assert a["learned_steps"] == {}
    for res in results:
        seen = {k: v for k, v in res["at_final_round"].items() if k not in ("clip_ratios", "steps")}
        assert seen == {"step": a["history"][-1]["step"], "rewound": True, "optimizer_entries": 0}
    assert a["final_weights_sum"] == b["final_weights_sum"], "ranks ended with different weights"
