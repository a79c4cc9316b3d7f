"""torchtitan, for real on 2 gloo ranks (examples/train_torchtitan.py): its Llama 3 debug model built through the
converter, torchtitan's SelectiveAC, torchtitan's per-block compile (``apply_compile``: after the checkpointing,
``fullgraph=True``), FSDP2, torchtitan's optimizer container and checkpointer wrapper with DCP. Two ranks give the
losses of one process without compile (a compiled model that computed something else would differ from it); a run
resumed from the DCP checkpoint goes on with the same losses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_torchtitan.py"


def _run(tmp_path, name, *extra, ranks=1):
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, str(SCRIPT)] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", str(SCRIPT)]
    proc = subprocess.run(cmd + ["--steps", "5", *extra, "--out", str(out)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())["losses"]


def test_two_ranks_match_one_process_and_resume_from_dcp(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    one = _run(tmp_path, "one", "--compile", "none")
    two = _run(tmp_path, "two", "--save-at", "3", "--ckpt", ckpt, ranks=2)
    resumed = _run(tmp_path, "resumed", "--resume", "3", "--ckpt", ckpt, ranks=2)
    assert len(one) == len(two) == 5 and len(resumed) == 2
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-5 * abs(a)
    for a, b in zip(two[3:], resumed):
        assert abs(a - b) <= 1e-6 * abs(a)
