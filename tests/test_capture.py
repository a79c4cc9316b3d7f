"""Capture: never a silent fall-back to static shapes, and a failed capture is one clear error, not thousands of
lines of graph on the terminal."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import hc_rewrite
from hc_rewrite.capture import StaticShapesWarning, capture
from hc_rewrite.errors import CaptureError


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


class DataDependentLoop(Residual):
    """Branches on the data after every layer: neither export nor symbolic_trace can capture it."""

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
            if x.sum() > 0:
                x = x * 2
        return x


def test_dynamic_capture_is_dynamic_and_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaticShapesWarning)
        captured = capture(Residual().eval(), (torch.randn(2, 5, 16),))
    assert captured.shapes == "dynamic"
    sizes = [str(d) for d in next(n for n in captured.gm.graph.nodes if n.op == "placeholder"
                                  and n.name.startswith("x")).meta["val"].shape]
    assert sizes[-1] == "16" and not sizes[0].isdigit() and not sizes[1].isdigit()


def test_failed_dynamic_capture_warns_and_says_so_in_the_report(monkeypatch):
    real = torch.export.export

    def no_dynamic(*args, dynamic_shapes=None, **kwargs):
        if dynamic_shapes is not None:
            raise RuntimeError("Constraints violated (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", no_dynamic)
    model, x = Residual().eval(), torch.randn(2, 5, 16)
    with pytest.warns(StaticShapesWarning, match="Constraints violated"):
        new = hc_rewrite.rewrite(model, (x,), form="graph")
    rep = new.hc_report
    assert rep.shapes.startswith("static shapes") and "Constraints violated" in rep.shapes
    assert "capture: static shapes" in str(rep)
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x))
    with pytest.raises(Exception, match="[Gg]uard"):
        new(torch.randn(3, 5, 16))  # specialised, and says so when called outside it


def test_symbolic_trace_fallback_is_static_and_warns(monkeypatch):
    import hc_rewrite.capture as cap

    def no_export(*a, **k):
        raise RuntimeError("export disabled for this test")

    monkeypatch.setattr(cap, "_export", no_export)
    with pytest.warns(StaticShapesWarning, match="symbolic_trace"):
        captured = capture(Residual().eval(), (torch.randn(2, 5, 16),))
    assert captured.method == "torch.fx.symbolic_trace" and captured.shapes.startswith("static shapes")


def test_failed_capture_is_one_error_not_a_graph_dump(capfd):
    """The graph form needs a replayable capture: a model neither export nor symbolic_trace captures is one
    CaptureError (the default form finds its sites in a trace of one call: test_default_form_placement)."""
    model, x = DataDependentLoop().eval(), torch.randn(2, 5, 16)
    with pytest.raises(CaptureError) as info:
        hc_rewrite.rewrite(model, (x,), form="graph")
    out, err = capfd.readouterr()
    assert len(err.splitlines()) < 3 and "def forward" not in err  # nothing dumped on the terminal
    msg = str(info.value)
    assert "torch.export (non-strict)" in msg and "torch.fx.symbolic_trace" in msg
    assert "torch printed" in msg and len(msg.splitlines()) < 20  # a short excerpt, in the error


def test_hf_catch_all_kwargs_stay_dynamic(zoo_model):
    """``output_hidden_states=True`` goes through HF's ``**kwargs``: the capture stays dynamic (the constant is
    bound into the graph), and the graph form serves another batch and length with the right hidden states."""
    from hc_rewrite.zoo import ZOO

    model = zoo_model("llama")
    args, kwargs = ZOO["llama"].inputs(generator=torch.Generator().manual_seed(0))
    kwargs = dict(kwargs, output_hidden_states=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaticShapesWarning)
        captured = capture(model, args, kwargs)
        new = hc_rewrite.rewrite(model, args, kwargs, form="graph")
    assert captured.shapes == "dynamic" and captured.baked == {"output_hidden_states": True}
    a2, k2 = ZOO["llama"].other_inputs(torch.Generator().manual_seed(1))
    k2 = dict(k2, output_hidden_states=True)
    with torch.no_grad():
        ref, got = model(*a2, **k2), new(*a2, **k2)
    assert len(got.hidden_states) == len(ref.hidden_states) == 3
    for a, b in zip(ref.hidden_states, got.hidden_states):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="output_hidden_states"):
        new(*a2, **dict(k2, output_hidden_states=False))  # baked in: a different value is an error
