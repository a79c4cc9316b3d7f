"""lower_stream_ops: every reference stream op with a same-schema fused version is swapped for it (arguments
untouched), everything else stays; a fused op of another schema is refused with a warning; the numbers do not
change. (Whether a graph is lowered at all, CUDA or not, is the pipeline's decision: tests/passes/test_pipeline.py.)"""
import warnings

import pytest
import torch

import hc_rewrite
from hc_rewrite import kernels, variants
from hc_rewrite.ops.library import ops
from hc_rewrite.passes import lower_stream_ops
from hc_rewrite.passes.lower_stream_ops import stream_op_nodes

_test_lib = torch.library.Library("hc_rewrite_test", "DEF")
_test_lib.define("stream_pre(Tensor w, Tensor h_pre) -> Tensor")
_test_lib.impl("stream_pre", lambda w, h: hc_rewrite.reference.stream_pre(w, h), "CompositeImplicitAutograd")
_test_lib.define("stream_pre_bad(Tensor w) -> Tensor")
_test_lib.impl("stream_pre_bad", lambda w: w.sum(-2), "CompositeImplicitAutograd")


def _graph(variant, make_toy, toys, n=4):
    model, x, x2 = make_toy(toys.PreNormMLP)
    gm = hc_rewrite.rewrite(model, (x,), variant=variant, n=n, form="graph")
    with torch.no_grad():  # off the init, so every coefficient matters
        for p in gm.hc.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    return gm, x2


def _calls(gm):
    return [(n.name, str(n.target), tuple(str(a) for a in n.args)) for n in gm.graph.nodes if n.op == "call_function"]


def test_swaps_targets_and_keeps_arguments(make_toy, toys):
    gm, x = _graph("mhc", make_toy, toys)
    expected = gm(x)
    before = _calls(gm)
    pre_nodes = [n for n in gm.graph.nodes if n.target is ops.stream_pre.default]
    assert len(pre_nodes) == 3
    fused = {ops.stream_pre.default: torch.ops.hc_rewrite_test.stream_pre.default}

    assert lower_stream_ops(gm, fused) == 3

    assert all(n.target is torch.ops.hc_rewrite_test.stream_pre.default for n in pre_nodes)
    after = _calls(gm)
    assert [(a, c) for a, _, c in after] == [(a, c) for a, _, c in before]  # same nodes, same arguments
    changed = {(b, a) for (_, b, _), (_, a, _) in zip(before, after) if a != b}
    assert changed == {("hc_rewrite.stream_pre.default", "hc_rewrite_test.stream_pre.default")}
    torch.testing.assert_close(gm(x), expected)
    assert lower_stream_ops(gm, fused) == 0  # nothing left to swap


def test_refuses_a_fused_op_of_another_schema(make_toy, toys):
    gm, _ = _graph("hc", make_toy, toys, n=2)
    code = gm.code
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        n = lower_stream_ops(gm, {ops.stream_pre.default: torch.ops.hc_rewrite_test.stream_pre_bad.default})
    assert n == 0 and any("different schema" in str(w.message) for w in caught)
    assert lower_stream_ops(gm, {}) == 0 and gm.code == code


@pytest.mark.parametrize("variant", variants.NAMES)
def test_with_the_kernels_table(variant, make_toy, toys):
    """The table of :func:`hc_rewrite.kernels.fused_ops` (triton installed): the variant's coefficient, pre and
    post ops become ``hc_fused`` ops; its expand / reduce stay. Off CUDA the fused ops compute the reference math,
    so the outputs are the same; the kernels' own numbers are tests/test_kernels.py's."""
    gm, x = _graph(variant, make_toy, toys)
    expected = gm(x)
    v = variants.get(variant)
    n_ops = len(stream_op_nodes(gm))
    swapped = lower_stream_ops(gm)
    if not kernels.available():
        assert swapped == 0 and len(stream_op_nodes(gm)) == n_ops
        return
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("hc_")]
    assert swapped == 3 * 3  # coefficients, pre and post of three sites
    assert sorted(t for t in targets if t.startswith("hc_rewrite.")) == sorted(
        f"hc_rewrite.{name}.default" for name in (v.expand_name, v.reduce_name))
    assert {t.split(".")[1] for t in targets if t.startswith("hc_fused.")} == set(v.fused_ops)
    torch.testing.assert_close(gm(x), expected, rtol=1e-6, atol=1e-6)


def test_a_graph_without_stream_ops_is_left_alone(make_toy, toys):
    model, x, _ = make_toy(toys.PlainMLP)
    gm = torch.fx.symbolic_trace(model)
    code = gm.code
    assert lower_stream_ops(gm) == 0 and gm.code == code
