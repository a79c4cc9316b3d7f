"""group_residual_streams: sites chained into streams (through link ops), dominance refusals, kinds.
The graph and its numbers do not change."""
import pytest
import torch
import torch.nn as nn

from hc_rewrite.passes import find_residual_sites, group_residual_streams, infer_feature_axes

from ..helpers import analysed


def _prepare(model, args):
    """The graph as the pipeline hands it to the detection passes."""
    return analysed(model, args, until="find_residual_sites").gm


def _group(gm):
    sites = infer_feature_axes(gm, find_residual_sites(gm))
    sig, code = [(n.op, str(n.target), n.name) for n in gm.graph.nodes], gm.code
    streams = group_residual_streams(gm, sites)
    assert [(n.op, str(n.target), n.name) for n in gm.graph.nodes] == sig and gm.code == code
    return sites, streams


class DropLinkNet(nn.Module):
    """``h = drop(h + f(h))``: the dropout after each add links one site to the next."""

    def __init__(self, d=32):
        super().__init__()
        self.inp = nn.Linear(16, d)
        self.f = nn.ModuleList(nn.Linear(d, d) for _ in range(3))
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        h = self.inp(x)
        for f in self.f:
            h = self.drop(h + torch.tanh(f(h)))
        return h


def test_prenorm_one_stream(toys, make_toy):
    model, x, x2 = make_toy(toys.PreNormMLP)
    gm = _prepare(model, (x,))
    sites, streams = _group(gm)
    assert len(streams) == 1
    st = streams[0]
    assert st.sites == sites and len(sites) == 3
    assert st.root is sites[0].skip and st.root.target == torch.ops.aten.linear.default
    assert st.width == 32
    assert [s.index for s in sites] == [0, 1, 2] and all(s.stream == 0 for s in sites)
    assert st.successors[sites[0]] == [([], sites[1])]
    assert st.successors[sites[1]] == [([], sites[2])]
    assert st.successors[sites[2]] == []
    assert all(s.reason == "" for s in sites)
    assert st.values() == [st.root] + [s.add for s in sites]
    assert torch.equal(gm(x2), model(x2))


def test_prenorm_kinds(toys, make_toy):
    """The LayerNorm that opens each pre-norm block reads the site output too, but it is the next
    branch's input, not a link: every site is pre-norm."""
    model, x, _ = make_toy(toys.PreNormMLP)
    sites, _ = _group(_prepare(model, (x,)))
    assert [s.kind for s in sites] == ["pre-norm"] * 3


def test_postnorm_stream_linked_by_layer_norm(toys, make_toy):
    model, x, x2 = make_toy(toys.PostNormNet, layers=3)
    gm = _prepare(model, (x,))
    sites, streams = _group(gm)
    assert len(streams) == 1 and len(sites) == 3
    st = streams[0]
    for a, b in zip(sites, sites[1:]):
        (path, nxt), = st.successors[a]
        assert nxt is b
        assert len(path) == 1 and path[0].target == torch.ops.aten.layer_norm.default
        assert path[0].args[0] is a.add and b.skip is path[0]
    assert [s.kind for s in sites] == ["post-norm"] * 3
    assert torch.equal(gm(x2), model(x2))


def test_dropout_links():
    torch.manual_seed(0)
    model = DropLinkNet().eval()
    x = torch.randn(2, 8, 16)
    gm = _prepare(model, (x,))
    sites, streams = _group(gm)
    assert len(streams) == 1 and len(sites) == 3
    st = streams[0]
    for a, b in zip(sites, sites[1:]):
        (path, nxt), = st.successors[a]
        assert nxt is b and len(path) == 1
        assert path[0].op == "call_module" and isinstance(gm.get_submodule(path[0].target), nn.Dropout)
    assert [s.kind for s in sites] == ["pre-norm"] * 3
    x2 = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(gm(x2), model(x2))


def test_two_independent_streams(toys):
    torch.manual_seed(0)
    model = toys.TwoTowerNet().eval()
    g = torch.Generator().manual_seed(1)
    x, z = torch.randn(2, 8, 16, generator=g), torch.randn(2, 8, 16, generator=g)
    gm = _prepare(model, (x, z))
    sites, streams = _group(gm)
    assert len(sites) == 4 and len(streams) == 2
    assert [len(s.sites) for s in streams] == [2, 2]
    assert streams[0].root is not streams[1].root
    assert {s.branch_module for s in streams[0].sites} == {"a.0", "a.1"}
    assert {s.branch_module for s in streams[1].sites} == {"b.0", "b.1"}
    assert [(s.stream, s.index) for s in sites] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert torch.equal(gm(x, z), model(x, z))


def test_skip_not_dominating_branch_is_refused(toys, make_toy):
    """``h2 = h1 + g(h1 * sigmoid(h0))``: block 2's branch also reads h0, its skip does not dominate it.
    It is refused with the reason; the others are regrouped into two streams."""
    model, x, x2 = make_toy(toys.NonDominatedNet)
    gm = _prepare(model, (x,))
    sites, streams = _group(gm)
    assert len(sites) == 3
    refused = sites[1]
    assert "does not dominate" in refused.reason
    assert sites[0].skip.name in refused.reason  # names the stream value read directly
    assert refused.stream is None and refused.index is None
    assert [[s.add for s in st.sites] for st in streams] == [[sites[0].add], [sites[2].add]]
    assert streams[1].root is refused.add  # the refused add is now where a stream starts
    assert sites[0].reason == "" and sites[2].reason == ""
    assert torch.equal(gm(x2), model(x2))


def test_sites_with_reason_left_out(toys, make_toy):
    model, x, _ = make_toy(toys.ScaledSkipNet)
    sites, streams = _group(_prepare(model, (x,)))
    assert len(sites) == 1 and sites[0].reason
    assert streams == []
    assert sites[0].stream is None


@pytest.mark.parametrize("name,kind", [("gpt2", "pre-norm"), ("llama", "pre-norm"), ("bert", "post-norm"),
                                       ("vit", "pre-norm")])
def test_real_model_kinds(name, kind, rewritten):
    rep = rewritten(name, "mhc", True).new.hc_report
    assert len(rep.streams) == 1
    assert [s.kind for s in rep.sites] == [kind] * 4
    assert [(s.stream, s.index) for s in rep.sites] == [(0, i) for i in range(4)]
