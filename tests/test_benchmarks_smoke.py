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
        assert r["faults_per_step"] >= 0  # page faults per step, recorded for every row
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


def test_e2e_pypi_rows(tmp_path):
    """The PyPI package's rows (``hyper-connections``, the ``bench`` extra, installed with the tests) run in the same
    interleaved harness and write their rows; each adds its connection parameters to the residual stack."""
    out = tmp_path / "e2e.json"
    proc = _run("benchmarks.e2e", "--tiny", "--variants", "residual", "pypi-mhc", "pypi-frac", "pypi-hc",
                "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [r["variant"] for r in runs] == ["residual", "pypi-mhc", "pypi-frac", "pypi-hc"]
    for r in runs:
        assert math.isfinite(r["step_ms"]) and math.isfinite(r["loss"]) and len(r["times_ms"]) == 3
        assert r["variant"] == "residual" or r["params"] > runs[0]["params"]


def test_pypi_stack_wires_the_same_layers():
    """The PyPI rows wrap the residual stack's own layers: its HC (identical copies, one-hot input weights at init)
    computes the residual stack's function (4 summed copies, then the scale-free final RMSNorm)."""
    from benchmarks.e2e import GPTStack
    from benchmarks.pypi_stacks import PyPIStack

    torch.manual_seed(0)
    base = GPTStack(64, 2)
    x = torch.randn(2, 16, 64)
    hc = PyPIStack(base, 64, "pypi-hc")
    assert {id(p) for p in base.parameters()} < {id(p) for p in hc.parameters()}
    with torch.no_grad():
        torch.testing.assert_close(hc(x), base(x), atol=1e-5, rtol=1e-5)


def test_compiled_rows_check_their_own_function():
    """benchmarks.e2e checks every compiled row against its eager module with the parameters moved: the check passes
    for a compiled rewritten model (compiled after its original) and catches a compiled model that is not its own."""
    import hc_rewrite
    from benchmarks.compiled_check import CompiledMismatch, check_compiled
    from benchmarks.e2e import GPTStack

    torch.manual_seed(0)
    base = GPTStack(64, 2)
    x = torch.randn(2, 16, 64)
    new = hc_rewrite.rewrite(base, (x,), variant="mhc", n=4)
    torch._dynamo.reset()
    compiled_base = torch.compile(base, backend="aot_eager")
    assert check_compiled(compiled_base, base, x) <= 1e-4
    assert check_compiled(torch.compile(new, backend="aot_eager"), new, x) <= 1e-4
    before = [p.detach().clone() for p in new.parameters()]
    with pytest.raises(CompiledMismatch, match="another model's compiled code"):
        check_compiled(compiled_base, new, x)  # the original's graph timed as the rewritten model
    assert all(torch.equal(p, b) for p, b in zip(new.parameters(), before))  # parameters put back


def test_memory_small_eager(tmp_path):
    """benchmarks.memory runs end to end (eager at a small size: the compiled figures' claims are tested in
    tests/passes/test_tag_stream_recompute.py); the rewritten stack keeps more than the plain one."""
    out = tmp_path / "memory.json"
    proc = _run("benchmarks.memory", "--mode", "eager", "--d", "32", "--layers", "2", "--batch", "2", "--seq", "16",
                "--variants", "residual", "module-mhc", "module-frac", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {r["variant"]: r for r in json.loads(out.read_text())["runs"]}
    assert runs["residual"]["x_residual"] == 1.0
    assert runs["module-mhc"]["x_residual"] > runs["module-frac"]["x_residual"] > 1.0


@pytest.mark.parametrize("variant, dynamic_names", [("mhc", {"phi", "alpha"}), ("frac", {"w_y", "w_a", "w_b"}),
                                                    ("hc", {"w_m", "w_r", "w_b"})])
def test_e2e_static_rows_drop_only_the_dynamic_weights(variant, dynamic_names):
    """Rows ``module-*-static`` of benchmarks.e2e (what the input-dependent coefficients cost) are the user's model
    rewritten with the static coefficients only: the same class and static parameters as ``module-*``, none of the
    dynamic weights, and the plain stack's function at init."""
    from benchmarks import e2e

    x = torch.randn(2, 16, 32)
    names, models = {}, {}
    for row in (f"module-{variant}", f"module-{variant}-static"):
        models[row], params, _ = e2e.build(row, 32, 2, x, "cpu", False, "auto")
        assert type(models[row]) is e2e.GPTStack
        names[row] = {n.rsplit(".", 1)[-1] for n, _ in params.named_parameters() if n.startswith("hc.")}
    assert names[f"module-{variant}"] - names[f"module-{variant}-static"] == dynamic_names
    assert names[f"module-{variant}-static"] <= names[f"module-{variant}"]
    plain, _, _ = e2e.build("residual", 32, 2, x, "cpu", False, "auto")
    with torch.no_grad():
        torch.testing.assert_close(models[f"module-{variant}-static"](x), plain(x), rtol=1e-5, atol=1e-5)
