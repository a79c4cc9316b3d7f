"""benchmarks/seed_study.py's statistics on runs with known numbers: the mean and its Student-t interval, the paired
differences to the residual run of the same seed, tokens to reach residual's final loss, and the files it writes
from the runs on disk (the study itself is a long background run: benchmarks/training.md)."""
from __future__ import annotations

import json
import math

import pytest

from benchmarks import seed_study


def test_mean_ci_is_students_t_interval():
    stat = seed_study.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert stat["mean"] == 3.0 and stat["std"] == pytest.approx(math.sqrt(2.5))
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4 df)
    assert (stat["lo"], stat["hi"]) == (pytest.approx(3 - half), pytest.approx(3 + half))
    assert math.isnan(seed_study.mean_ci([1.0])["std"])


def _run(final, curve, tokens_per_s):
    points = [(i * 10, i * 1000, v) for i, v in enumerate(curve + [final])]
    return dict(final_val_loss=final, val_points=points, tokens_per_s=tokens_per_s, hc_params=7, tokens=len(curve) * 1000)


def _runs():
    # residual ends at 2.0; the variant is 0.1 lower in seed 0 and 0.3 lower in seed 1 (paired mean -0.2)
    return {
        "residual": {0: _run(2.0, [3.0, 2.5], 100.0), 1: _run(2.5, [3.2, 2.8], 100.0)},
        "hc": {0: _run(1.9, [3.0, 1.95], 50.0), 1: _run(2.2, [3.1, 2.6], 80.0)},
    }


def test_paired_differences_tokens_to_reach_and_speed():
    summary = seed_study.summarize_lm(_runs())
    hc = summary["hc"]
    assert hc["diff_by_seed"] == {0: pytest.approx(-0.1), 1: pytest.approx(-0.3)}
    assert hc["diff"]["mean"] == pytest.approx(-0.2) and hc["diff"]["hi"] > 0  # two seeds: a wide interval
    assert hc["reach_by_seed"] == {0: 1000, 1: 2000}  # seed 0 below 2.0 at its first evaluation, seed 1 at its last
    assert hc["reach_share"]["mean"] == pytest.approx(0.75)
    assert hc["speed_vs_residual"]["mean"] == pytest.approx(0.65)
    assert "residual" in summary and "diff" not in summary["residual"]
    table = seed_study.lm_table(summary)
    assert "-0.2000 [" in table and "2 of 2" in table


def test_summarize_writes_tables_plots_and_json_from_the_runs_on_disk(tmp_path):
    for variant, by_seed in _runs().items():
        for seed, result in by_seed.items():
            folder = tmp_path / "runs" / "lm" / f"seed{seed}-{variant}"
            folder.mkdir(parents=True)
            config = dict(d=8, layers=1, seq=4, steps=2, batch=1)
            (folder / "train_lm_cpu.json").write_text(json.dumps(dict(config=config, results=[result])))
    out = seed_study.summarize(tmp_path / "runs", tmp_path / "plots", "cmd")
    assert out["lm"]["hc"]["diff"]["mean"] == pytest.approx(-0.2)
    assert (tmp_path / "plots" / "seed_study_lm.png").stat().st_size > 0
    assert "| HC n=4 | 2 |" in (tmp_path / "runs" / "seed_study.md").read_text()
    assert json.loads((tmp_path / "runs" / "seed_study.json").read_text())["lm"]["hc"]["reached"] == 2
