"""tag_stream_recompute: every stream op of the graph dynamo hands a compiler is tagged for recomputation, grouped by
the module whose code does the site's add (a flat graph: one group per site); compiled by Inductor, autograd then
keeps the widened stream once per block boundary instead of at every site, with eager's values and gradients."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy

import hc_rewrite
from benchmarks.e2e import GPTStack
from hc_rewrite.inductor_pass import PASS
from hc_rewrite.passes.lower_stream_ops import stream_op_nodes
from hc_rewrite.passes.tag_stream_recompute import GROUP_BASE, tag_stream_recompute
from hc_rewrite.variants.base import ConnectionParams

from ..helpers import moved_copy, rel_err

D, N = 32, 4


def _rewritten(variant, form="module"):
    torch.manual_seed(0)
    new = hc_rewrite.rewrite(GPTStack(D, 3), (torch.randn(2, 8, D),), variant=variant, n=N, form=form)
    return moved_copy(new, 1)


def _dynamo_graph(model, x):
    """The graph dynamo hands a compiler for ``model(x)``, tagged."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True)(x)
    (gm,) = graphs
    before = {n.name: dict(n.meta) for n in stream_op_nodes(gm)}
    return gm, before, tag_stream_recompute(gm)


def _groups(gm):
    return [(n.target.__name__.split(".")[0], n.meta["ac_graph_id"] - GROUP_BASE) for n in stream_op_nodes(gm)]


@pytest.mark.parametrize("variant", ["mhc", "frac", "hc"])
def test_every_stream_op_is_tagged_one_group_per_block(variant):
    gm, before, count = _dynamo_graph(_rewritten(variant), torch.randn(2, 8, D))
    nodes = stream_op_nodes(gm)
    assert all("recompute" not in m and "ac_graph_id" not in m for m in before.values())
    assert count == len(nodes) > 0
    assert all(n.meta["recompute"] is CheckpointPolicy.PREFER_RECOMPUTE for n in nodes)
    groups = _groups(gm)
    posts = [g for op, g in groups if op == "stream_post"]
    assert posts == [0, 0, 1, 1, 2, 2]  # two sites per block, three blocks
    ids = [g for _, g in groups]
    assert ids == sorted(ids)  # in graph order: a later group reads an earlier one's stream, never the reverse
    for node in nodes:  # a site's coefficients and pre: the group of its add
        if node.target.__name__.split(".")[0].endswith("_coeffs"):
            site = {v for u in node.users for v in u.users if v in nodes}  # through getitem: pre and post
            assert {v.target.__name__.split(".")[0].split("_")[-1] for v in site} == {"pre", "post"}
            assert {v.meta["ac_graph_id"] for v in site} == {node.meta["ac_graph_id"]}


def test_a_flat_graph_is_one_group_per_site():
    gm, _, _ = _dynamo_graph(_rewritten("mhc", form="graph"), torch.randn(2, 8, D))
    posts = [g for op, g in _groups(gm) if op == "stream_post"]
    assert posts == list(range(6))


def test_tags_already_there_are_kept():
    gm, _, _ = _dynamo_graph(_rewritten("mhc"), torch.randn(2, 8, D))
    node = stream_op_nodes(gm)[0]
    node.meta["recompute"], node.meta["ac_graph_id"] = CheckpointPolicy.MUST_SAVE, 3
    for n in stream_op_nodes(gm)[1:]:
        del n.meta["recompute"], n.meta["ac_graph_id"]
    tag_stream_recompute(gm)
    assert (node.meta["recompute"], node.meta["ac_graph_id"]) == (CheckpointPolicy.MUST_SAVE, 3)


def _saved_wide(model, x):
    """Output, gradients and the number of widened-stream tensors ``[..., n, D]`` autograd keeps for backward."""
    wide = {}

    def pack(t):
        if t.dim() == 4 and tuple(t.shape[-2:]) == (N, D):
            wide[t.untyped_storage().data_ptr()] = True
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).mean().backward()
    named = ((k.removeprefix("_orig_mod."), p) for k, p in model.named_parameters())
    return out.detach(), {k: p.grad.clone() for k, p in named}, len(wide)


def test_inductor_keeps_the_widened_stream_once_per_block_with_eager_numbers():
    new = _rewritten("mhc")
    x = torch.randn(3, 6, D, generator=torch.Generator().manual_seed(2))
    ref_out, ref_grads, _ = _saved_wide(new, x)
    results = {}
    for recompute in (True, False):
        model = copy.deepcopy(new)
        torch._dynamo.reset()
        PASS.recompute = recompute
        try:
            compiled = torch.compile(model)
            out, grads, wide = _saved_wide(compiled, x)
        finally:
            PASS.recompute = True
        assert rel_err(ref_out, out) <= 1e-5
        scale = max(float(g.abs().max()) for g in ref_grads.values())
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-4 * scale, msg=k)
        results[recompute] = wide
    assert results[True] == 2  # the stream at the entries of blocks 1 and 2 (block 0's is recomputed from x)
    assert results[False] > 2 * results[True]


#: the forward coefficient projection of mHC and Frac at D = 32, N = 4, 16 tokens, as the aten.mm Inductor calls:
#: ``(w^T x^T)^T`` (fusible.narrow_matmul), ``w^T [k, K] @ x^T [K, rows]``; HC's is a reduction per column in an
#: Inductor kernel (fusible.column_sums), so its output ``[rows, n + 2]`` is looked for among the saved tensors
_PROJECTIONS = {"frac": {((2 * N + 1, D // N), (D // N, 16 * N))},
                "mhc": {((2 * N + N * N, N * D), (N * D, 16)), ((2 * N, N * D), (N * D, 16))}}
_HC_PROJECTION = (16 * N, N + 2)


@pytest.mark.parametrize("variant", ["mhc", "frac", "hc"])
def test_the_coefficient_projection_is_saved_not_recomputed(variant):
    """The projection of the stream onto the dynamic weights (a handful of floats a row) is tagged to be saved
    (``saved_for_backward``): compiled with the recompute tags, a training step runs it once per site, not again in
    backward (mHC, Frac: one library product per site; HC: its output saved for backward at every site), and still
    gives eager's values and gradients."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, D, generator=torch.Generator().manual_seed(3))
    new = moved_copy(hc_rewrite.rewrite(GPTStack(D, 1), (x,), variant=variant, n=N), 1)  # one block: fast to compile
    twin = copy.deepcopy(new)
    torch._dynamo.reset()
    compiled = torch.compile(new, fullgraph=True)
    compiled(x).square().sum().backward()  # compiles forward and backward
    new.zero_grad()
    saved = []
    with torch.profiler.profile(record_shapes=True) as prof:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            out = compiled(x)
        out.square().sum().backward()
    products = [tuple(tuple(s) for s in e.input_shapes[:2]) for e in prof.events() if e.name == "aten::mm"]
    sites = sum(1 for m in new.modules() if isinstance(m, ConnectionParams))
    assert sites > 0
    if variant == "hc":
        assert saved.count(_HC_PROJECTION) == sites, saved
    else:
        forward = [p for p in products if p in _PROJECTIONS[variant]]
        assert len(forward) == sites, (forward, sites)
    want = twin(x)
    want.square().sum().backward()
    assert rel_err(out, want) <= 1e-5
    grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (twin, new)]
    assert rel_err(*grads) <= 1e-5
