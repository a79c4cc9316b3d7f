"""ONNX export of rewritten models (hc_rewrite.onnx_export): checker-valid files whose onnxruntime outputs
match PyTorch at batch / sequence sizes other than the exported ones."""
from __future__ import annotations

import argparse

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

import hc_rewrite  # noqa: E402
from hc_rewrite.onnx_export import export_onnx, max_relative_error, onnx_input_layout, run_onnx  # noqa: E402
from hc_rewrite.variants import NAMES as VARIANTS  # noqa: E402
from hc_rewrite.zoo import ZOO  # noqa: E402

RTOL = 1e-4
EXPORT_BATCH, EXPORT_SEQ = 2, 8
BATCHES, SEQS = (1, 5), (1, 13)  # sizes of 1 too: a decode step, a single image
MODELS = ("gpt2", "llama", "bert", "vit")


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = ZOO[name].build()
        return cache[name]
    return get


def _tensor_leaves(out):
    return [x for x in torch.utils._pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


#: every model at least once, each variant on two models (the exporter's work is per op, the ops per
#: variant; the graphs per model): 6 of the 12 pairs
SHAPE_CASES = [("llama", "mhc"), ("vit", "mhc"), ("gpt2", "frac"), ("bert", "frac"), ("llama", "hc"), ("bert", "hc")]


def test_the_shape_cases_cover_every_model_and_every_variant_twice():
    assert {n for n, _ in SHAPE_CASES} == set(MODELS)
    assert all(sum(v == variant for _, v in SHAPE_CASES) == 2 for variant in VARIANTS)


@pytest.mark.parametrize("name,variant", SHAPE_CASES, ids=[f"{n}-{v}" for n, v in SHAPE_CASES])
def test_onnx_matches_pytorch_at_other_shapes(name, variant, built, tmp_path):
    entry = ZOO[name]
    gen = torch.Generator().manual_seed(0)
    args, kwargs = entry.inputs(batch=EXPORT_BATCH, seq=EXPORT_SEQ, generator=gen)
    model = hc_rewrite.rewrite(built(name), args, kwargs, variant=variant, n=4, form="graph")
    path = export_onnx(model, args, tmp_path / f"{name}_{variant}.onnx", example_kwargs=kwargs)

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    domains = {node.domain for node in proto.graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard op domains in the file: {domains}"

    image = name == "vit"
    shapes = [(b, None) for b in BATCHES] if image else [(b, s) for b in BATCHES for s in SEQS]
    for batch, seq in shapes:
        a2, k2 = entry.inputs(batch=batch, seq=seq or EXPORT_SEQ, generator=gen)
        with torch.no_grad():
            expected = _tensor_leaves(model(*a2, **k2))
        got = run_onnx(path, k2)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert tuple(g.shape) == tuple(e.shape)
            err = max_relative_error(g, e)
            assert err <= RTOL, f"{name}/{variant} batch={batch} seq={seq}: max relative error {err:.3g}"


def test_input_and_output_names_and_dynamic_axes(built, tmp_path):
    entry = ZOO["bert"]
    args, kwargs = entry.inputs(batch=EXPORT_BATCH, seq=EXPORT_SEQ, generator=torch.Generator().manual_seed(1))
    kwargs["attention_mask"] = torch.ones_like(kwargs["input_ids"])
    model = hc_rewrite.rewrite(built("bert"), args, kwargs, variant="frac", n=2, dynamic=False, form="graph")
    path = export_onnx(model, args, tmp_path / "bert.onnx", example_kwargs=kwargs, verify=True)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == ["last_hidden_state", "pooler_output"]
    dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq"]
    names, tensors, _ = onnx_input_layout(model, args, kwargs)
    assert names == ["input_ids", "attention_mask"] and len(tensors) == 2


def test_static_export_positional_toy(tmp_path):
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.norm, self.fc = nn.LayerNorm(d), nn.Linear(d, d)

        def forward(self, x):
            return x + self.fc(self.norm(x))

    torch.manual_seed(0)
    net = nn.Sequential(Block(16), Block(16)).eval()
    x = torch.randn(2, 5, 16)
    model = hc_rewrite.rewrite(net, (x,), variant="mhc", n=2, form="graph")
    path = export_onnx(model, (x,), tmp_path / "toy.onnx", dynamic_batch=False, dynamic_seq=False)
    graph = onnx.load(str(path)).graph
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [2, 5, 16]
    (out,) = run_onnx(path, [x])
    assert max_relative_error(out, model(x)) <= RTOL


def test_cli_export_onnx(tmp_path, capsys):
    from hc_rewrite.cli_export import add_export_onnx_parser

    parser = argparse.ArgumentParser(prog="hc-rewrite")
    add_export_onnx_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "vit.onnx"
    args = parser.parse_args(["export-onnx", "--model", "vit", "--variant", "hc", "--n", "2", "--static",
                              "--out", str(out), "--batch", "3", "--verify"])
    assert args.func(args) == 0
    assert out.exists() and "verified" in capsys.readouterr().out
    bad = parser.parse_args(["export-onnx", "--model", "vit", "--batch", "1", "--out", str(out)])
    assert bad.func(bad) == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["export-onnx", "--model", "no-such-model"])


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_structure_preserving_form_exports_with_its_trained_weights(name, built, tmp_path):
    """The default (module) form exports through its graph form: the file computes what the model computes,
    connection weights moved off their init included; ``hc_rewrite.export_onnx`` is top-level API."""
    entry = ZOO[name]
    gen = torch.Generator().manual_seed(1)
    args, kwargs = entry.inputs(batch=EXPORT_BATCH, seq=EXPORT_SEQ, generator=gen)
    model = hc_rewrite.rewrite(built(name), args, kwargs, variant="mhc", n=4)
    with torch.no_grad():
        for p in model.hc.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    path = hc_rewrite.export_onnx(model, args, tmp_path / f"{name}.onnx", example_kwargs=kwargs)
    a2, k2 = entry.inputs(batch=3, seq=11, generator=gen)
    with torch.no_grad():
        expected = _tensor_leaves(model(*a2, **k2))
        base = _tensor_leaves(built(name)(*a2, **k2))
    names, tensors, _ = onnx_input_layout(model, a2, k2)
    got = run_onnx(path, dict(zip(names, tensors)))
    assert max_relative_error(got[0], expected[0]) <= RTOL
    assert max_relative_error(base[0], expected[0]) > 1e-3  # the moved weights do matter


def test_production_flavour_exports_with_its_head(built, tmp_path):
    """``flavour="deepseek-v4"``: their coefficient op, fp32 collapse and learned head decompose to standard ONNX ops
    and run in onnxruntime with the PyTorch outputs, connections moved off their init (so the head counts)."""
    from .helpers import moved_copy

    entry = ZOO["llama"]
    gen = torch.Generator().manual_seed(0)
    args, kwargs = entry.inputs(batch=EXPORT_BATCH, seq=EXPORT_SEQ, generator=gen)
    model = moved_copy(hc_rewrite.rewrite(built("llama"), args, kwargs, variant="mhc", flavour="deepseek-v4",
                                          form="graph"))
    path = export_onnx(model, args, tmp_path / "llama_dsv4.onnx", example_kwargs=kwargs)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    for batch, seq in ((1, 5), (3, 13)):
        a2, k2 = entry.inputs(batch=batch, seq=seq, generator=gen)
        with torch.no_grad():
            expected = _tensor_leaves(model(*a2, **k2))
        got = run_onnx(path, k2)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert max_relative_error(g, e) <= RTOL
