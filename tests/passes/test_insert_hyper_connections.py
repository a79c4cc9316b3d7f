"""insert_hyper_connections: the residual adds become stream ops (``torch.ops.hc_rewrite.*``), the site
parameters live under ``hc.``, and the outputs do not change at init."""
from collections import Counter

import pytest
import torch

from hc_rewrite import variants
from hc_rewrite.passes import insert_hyper_connections
from hc_rewrite.spec import make_spec

from ..helpers import analysed

ADD = torch.ops.aten.add.Tensor
LN = torch.ops.aten.layer_norm.default
# what each variant declares it emits (hc_rewrite.variants): the graph must hold exactly those ops
START = {v.name: v.expand_name for v in variants.all_variants()}
END = {v.name: v.reduce_name for v in variants.all_variants()}
COEFF = {v.name: v.coeff_name for v in variants.all_variants()}
PRE = {v.name: v.pre_name for v in variants.all_variants()}
PARAMS_CLS = {v.name: v.params for v in variants.all_variants()}


def _pipeline(model, args):
    """The graph, sites and streams as the pipeline hands them to this pass."""
    ctx = analysed(model, args)
    return ctx.gm, ctx.sites, ctx.streams


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("variant", variants.NAMES)
def test_prenorm_rewrite(variant, dynamic, toys, make_toy, hx):
    model, x, x2 = make_toy(toys.PreNormMLP, p=0.1)
    gm, sites, streams = _pipeline(model, (x,))
    add_names = {s.add.name for s in sites}
    assert _count(gm, ADD) == 3 and hx.hc_targets(gm) == []
    assert not hasattr(gm, "hc")

    n = insert_hyper_connections(gm, streams, make_spec(variant, 4, dynamic))

    assert n == 3 and all(s.rewritten for s in sites)
    ops = Counter(hx.hc_targets(gm))
    assert ops == Counter({START[variant]: 1, COEFF[variant]: 3, PRE[variant]: 3, "stream_post": 3,
                           END[variant]: 1})
    order = hx.hc_targets(gm)
    assert order[0] == START[variant] and order[-1] == END[variant]
    assert _count(gm, ADD) == 0  # every residual add is gone ...
    assert not add_names & {nd.name for nd in gm.graph.nodes}
    # ... and each branch now reads the site's pre op instead of the raw stream
    pre_nodes = [nd for nd in gm.graph.nodes if str(nd.target).startswith(f"hc_rewrite.{PRE[variant]}")]
    assert all(next(iter(p.users)).target == LN for p in pre_nodes)
    # the head reads the reduced stream
    end = next(nd for nd in gm.graph.nodes if str(nd.target).startswith(f"hc_rewrite.{END[variant]}"))
    assert [u.target for u in end.users] == [torch.ops.aten.linear.default]
    # site parameters
    names = [nm for nm, _ in gm.hc.named_children()]
    assert names == ["s0_0", "s0_1", "s0_2"]
    for i, (_, mod) in enumerate(gm.hc.named_children()):
        assert isinstance(mod, PARAMS_CLS[variant]) and mod.dynamic == dynamic and mod.n == 4
        if variant == "mhc":
            assert (mod.b_res is None) == (i == 2)  # the last site of a stream has no H_res
            assert (mod.phi is None) == (not dynamic)
    params = dict(gm.named_parameters())
    read = {str(nd.target) for nd in gm.graph.nodes if nd.op == "get_attr" and str(nd.target).startswith("hc.")}
    assert read == {k for k in params if k.startswith("hc.")}  # every site parameter is read, none dangles
    gm.graph.lint()
    # numbers
    assert hx.rel_err(model(x2), gm(x2)) <= 1e-5
    x3 = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(9))  # other batch / length
    assert hx.rel_err(model(x3), gm(x3)) <= 1e-5


@pytest.mark.parametrize("variant", variants.NAMES)
def test_postnorm_layer_norm_lifted(variant, toys, make_toy, hx):
    model, x, x2 = make_toy(toys.PostNormNet, layers=3)
    gm, sites, streams = _pipeline(model, (x,))
    assert _count(gm, LN) == 3
    assert insert_hyper_connections(gm, streams, make_spec(variant, 4, True)) == 3
    ops = Counter(hx.hc_targets(gm))
    assert ops["stream_layer_norm"] == 2  # the two LayerNorms linking the sites act on the wide stream
    assert ops[COEFF[variant]] == 3 and ops["stream_post"] == 3
    assert ops[START[variant]] == 1 and ops[END[variant]] == 1
    assert _count(gm, LN) == 1  # the last LayerNorm reads the reduced stream
    ln = next(nd for nd in gm.graph.nodes if nd.target == LN)
    assert str(ln.args[0].target).startswith(f"hc_rewrite.{END[variant]}")
    assert hx.rel_err(model(x2), gm(x2)) <= 1e-5


def test_two_streams_and_refused_site(toys, make_toy, hx):
    torch.manual_seed(0)
    model = toys.TwoTowerNet().eval()
    g = torch.Generator().manual_seed(1)
    x, z = torch.randn(2, 8, 16, generator=g), torch.randn(2, 8, 16, generator=g)
    gm, sites, streams = _pipeline(model, (x, z))
    assert insert_hyper_connections(gm, streams, make_spec("mhc", 3, True)) == 4
    ops = Counter(hx.hc_targets(gm))
    assert ops["expand_stream"] == 2 and ops["reduce_stream"] == 2 and ops["mhc_coeffs"] == 4
    assert sorted(nm for nm, _ in gm.hc.named_children()) == ["s0_0", "s0_1", "s1_0", "s1_1"]
    assert gm.hc.s0_0.n == 3
    assert hx.rel_err(model(x, z), gm(x, z)) <= 1e-5

    model, x, x2 = make_toy(toys.NonDominatedNet)
    gm, sites, streams = _pipeline(model, (x,))
    assert insert_hyper_connections(gm, streams, make_spec("hc", 4, True)) == 2
    assert [s.rewritten for s in sites] == [True, False, True]
    assert _count(gm, ADD) == 1  # the refused add stays a plain add, reading the reduced stream
    refused_add = next(nd for nd in gm.graph.nodes if nd.target == ADD)
    assert any(str(a.target).startswith("hc_rewrite.reduce_stream") for a in refused_add.args)
    assert hx.rel_err(model(x2), gm(x2)) <= 1e-5


def test_float64_model_keeps_float64(toys, make_toy, hx):
    model, x, x2 = make_toy(toys.PreNormMLP)
    model = model.double()
    gm, _, streams = _pipeline(model, (x.double(),))
    insert_hyper_connections(gm, streams, make_spec("hc", 4, True))
    assert all(p.dtype == torch.float64 for p in gm.hc.parameters())
    out = gm(x2.double())
    assert out.dtype == torch.float64
    assert hx.rel_err(model(x2.double()), out) <= 1e-12


def test_seed_drives_dynamic_mhc_init(toys, make_toy, hx):
    model, x, x2 = make_toy(toys.PreNormMLP)
    phis = []
    for seed in (0, 0, 1):
        gm, _, streams = _pipeline(model, (x,))
        insert_hyper_connections(gm, streams, make_spec("mhc", 4, True), seed=seed)
        phis.append(gm.hc.s0_0.phi.detach().clone())
        assert hx.rel_err(model(x2), gm(x2)) <= 1e-5
    assert torch.equal(phis[0], phis[1])
    assert not torch.equal(phis[0], phis[2])


def test_second_rewrite_refused(toys, make_toy, hx):
    model, x, _ = make_toy(toys.PreNormMLP)
    gm, _, streams = _pipeline(model, (x,))
    insert_hyper_connections(gm, streams, make_spec("mhc", 4, True))
    code = gm.code
    with pytest.raises(ValueError, match="already"):
        insert_hyper_connections(gm, streams, make_spec("mhc", 4, True))
    assert gm.code == code


@pytest.mark.parametrize("variant", variants.NAMES)
def test_stream_starting_from_another_streams_value(variant):
    """One tensor read channels-first, then channels-last, then channels-first: each stream starts from the
    reduction of the previous one, so no original add stays alive and every new parameter is used."""
    from hc_rewrite.zoo_handwritten import SameTensorTwoLayouts

    torch.manual_seed(0)
    model, x = SameTensorTwoLayouts().eval(), torch.randn(2, 16, 16)
    gm, sites, streams = _pipeline(model, (x,))
    assert [(st.feature_dim, len(st.sites)) for st in streams] == [(1, 2), (-1, 2), (1, 1)]
    assert _count(gm, ADD) == 5
    insert_hyper_connections(gm, streams, make_spec(variant, 4))
    assert _count(gm, ADD) == 0  # every residual add became a post, none kept beside it
    assert _count(gm, getattr(torch.ops.hc_rewrite, START[variant]).default) == 3
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    gm.train()
    gm(x).pow(2).mean().backward()
    assert not [n for n, p in gm.hc.named_parameters() if p.grad is None]
