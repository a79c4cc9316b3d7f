"""The pass pipeline (hc_rewrite.passes.pipeline): the order of the passes, written once, is what the API, the
compile backend and the tests run; the kernel passes of the lowering run only where the stream ops read CUDA
tensors, its decomposition everywhere."""
import pytest
import torch

import hc_rewrite
import hc_rewrite.passes.pipeline as pipeline
from hc_rewrite.passes.pipeline import ANALYSIS, GRAPH_FORM, LOWERING, MODULE_FORM, Pass, PassContext, PassManager

from ..helpers import analysed


def test_the_stages_and_their_order():
    assert ANALYSIS.names == ["remove_metadata_asserts", "restore_dropout_modules", "restore_batch_norm_modules",
                              "find_residual_sites", "infer_feature_axes", "group_residual_streams",
                              "find_hyper_streams"]
    assert GRAPH_FORM.names == ["insert_hyper_connections"]
    assert MODULE_FORM.names == ["place_sites_regrouping"]
    assert LOWERING.names == ["tag_stream_recompute", "fuse_stream_ops", "lower_stream_ops", "decompose_stream_ops"]
    assert str(ANALYSIS.until("find_residual_sites")) == (
        "remove_metadata_asserts -> restore_dropout_modules -> restore_batch_norm_modules")
    assert LOWERING.without("fuse_stream_ops").names == ["tag_stream_recompute", "lower_stream_ops",
                                                         "decompose_stream_ops"]


def test_pass_manager_edits_and_context_fields():
    seen = []

    def count_nodes(gm):
        seen.append("count")
        return len(gm.graph.nodes)

    def first_and_last(gm, sites):
        return sites[0], sites[-1]

    pm = PassManager.build_from_passlist([Pass(count_nodes, writes=("placements",))])
    pm.add_pass_with_index(Pass(first_and_last, reads=("sites",), writes=("spec", "fused")))
    pm.add_pass_with_index(Pass(count_nodes), 0)
    assert pm.names == ["count_nodes", "count_nodes", "first_and_last"]
    pm.remove_pass_with_index(0)
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    ctx = pm(PassContext(gm, sites=["a", "b", "c"]))
    assert seen == ["count"]
    assert ctx.placements == len(gm.graph.nodes) == ctx.results["count_nodes"]
    assert (ctx.spec, ctx.fused) == ("a", "c")


def test_rewrite_runs_the_pipeline(make_toy, toys, monkeypatch):
    """Both forms run ANALYSIS, then their own stage; a pass added to a stage runs inside ``rewrite``."""
    model, x, x2 = make_toy(toys.PreNormMLP)
    ran = []

    def spy(gm, streams):
        ran.append(len(streams))
        return 0

    for stage in (ANALYSIS, GRAPH_FORM, MODULE_FORM):
        monkeypatch.setattr(stage, "passes", stage.passes + [Pass(spy, reads=("streams",))])
    for form in ("graph", "module"):
        ran.clear()
        new = hc_rewrite.rewrite(model, (x,), variant="hc", n=2, form=form)
        assert ran == [1, 1]  # after the analysis (one stream), after the form's stage
        with torch.no_grad():
            torch.testing.assert_close(new(x2), model(x2))


def test_graph_form_is_analysis_then_insert(make_toy, toys, hx):
    """The passes run by hand in the pipeline's order give what ``rewrite(form="graph")`` gives."""
    model, x, x2 = make_toy(toys.PostNormNet)
    ctx = analysed(model, (x,))
    ctx.spec = hc_rewrite.spec.make_spec("mhc", 4)
    GRAPH_FORM(ctx)
    assert ctx.results["insert_hyper_connections"] == 2
    new = hc_rewrite.rewrite(model, (x,), variant="mhc", n=4, form="graph")
    assert hx.hc_targets(ctx.gm) == hx.hc_targets(new)
    with torch.no_grad():
        torch.testing.assert_close(ctx.gm(x2), new(x2))


def _spies(ran):
    """Stand-ins for the LOWERING passes, same names, recording which ran."""
    def spy(name):
        def fn(gm, *args):
            ran.append(name)
            return 0
        fn.__name__ = name
        return Pass(fn)
    return [spy(name) for name in LOWERING.names]


def test_kernel_passes_run_only_on_cuda_unless_everywhere(make_toy, toys, monkeypatch):
    """The kernel passes run where the stream ops read CUDA tensors (or everywhere); tag_stream_recompute and
    decompose_stream_ops run on every device, unless switched off."""
    model, x, _ = make_toy(toys.PreNormMLP)
    gm = hc_rewrite.rewrite(model, (x,), variant="mhc", n=4, form="graph")
    ran = []
    monkeypatch.setattr(LOWERING, "passes", _spies(ran))
    code = gm.code
    assert not pipeline.runs_on_cuda(gm)  # CPU tensors (and nodes without device meta): not CUDA
    tag = ["tag_stream_recompute"]
    assert pipeline.lower(gm) == 0 and ran == tag + ["decompose_stream_ops"] and gm.code == code
    ran.clear()
    pipeline.lower(gm, decompose=False, recompute=False)
    assert ran == []
    pipeline.lower(gm, everywhere=True)
    assert ran == LOWERING.names
    monkeypatch.setattr(pipeline, "node_devices", lambda node: {"cuda"})
    assert pipeline.runs_on_cuda(gm)
    ran.clear()
    pipeline.lower(gm, combos=False)
    assert ran == tag + ["lower_stream_ops", "decompose_stream_ops"]
    ran.clear()
    pipeline.lower(gm, kernels=False)
    assert ran == tag + ["decompose_stream_ops"]


def test_backend_lowers_through_the_pipeline(make_toy, toys, monkeypatch):
    """The compile backend's lowering is :func:`pipeline.lower`: ``fuse="all"`` runs the kernel passes on CPU too,
    ``fuse=True`` on CPU does not, ``fuse=False`` never; ``decompose`` switches the last pass, ``recompute`` the
    first."""
    model, x, _ = make_toy(toys.PreNormMLP)
    gm = hc_rewrite.rewrite(model, (x,), variant="frac", n=4, form="graph")
    ran = []
    monkeypatch.setattr(LOWERING, "passes", _spies(ran))
    kernel_passes = ["fuse_stream_ops", "lower_stream_ops"]
    tag = ["tag_stream_recompute"]
    for options, runs in (({"fuse": True}, tag + ["decompose_stream_ops"]),
                          ({"fuse": False}, tag + ["decompose_stream_ops"]),
                          ({"fuse": "all"}, tag + kernel_passes + ["decompose_stream_ops"]),
                          ({"fuse": "all", "decompose": False}, tag + kernel_passes),
                          ({"recompute": False}, ["decompose_stream_ops"])):
        ran.clear()
        torch._dynamo.reset()
        compiled = torch.compile(gm, backend="hc_rewrite", options={**options, "compiler": "eager"})
        torch.testing.assert_close(compiled(x), gm(x))
        assert ran == runs, options
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["find_residual_sites", "group_residual_streams"])
def test_until_stops_before_the_named_pass(name, make_toy, toys):
    model, x, _ = make_toy(toys.PreNormMLP)
    ctx = analysed(model, (x,), until=name)
    assert name not in ctx.results and "restore_batch_norm_modules" in ctx.results
    assert (ctx.sites == []) == (name == "find_residual_sites") and ctx.streams == []
