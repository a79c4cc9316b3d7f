"""hc_rewrite.diagnostics (issue 24, item 1): the gains of H_res and of its product over a stream, per site, on
hand-built coefficients with known answers; mHC's doubly stochastic H_res keeps every gain at 1, HC with a large
H_res shows it; the summary, the plot and the Trainer callback."""
from __future__ import annotations

import pytest
import torch

import hc_rewrite
from hc_rewrite import diagnostics

from .conftest import PreNormMLP
from .helpers import moved_copy

D = 16


def _rewrite(variant, dynamic=True):
    torch.manual_seed(0)
    return hc_rewrite.rewrite(PreNormMLP(d=D, layers=4, d_in=D), (torch.randn(2, 5, D),), variant=variant, n=4,
                              dynamic=dynamic)


def test_hand_built_h_res_gives_the_known_per_site_and_composite_gains():
    new = _rewrite("hc", dynamic=False)
    scale = [2.0, 0.5, 3.0, 1.0]
    with torch.no_grad():  # HC static: H_res = a_r^T; a_r = s * (a permutation): every row and column sum is s
        perm = torch.eye(4)[[1, 0, 3, 2]]
        for s, params in zip(scale, new.hc.children()):
            params.a_r.copy_(s * perm)
        next(iter(new.hc.children())).a_r[0, 1] = -4.0  # one entry of another sign and size: row 0 sums to 4
    stats = diagnostics.site_stats(new, torch.randn(3, 7, D))
    assert [r["index"] for r in stats] == [0, 1, 2, 3] and {r["stream"] for r in stats} == {0}
    first = stats[0]
    # a_r[0, 1] = -4 is H_res[1, 0]: row 1 sums |-4| = 4 (forward), column 0 sums 4 (backward)
    assert first["fwd_gain"] == {"max": 4.0, "mean": 4.0} and first["bwd_gain"]["max"] == 4.0
    expected = [4.0, 4.0 * 0.5, 4.0 * 0.5 * 3.0, 4.0 * 0.5 * 3.0]
    for row, gain in zip(stats, expected):
        assert row["composite_fwd_gain"]["max"] == pytest.approx(gain)
        assert row["composite_bwd_gain"]["max"] == pytest.approx(gain)
        assert row["alpha"] is None


def test_mhc_keeps_every_gain_at_one_and_hc_with_a_large_h_res_does_not():
    mhc = moved_copy(_rewrite("mhc"), 1)
    x = torch.randn(3, 7, D)
    stats = diagnostics.site_stats(mhc, x)
    with_res = [r for r in stats if r["fwd_gain"] is not None]
    assert len(with_res) == len(stats) - 1 and stats[-1]["fwd_gain"] is None  # the last site has no H_res
    for r in with_res:  # doubly stochastic (Sinkhorn: columns exact, rows to its tolerance), per token
        for key in ("fwd_gain", "bwd_gain", "composite_fwd_gain", "composite_bwd_gain"):
            assert r[key]["max"] == pytest.approx(1.0, abs=1e-3) and r[key]["mean"] <= r[key]["max"] + 1e-12
        assert len(r["alpha"]) == 3
    hc = _rewrite("hc")
    with torch.no_grad():
        for params in hc.hc.children():
            params.a_r.mul_(3.0)
    hc_stats = diagnostics.site_stats(hc, x)
    assert hc_stats[-1]["composite_fwd_gain"]["max"] > 3.0 ** len(hc_stats) * 0.9  # grows with depth


def test_summary_plot_and_errors(tmp_path):
    new = moved_copy(_rewrite("mhc"), 1)
    x = torch.randn(2, 5, D)
    stats = diagnostics.site_stats(new, x)
    logs = diagnostics.summary(stats)
    assert set(logs) == {"hc/max_fwd_gain", "hc/max_bwd_gain", "hc/max_composite_fwd_gain",
                         "hc/max_composite_bwd_gain", "hc/h_pre_min", "hc/h_pre_max", "hc/h_post_min",
                         "hc/h_post_max"}
    assert all(isinstance(v, float) for v in logs.values())
    path = diagnostics.plot([(0, stats), (10, diagnostics.site_stats(new, x))], str(tmp_path / "gains.png"))
    assert (tmp_path / "gains.png").read_bytes()[:4] == b"\x89PNG" and path.endswith("gains.png")
    with pytest.raises(ValueError, match="not rewritten"):
        diagnostics.site_stats(PreNormMLP(d=D, d_in=D), x)


def test_trainer_callback_adds_the_summary_to_the_logs_and_keeps_history():
    new = moved_copy(_rewrite("frac"), 1)
    cb = diagnostics.DiagnosticsCallback({"x": torch.randn(2, 5, D)})
    logs = {"loss": 1.0}

    class State:
        global_step = 7

    cb.on_log(None, State(), None, model=new, logs=logs)
    assert logs["loss"] == 1.0 and "hc/h_pre_max" in logs and cb.history[0][0] == 7
