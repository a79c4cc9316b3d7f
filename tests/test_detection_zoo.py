"""Detection and rewrite across the zoo: every architecture rewritten and equivalent at init, with
the expected streams, sites and kinds; train/eval for batch norm; readers of the middle of a stream."""
from __future__ import annotations

import pytest
import torch

import hc_rewrite
from hc_rewrite.variants import NAMES as VARIANTS
from hc_rewrite.zoo import ZOO

#: the graph form over the zoo (the default form is checked over the whole zoo in test_structured_zoo); Swin's
#: dynamic-shape capture alone takes about a minute, so it is checked in the default form only; a model only a trace
#: of one call captures (Longformer) has no graph form
NAMES = sorted(set(ZOO) - {"swin"} - {n for n, e in ZOO.items() if "trace-capture" in e.tags})


def _main(out):
    if isinstance(out, torch.Tensor):
        return out
    return out[0]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("name", NAMES)
def test_zoo_model_rewritten_and_equivalent(name):
    entry = ZOO[name]
    model = entry.build()
    args, kwargs = entry.inputs()
    variant = VARIANTS[NAMES.index(name) % len(VARIANTS)]  # every model once, the variants rotated
    new = hc_rewrite.rewrite(model, args, kwargs, variant=variant, n=4, form="graph")
    rep = new.hc_report
    assert rep.rewritten and not rep.refused, str(rep)
    a2, k2 = entry.inputs(generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        assert _rel(_main(new(*a2, **k2)), _main(model(*a2, **k2))) <= 1e-5
    new.train()
    _main(new(*a2, **k2)).float().pow(2).mean().backward()
    dead = [n for n, p in new.hc.named_parameters() if p.grad is None]
    assert not dead, f"connection parameters that never enter the graph: {dead}"


EXPECTED = {
    # name: (streams, sites, kinds)
    "gpt2": (1, 4, {"pre-norm"}),
    "bert": (1, 4, {"post-norm"}),
    "t5": (2, 10, {"pre-norm"}),
    "bart": (2, 10, {"post-norm"}),
    "gptj": (1, 2, {"parallel"}),
    "falcon": (1, 2, {"parallel"}),
    "resnet": (2, 3, {"conv"}),
    "convnext": (2, 4, {"conv"}),
    # round 2: the feature axis from the data flow, side inputs, symbolic shapes, pooling
    "wav2vec2": (1, 5, {"pre-norm"}),  # x + pos_conv(x) joins the token stream (was width = sequence length)
    "convbert": (1, 4, {"post-norm"}),  # a conv in the attention branch
    "mpnet": (1, 4, {"post-norm"}),  # the shared position bias is not a stream
    "deberta_v2": (1, 4, {"post-norm"}),
    "pvt_v2": (2, 4, {"pre-norm"}),  # depthwise conv in the MLP: still channels-last
    "segformer": (2, 4, {"pre-norm"}),
    "poolformer": (2, 4, {"conv"}),  # x + (pool(x) - x) is a residual
    "convnext4": (4, 4, {"conv"}),  # last stage [B, C, 1, 1] at the example size
    "efficientnet": (3, 3, {"conv"}),  # padding="same" convolutions
    "unet_attention": (3, 7, {"conv"}),
    "convffn_transformer": (1, 5, {"pre-norm"}),
    "shared_bias_transformer": (1, 6, {"pre-norm"}),
    "mlp_mixer": (1, 4, {"pre-norm"}),
}
LAYOUT = {"wav2vec2": "channels-last", "convbert": "channels-last", "pvt_v2": "channels-last",
          "segformer": "channels-last", "convffn_transformer": "channels-last", "mlp_mixer": "channels-last",
          "unet_attention": "channels-first"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_streams_sites_and_kinds(name):
    entry = ZOO[name]
    args, kwargs = entry.inputs()
    rep = hc_rewrite.report(entry.build(), args, kwargs, variant="hc", n=2, form="graph")
    streams, sites, kinds = EXPECTED[name]
    assert len(rep.streams) == streams
    assert len(rep.rewritten) == sites
    assert {s.kind for s in rep.sites} == kinds
    if "conv" in kinds:
        assert {st.layout for st in rep.streams} == {"channels-first"}
    if name in LAYOUT:
        assert {st.layout for st in rep.streams} == {LAYOUT[name]}
    widths = {st.width for st in rep.streams}
    assert all(w in (8, 16, 24, 32, 40, 48, 64) for w in widths), widths  # hidden sizes, never a length


def test_resnet_shape_changing_shortcut_ends_the_stream():
    entry = ZOO["resnet"]
    args, kwargs = entry.inputs()
    rep = hc_rewrite.report(entry.build(), args, kwargs, form="graph")
    # stage 0: two blocks in one stream; stage 1 opens with a strided 1x1-conv shortcut (not a residual
    # add), so its second block starts a new stream.
    modules = {s.module: s.stream for s in rep.sites}
    assert modules["encoder.stages.0.layers.0"] == modules["encoder.stages.0.layers.1"]
    assert "encoder.stages.1.layers.0" not in modules
    assert modules["encoder.stages.1.layers.1"] != modules["encoder.stages.0.layers.0"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_norm_follows_train_and_eval(variant):
    entry = ZOO["resnet"]
    model = entry.build()
    args, kwargs = entry.inputs()
    new = hc_rewrite.rewrite(model, args, kwargs, variant=variant, n=4, form="graph")
    a2, k2 = entry.inputs(batch=4, generator=torch.Generator().manual_seed(5))
    model.train()
    new.train()
    with torch.no_grad():
        ref = _main(model(*a2, **k2))
        got = _main(new(*a2, **k2))
    assert _rel(got, ref) <= 1e-5  # batch statistics, as in the original
    key = "encoder.stages.0.layers.0.layer.0.normalization.running_mean"
    assert torch.allclose(new.state_dict()[key], model.state_dict()[key], atol=1e-6)  # updated alike
    assert new.state_dict()[key.replace("running_mean", "num_batches_tracked")] == 1
    model.eval()
    new.eval()
    with torch.no_grad():
        assert _rel(_main(new(*a2, **k2)), _main(model(*a2, **k2))) <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_hidden_states_read_the_reduced_stream(variant):
    entry = ZOO["llama"]
    model = entry.build()
    args, kwargs = entry.inputs()
    kwargs = dict(kwargs, output_hidden_states=True)
    new = hc_rewrite.rewrite(model, args, kwargs, variant=variant, n=4, form="graph")
    a2, k2 = entry.inputs(generator=torch.Generator().manual_seed(9))
    k2 = dict(k2, output_hidden_states=True)
    with torch.no_grad():
        ref, got = model(*a2, **k2), new(*a2, **k2)
    assert len(got.hidden_states) == len(ref.hidden_states) == 3
    for a, b in zip(got.hidden_states, ref.hidden_states):
        assert _rel(a, b) <= 1e-5
    ends = new.hc_report.streams[0].ends
    assert len(ends) >= 2  # the middle value and the last one are read reduced


def test_refused_site_says_why_and_model_stays_equivalent():
    class DenseLike(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 8)
            self.b = torch.nn.Linear(8, 8)

        def forward(self, x0):
            x1 = x0 + self.a(x0)
            x2 = x1 + (self.b(x1) + torch.tanh(x0) * 0.1)  # branch also reads x0 directly
            return x2

    model = DenseLike().eval()
    x = torch.randn(2, 8)
    rep = hc_rewrite.report(model, (x,), form="graph")
    assert len(rep.sites) == 2
    assert rep.sites[0].rewritten
    assert not rep.sites[1].rewritten and "dominate" in rep.sites[1].reason
    new = hc_rewrite.rewrite(model, (x,), form="graph")
    with torch.no_grad():
        assert _rel(new(x), model(x)) <= 1e-5


class ParallelBlocks(torch.nn.Module):
    """``x + attn(ln1(x)) + mlp(ln2(x))`` written as Python parses it: ``(x + attn) + mlp``."""

    def __init__(self, d=16, layers=3):
        super().__init__()
        self.ln1 = torch.nn.ModuleList([torch.nn.LayerNorm(d) for _ in range(layers)])
        self.ln2 = torch.nn.ModuleList([torch.nn.LayerNorm(d) for _ in range(layers)])
        self.attn = torch.nn.ModuleList([torch.nn.MultiheadAttention(d, 2, batch_first=True) for _ in range(layers)])
        self.mlp = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(d, 2 * d), torch.nn.GELU(),
                                                            torch.nn.Linear(2 * d, d)) for _ in range(layers)])

    def forward(self, x):
        for ln1, ln2, attn, mlp in zip(self.ln1, self.ln2, self.attn, self.mlp):
            h = ln1(x)
            x = x + attn(h, h, h, need_weights=False)[0] + mlp(ln2(x))
        return x


@pytest.mark.parametrize("variant", VARIANTS)
def test_parallel_blocks_written_left_to_right_make_one_site_per_layer(variant):
    model = ParallelBlocks().eval()
    x = torch.randn(2, 5, 16)
    new = hc_rewrite.rewrite(model, (x,), variant=variant, n=4, form="graph")
    rep = new.hc_report
    assert len(rep.rewritten) == 3 and len(rep.streams) == 1
    assert {s.kind for s in rep.sites} == {"parallel"}
    x2 = torch.randn(3, 7, 16)
    with torch.no_grad():
        assert _rel(new(x2), model(x2)) <= 1e-5
    # both branches read the mixed branch input, none reads the stream directly
    pre_ops = {torch.ops.hc_rewrite.stream_pre.default, torch.ops.hc_rewrite.frac_pre.default}
    pre = [n for n in new.graph.nodes if n.op == "call_function" and n.target in pre_ops]
    assert len(pre) == 3
