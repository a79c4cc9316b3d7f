"""Distributed training of a rewritten model, for real: ``torchrun`` with 2 ranks and gloo on the CPU.

examples/train_fsdp.py rewrites a HF Llama (mHC n=4, the structure-preserving form), puts activation
checkpointing, torch.compile and FSDP2 ``fully_shard`` on every decoder layer (then the root), or DDP, and trains
on the standard-library corpus. Two ranks must give the per-step losses of one process on the same global batch, and
that process the losses of one with neither compile nor checkpointing (so a wrong compiled model, the same on every
rank, cannot pass).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_fsdp.py"
COMMON = ["--steps", "3", "--hidden", "32", "--layers", "2", "--seq", "32", "--batch", "4", "--compile", "aot_eager"]


def _run(tmp_path, name, *extra, ranks=1):
    out = tmp_path / f"{name}.json"
    if ranks == 1:
        cmd = [sys.executable, str(SCRIPT)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", str(SCRIPT)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd + COMMON + list(extra) + ["--out", str(out)], capture_output=True, text=True,
                          timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("single"), "single")


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_two_ranks_give_the_losses_of_one_process(single, tmp_path, parallel):
    got = _run(tmp_path, parallel, "--parallel", parallel, ranks=2)
    assert got["world"] == 2 and got["variant"] == "mhc"
    ref = single["losses"]
    assert len(got["losses"]) == len(ref) == 3
    for a, b in zip(ref, got["losses"]):
        assert abs(a - b) <= 1e-5 * abs(a)
    assert ref[-1] < ref[0]  # and it trains


def test_compile_and_checkpointing_give_the_losses_of_the_plain_eager_run(single, tmp_path):
    eager = _run(tmp_path, "eager", "--compile", "none", "--no-checkpointing")
    for a, b in zip(eager["losses"], single["losses"]):
        assert abs(a - b) <= 1e-5 * abs(a)
