"""find_residual_sites: which adds are residual sites (skip + branch), and which are not. The graph and
its numbers do not change."""
import pytest
import torch
import torch.nn as nn

from hc_rewrite.capture import capture
from hc_rewrite.passes import find_residual_sites, remove_metadata_asserts

from ..helpers import analysed

ADD = torch.ops.aten.add.Tensor


def _prepare(model, args):
    """The graph as the pipeline hands it to this pass."""
    return analysed(model, args, until="find_residual_sites").gm


def _graph_sig(gm):
    return [(n.op, str(n.target), n.name, tuple(str(a) for a in n.args)) for n in gm.graph.nodes]


def _find(gm):
    sig, code = _graph_sig(gm), gm.code
    sites = find_residual_sites(gm)
    assert _graph_sig(gm) == sig and gm.code == code  # detection does not touch the graph
    return sites


def test_prenorm_sites(toys, make_toy):
    model, x, x2 = make_toy(toys.PreNormMLP, p=0.1)
    gm = _prepare(model, (x,))
    adds = [n for n in gm.graph.nodes if n.target == ADD]
    sites = _find(gm)
    assert [s.add for s in sites] == adds and len(sites) == 3
    x_node = next(n for n in gm.graph.nodes if n.op == "placeholder")
    inp = next(u for u in x_node.users if u.target != "_guards_fn")  # inp(x): where the stream starts
    for i, s in enumerate(sites):
        assert s.reason == ""
        assert s.skip is (inp if i == 0 else sites[i - 1].add)  # the stream value
        # the branch is the block's output: the dropout module after mlps.i's last linear
        assert s.branch.op == "call_module" and s.branch.target.startswith("_dropout.")
        assert s.branch_module == f"mlps.{i}"
        assert s.skip not in s.region and s.branch in s.region
        region_targets = {str(n.target) for n in s.region}
        assert "aten.linear.default" in region_targets and "aten.layer_norm.default" in region_targets
        assert set(s.add.args[:2]) == {s.skip, s.branch}
    assert torch.equal(gm(x2), model(x2))


def test_postnorm_sites(toys, make_toy):
    model, x, x2 = make_toy(toys.PostNormNet)
    gm = _prepare(model, (x,))
    sites = _find(gm)
    assert len(sites) == 2
    assert sites[0].skip.target == torch.ops.aten.linear.default  # inp
    assert sites[1].skip.target == torch.ops.aten.layer_norm.default  # LN(site 0): post-norm
    assert sites[1].skip.args[0] is sites[0].add
    assert [s.branch.target for s in sites] == [torch.ops.aten.tanh.default] * 2
    assert [s.branch_module for s in sites] == ["f.0", "f.1"]
    assert torch.equal(gm(x2), model(x2))


def test_non_residual_adds_are_not_sites(toys, make_toy):
    """Position-embedding add, RoPE-like ``q*cos + rot(q)*sin``, bias add, eps add, GELU's
    ``x + 0.044715*x**3`` and ``1 + tanh(.)``: adds, but none is a residual site."""
    model, x, x2 = make_toy(toys.NotResidualNet)
    gm = _prepare(model, (x,))
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == ADD]
    assert len(adds) == 6  # pos, rope, bias, eps, gelu cubic, 1 + tanh
    assert _find(gm) == []
    assert torch.equal(gm(x2), model(x2))


class SameShapeNotResidual(nn.Module):
    """Adds with operands of the result's shape that are still not residual: two parallel branches of
    the same input (neither operand is an ancestor of the other), an expanded bias and an expanded
    position embedding, and ``x + sin(x)`` (no computation between skip and branch)."""

    def __init__(self, d=32):
        super().__init__()
        self.f, self.g = nn.Linear(d, d), nn.Linear(d, d)
        self.b = nn.Parameter(torch.randn(d))
        self.pos = nn.Embedding(8, d)

    def forward(self, x):
        h = self.f(x) + self.g(x)
        h = h + self.b.expand_as(h)
        pos = self.pos(torch.arange(h.shape[1])).unsqueeze(0).expand_as(h)
        h = h + pos
        return h + torch.sin(h)


def test_same_shape_non_residual_adds():
    torch.manual_seed(0)
    model = SameShapeNotResidual().eval()
    x = torch.randn(2, 8, 32)
    gm = _prepare(model, (x,))
    adds = [n for n in gm.graph.nodes if n.target == ADD]
    assert len(adds) == 4
    assert _find(gm) == []
    x2 = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(gm(x2), model(x2))


def test_scaled_skip_is_found_with_reason(toys, make_toy):
    model, x, x2 = make_toy(toys.ScaledSkipNet)
    gm = _prepare(model, (x,))
    sites = _find(gm)
    assert len(sites) == 1
    s = sites[0]
    assert s.skip is s.add.args[1] and s.branch is s.add.args[0]
    assert "alpha=0.5" in s.reason
    assert torch.equal(gm(x2), model(x2))


class SpellingsNet(nn.Module):
    """Residual adds written ``h + f(h)``, ``f(h) + h``, ``torch.add(h, f(h))`` and ``h.add(f(h))``."""

    def __init__(self, d=32):
        super().__init__()
        self.inp = nn.Linear(16, d)
        self.f = nn.ModuleList(nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        h = self.inp(x)
        h = h + torch.relu(self.f[0](h))
        h = torch.relu(self.f[1](h)) + h
        h = torch.add(h, torch.relu(self.f[2](h)))
        h = h.add(torch.relu(self.f[3](h)))
        return h


@pytest.mark.parametrize("method", [
    "export",
    "symbolic_trace",
])
def test_every_spelling_of_add(method, monkeypatch):
    import hc_rewrite.capture as cap

    if method == "symbolic_trace":
        def no_export(*a, **k):
            raise RuntimeError("export disabled for this test")
        monkeypatch.setattr(cap, "_export", no_export)
    torch.manual_seed(0)
    model = SpellingsNet().eval()
    x = torch.randn(2, 8, 16)
    captured = capture(model, (x,))
    assert captured.method.startswith("torch.export" if method == "export" else "torch.fx.symbolic_trace")
    gm = captured.gm
    remove_metadata_asserts(gm)
    sites = _find(gm)
    assert len(sites) == 4
    for prev, s in zip([None] + sites[:-1], sites):
        assert s.reason == ""
        if prev is not None:
            assert s.skip is prev.add
        assert s.branch in s.add.args[:2] and s.skip in s.add.args[:2]
    if method == "symbolic_trace":
        assert [s.branch_module for s in sites] == [f"f.{i}" for i in range(4)]
    x2 = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(gm(x2), model(x2))


def test_real_model_sites(rewritten):
    """GPT-2 (2 layers): 4 sites, attn then mlp of each block (read from the rewrite's report)."""
    rep = rewritten("gpt2", "mhc", True).new.hc_report
    assert [s.branch_module for s in rep.sites] == [
        "transformer.h.0.attn", "transformer.h.0.mlp", "transformer.h.1.attn", "transformer.h.1.mlp",
    ]
    assert all(s.reason == "" for s in rep.sites)


# ----------------------------------------------------------------------------- round 2
def test_side_input_adds_are_not_sites():
    """One attention bias shared by every layer (``scores + bias``) reaches later layers' scores only through
    earlier residual sites: it is not a stream, and the layers' real sites are all found."""
    from hc_rewrite.zoo_handwritten import SharedBiasTransformer

    torch.manual_seed(0)
    model = SharedBiasTransformer(layers=3).eval()
    gm = _prepare(model, (torch.randint(0, 128, (2, 8)),))
    sites = _find(gm)
    assert len(sites) == 6 and not any(s.reason for s in sites)
    assert {s.module for s in sites} == {""}  # the layers are ModuleDicts called from the top-level forward
    for s in sites:
        assert list(s.skip.meta["val"].shape)[-1] == 32  # every skip is the [B, T, 32] stream, never the bias


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        x = x + self.a(x)
        return x + self.b(x)


class _Nested(nn.Module):
    """A residual around residual blocks: ``x + inner(x)`` where ``inner`` has residual sites of its own."""

    def __init__(self):
        super().__init__()
        self.inner = _Inner()

    def forward(self, x):
        return x + self.inner(x)


def test_residual_around_residual_blocks_is_refused_and_the_inner_sites_kept():
    gm = _prepare(_Nested().eval(), (torch.randn(2, 5, 8),))
    sites = _find(gm)
    inner = [s for s in sites if not s.reason]
    outer = [s for s in sites if s.reason]
    assert len(inner) == 2 and len(outer) == 1
    assert "residual around residual blocks" in outer[0].reason and inner[1].add.name in outer[0].reason


class _PoolMixer(nn.Module):
    """PoolFormer's token mixer: ``x + (pool(x) - x)`` (pooling is the computation) and a "same"-padded conv."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.conv = nn.Conv2d(8, 8, 3, padding="same")

    def forward(self, x):
        x = x + (self.pool(x) - x)
        return x + self.conv(x)


def test_pooling_and_string_padding_branches_are_residual():
    gm = _prepare(_PoolMixer().eval(), (torch.randn(2, 8, 6, 6),))
    targets = {str(n.target) for n in gm.graph.nodes}
    assert "aten.conv2d.padding" in targets and "aten.avg_pool2d.default" in targets
    sites = _find(gm)
    assert len(sites) == 2 and not any(s.reason for s in sites)
