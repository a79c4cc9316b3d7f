"""place_sites_on_modules: the graph is only read; each site gets the module calls its branch enters through.
Checked on the captured graph (placements) and in numbers (the default form built from them is the original's
function at init, and the graph form's with trained connections: tests/test_default_form_placement.py)."""
from __future__ import annotations

import torch
import torch.nn as nn

import hc_rewrite
from hc_rewrite.passes.place_sites_on_modules import place_sites_on_modules
from hc_rewrite.zoo_handwritten import FunctionalEntryNet, LoopedTransformer

from ..conftest import PreNormMLP
from ..helpers import analysed, rel_err


def _placed(model, args):
    ctx = analysed(model, args)
    ops_before = [(n.op, n.target) for n in ctx.gm.graph.nodes]
    placements = place_sites_on_modules(ctx.gm, ctx.streams)
    assert [(n.op, n.target) for n in ctx.gm.graph.nodes] == ops_before  # read only
    return ctx, placements


def _exact(model, args):
    new = hc_rewrite.rewrite(model, args)
    with torch.no_grad():
        assert rel_err(model(*args), new(*args)) <= 1e-5


def test_a_branch_entering_a_submodule():
    model, x = PreNormMLP().eval(), torch.randn(2, 5, 16)
    ctx, placements = _placed(model, (x,))
    assert len(placements) == len(ctx.sites) > 0
    for p in placements:
        assert p.entries and p.calls == 1 and not p.functional
        assert p.describe().startswith("entry ")
    _exact(model, (x,))


def test_a_looped_block_gets_one_placement_per_call():
    model = LoopedTransformer(depth=3).eval()
    ids = torch.randint(0, 128, (2, 8))
    ctx, placements = _placed(model, (ids,))
    assert [p.entries for p in placements] == [["ln1"], ["ln2"]] * 3
    assert all(p.calls == 3 for p in placements)
    _exact(model, (ids,))


def test_functional_entries_name_the_ops_that_read_the_stream():
    model = FunctionalEntryNet().eval()
    ids = torch.randint(0, 128, (2, 8))
    ctx, placements = _placed(model, (ids,))
    assert [(p.functional, p.entries, p.owner) for p in placements] == [
        (["tanh"], ["gate"], ""),
        (["layer_norm"], ["layers.0.attn"], "layers.0"), (["mul"], ["layers.0.mlp"], "layers.0"),
        (["layer_norm"], ["layers.1.attn"], "layers.1"), (["mul"], ["layers.1.mlp"], "layers.1"),
    ]
    _exact(model, (ids,))


def test_a_module_call_feeding_two_sites_is_refused():
    """One call of ``norm`` feeds the branches of two sites of different streams: no hook can give each its own
    ``pre(W)``."""
    class TwoStreams(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)
            self.f, self.g = nn.Linear(16, 16), nn.Linear(16, 16)
            self.norm = nn.LayerNorm(16)

        def forward(self, x):
            u, v = self.a(x), self.b(x)
            n = self.norm(u + v)  # not a stream op: the branches of both sites below read it
            return (u + self.f(n)) * (v + self.g(n))

    model, x = TwoStreams().eval(), torch.randn(2, 5, 16)
    ctx, placements = _placed(model, (x,))
    assert [p.site.name for p in placements] == ["add_1"] and placements[0].functional == ["add"]
    refused = [s for s in ctx.sites if s.reason]
    assert [s.name for s in refused] == ["add_2"]
    assert "'norm' (call L__self__norm) is shared with site add_1" in refused[0].reason
    _exact(model, (x,))
