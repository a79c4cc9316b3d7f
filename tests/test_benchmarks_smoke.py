"""The benchmark scripts run end to end: ``benchmarks.e2e --tiny`` on the CPU (all four variants, eager),
and both scripts exit cleanly with a message where there is no CUDA device."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_e2e_tiny(tmp_path):
    out = tmp_path / "e2e.json"
    proc = _run("benchmarks.e2e", "--tiny", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [r["variant"] for r in res["runs"]] == ["residual", "mhc", "frac", "hc"]
    for r in res["runs"]:
        assert math.isfinite(r["step_ms"]) and r["step_ms"] > 0 and math.isfinite(r["loss"])
    params = {r["variant"]: r["params"] for r in res["runs"]}
    assert params["mhc"] > params["residual"] and params["hc"] > params["residual"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA these run the real (long) benchmarks")
@pytest.mark.parametrize("module", ["benchmarks.kernels", "benchmarks.e2e"])
def test_without_cuda_exits_cleanly(module):
    proc = _run(module, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no CUDA device" in proc.stdout


def test_forms_tiny(tmp_path):
    """benchmarks.forms (both forms vs residual, eager CPU) runs end to end and writes its rows."""
    out = tmp_path / "forms.json"
    proc = _run("benchmarks.forms", "--tiny", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["runs"]
    assert {(r["variant"], r["form"]) for r in rows} == {
        ("residual", "-"), *((v, f) for v in ("mhc", "frac", "hc") for f in ("graph", "module"))}
    assert all(math.isfinite(r["step_ms"]) and r["step_ms"] > 0 for r in rows)
