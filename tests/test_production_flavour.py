"""``rewrite(..., variant="mhc", flavour="deepseek-v4" | "glm5-next")``: the production models' mHC as a rewrite option.

The flavoured site (coefficients, branch input, output) and head against the ``transformers`` modules themselves
(DeepSeek-V4, GLM-5-Next) with random weights, forward and gradients, fp32 and a bf16 stream; then the rewrite of a
real model: function-preserving at init at other shapes in both forms, the head where the stream ends, the model's
RMS eps, the module form equal to the graph form with moved connections, every connection parameter learning, one
compiled graph, save / load of the plan, bf16 models, and the errors of a spec that does not fit."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as dsv4
from transformers.models.glm5_next import modeling_glm5_next as glm5

import hc_rewrite
from hc_rewrite import production, variants
from hc_rewrite.errors import SpecError
from hc_rewrite.ops import reference as ref
from hc_rewrite.variants import eager
from hc_rewrite.variants.mhc_production import MHCProductionParams, key

from .helpers import CountingBackend, hc_targets, moved_copy, rel_err
from .test_production_parity import D, N, _randomise, _stream

def _site_modules(model, config_kw):
    if model == "deepseek_v4":
        config = dsv4.DeepseekV4Config(hidden_size=D, hc_mult=N, **config_kw)
        return config, dsv4.DeepseekV4HyperConnection(config)
    config = glm5.Glm5NextTextConfig(hidden_size=D, hc_mult=N, **config_kw)
    return config, glm5.Glm5NextTextHyperConnection(config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model", ["deepseek_v4", "glm5_next"])
def test_flavoured_site_is_theirs(model, dtype):
    """Our variant's ops with the mapped parameters give their ``collapsed`` input and their site output, and the
    same gradients w.r.t. the stream (a bf16 stream: their fp32 collapse and bf16 mixing, to bf16 rounding)."""
    config, module = _site_modules(model, dict(rms_norm_eps=1e-5, hc_eps=1e-4))
    _randomise(module)
    w, y = _stream(dtype=dtype)
    post, comb, collapsed = module(w)
    theirs = (collapsed, post.to(dtype).unsqueeze(-1) * y.unsqueeze(-2)
              + torch.matmul(comb.to(dtype).transpose(-1, -2), w))

    params = production.from_deepseek_v4(module.fn, module.base, module.scale, D)
    variant = variants.get(key("deepseek-v4", config.rms_norm_eps, config.hc_eps))
    branch_in, h_post, h_res = variant.site_pre(eager, w, params.coeff_args(), config.hc_sinkhorn_iters)
    ours = (branch_in, variant.site_post(eager, w, y, h_post, h_res))
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for a, b in zip(theirs, ours):
        assert b.dtype == a.dtype == dtype
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)
    g = torch.Generator().manual_seed(7)
    weights = [torch.randn(t.shape, generator=g).to(dtype) for t in theirs]
    (ga,) = torch.autograd.grad(sum((u * t).float().sum() for u, t in zip(weights, theirs)), w)
    (gb,) = torch.autograd.grad(sum((u * t).float().sum() for u, t in zip(weights, ours)), w)
    torch.testing.assert_close(gb, ga, rtol=tol, atol=tol)


def test_flavoured_head_is_theirs():
    config = dsv4.DeepseekV4Config(hidden_size=D, hc_mult=N, rms_norm_eps=1e-5, hc_eps=1e-4)
    head = _randomise(dsv4.DeepseekV4HyperHead(config))
    params = MHCProductionParams(N, D, True, head=True, hc_eps=config.hc_eps)
    with torch.no_grad():
        for name in params.head_inputs:
            getattr(params, name).copy_(getattr(head, name))
    variant = variants.get(key("deepseek-v4", config.rms_norm_eps, config.hc_eps))
    w, _ = _stream()
    theirs, ours = head(w), variant.end(eager, w, params.head_args())
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    ga, gb = (torch.autograd.grad(t.square().sum(), w)[0] for t in (theirs, ours))
    torch.testing.assert_close(gb, ga, rtol=1e-6, atol=1e-6)
    # the GLM-5 flavour ends with the mean, as their head
    glm = variants.get(key("glm5-next", 1e-5, 1e-4))
    torch.testing.assert_close(glm.end(eager, w, []), glm5.Glm5NextTextHyperHead()(w))


# ----------------------------------------------------------------------------- the rewrite of a real model
def _llama(layers=3, dtype=torch.float32):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def _ids(batch, seq, seed):
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama():
    return _llama()


@pytest.mark.parametrize("flavour", ["deepseek-v4", "glm5-next"])
def test_rewrite_is_function_preserving_with_the_head_where_the_stream_ends(llama, flavour):
    ids = _ids(2, 7, 0)
    new = hc_rewrite.rewrite(llama, (ids,), variant="mhc", flavour=flavour)
    graph = hc_rewrite.rewrite(llama, (ids,), variant="mhc", flavour=flavour, form="graph")
    with torch.no_grad():
        other = _ids(3, 11, 1)
        assert rel_err(llama(other).logits, new(other).logits) < 1e-5  # another shape
        assert rel_err(llama(ids).logits, graph(ids).logits) < 1e-5
    sites = sorted(new.hc.named_children())
    assert len(sites) == 6 and all(isinstance(p, MHCProductionParams) for _, p in sites)
    assert all(p.b_res is not None for _, p in sites)  # their last layer mixes too
    heads = [name for name, p in sites if p.head_args()]
    assert heads == (["s0_5"] if flavour == "deepseek-v4" else [])
    ops = hc_targets(graph)
    assert ops.count("mhc_eps_coeffs") == 6 and ops.count("mhc_collapse") == 6
    assert ops.count("hyper_head") == (1 if flavour == "deepseek-v4" else 0)
    assert ops.count("reduce_stream") == (0 if flavour == "deepseek-v4" else 1)
    text = str(new.hc_report)
    assert f"({flavour}: rms_eps 1e-05 (config.rms_norm_eps), hc_eps 1e-06" in text
    # the plan keeps the flavour: a model rebuilt from it is the same model
    plan = hc_rewrite.structured.Plan.from_dict(new.hc_plan.to_dict())
    assert (plan.flavour, plan.rms_eps, plan.hc_eps) == (flavour, 1e-5, 1e-6)


def test_module_form_equals_graph_form_with_moved_connections_and_everything_learns(llama):
    ids = _ids(2, 7, 0)
    new = moved_copy(hc_rewrite.rewrite(llama, (ids,), variant="mhc", flavour="deepseek-v4"))
    graph = hc_rewrite.rewrite(llama, (ids,), variant="mhc", flavour="deepseek-v4", form="graph")
    graph.load_state_dict(new.state_dict())
    g = torch.Generator().manual_seed(3)
    proj = torch.randn(64, generator=g)
    out_m, out_g = new(ids).logits, graph(ids).logits
    assert rel_err(llama(ids).logits, out_m) > 1e-4  # the moved connections change the function
    assert rel_err(out_g, out_m) < 1e-5
    (out_m @ proj).sum().backward()
    (out_g @ proj).sum().backward()
    grads_g = dict(graph.named_parameters())
    for name, p in new.hc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert rel_err(grads_g[f"hc.{name}"].grad, p.grad) < 1e-4, name


def test_save_pretrained_and_from_pretrained_keep_the_flavour(llama, tmp_path):
    ids = _ids(2, 7, 0)
    new = moved_copy(hc_rewrite.rewrite(llama, (ids,), variant="mhc", flavour="deepseek-v4"))
    new.save_pretrained(tmp_path)
    back = hc_rewrite.from_pretrained(tmp_path)
    assert back.hc_plan.to_dict() == new.hc_plan.to_dict() and back.hc_plan.flavour == "deepseek-v4"
    other = _ids(2, 9, 6)
    with torch.no_grad():
        assert torch.equal(new(other).logits, back(other).logits)


def test_at_init_the_gates_learn_first(llama):
    """Their copies start identical, so only the gates (``alpha``, the head's ``hc_scale``) can break the symmetry:
    they have a gradient at the first step."""
    ids = _ids(2, 7, 0)
    new = hc_rewrite.rewrite(llama, (ids,), variant="mhc", flavour="deepseek-v4").train()
    out = new(ids).logits
    (out @ torch.randn(64, generator=torch.Generator().manual_seed(2))).sum().backward()
    for name, p in new.hc.named_parameters():
        if name.endswith(("alpha", "hc_scale")):
            assert p.grad.abs().max() > 0, name


def test_one_compiled_graph_equal_to_eager(llama):
    ids = _ids(2, 7, 0)
    new = moved_copy(hc_rewrite.rewrite(llama, (ids,), variant="mhc", flavour="deepseek-v4"))
    torch._dynamo.reset()
    backend = CountingBackend("inductor")
    compiled = torch.compile(new, fullgraph=True, backend=backend)  # a graph break raises
    other = _ids(3, 10, 5)
    with torch.no_grad():
        assert rel_err(new(other).logits, compiled(other).logits) < 1e-5
    assert backend.graphs == 1


def test_bf16_model_keeps_fp32_connections():
    model = _llama(layers=2, dtype=torch.bfloat16)
    ids = _ids(2, 7, 0)
    new = hc_rewrite.rewrite(model, (ids,), variant="mhc", flavour="deepseek-v4")
    assert {p.dtype for p in new.hc.parameters()} == {torch.float32}
    with torch.no_grad():
        a, b = model(ids).logits, new(ids).logits
    assert b.dtype == torch.bfloat16 and rel_err(a, b) < 2e-2


def test_rms_eps_from_the_model_or_given():
    class MyRMSNorm(torch.nn.Module):  # a user-written RMSNorm, no HF config
        def __init__(self, d):
            super().__init__()
            self.variance_epsilon, self.weight = 3e-6, torch.nn.Parameter(torch.ones(d))

        def forward(self, x):
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    class Block(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.norm, self.fc = MyRMSNorm(d), torch.nn.Linear(d, d)

        def forward(self, x):
            return x + self.fc(self.norm(x))

    model = torch.nn.Sequential(Block(16), Block(16)).eval()
    x = torch.randn(2, 5, 16)
    rep = hc_rewrite.report(model, (x,), variant="mhc", flavour="glm5-next")
    assert "rms_eps 3e-06 (0.norm.variance_epsilon)" in str(rep)
    new = hc_rewrite.rewrite(model, (x,), variant="mhc", flavour="glm5-next", rms_eps=1e-3)
    assert new.hc_plan.rms_eps == 1e-3
    assert "rms_eps 0.001 (given)" in str(new.hc_report)


@pytest.mark.parametrize("options, match", [
    (dict(variant="hc", flavour="deepseek-v4"), "flavour of mHC"),
    (dict(variant="mhc", flavour="deepseek"), "flavour must be one of"),
    (dict(variant="mhc", flavour="glm5-next", hc_eps=-1.0), "hc_eps must be"),
])
def test_a_flavour_that_does_not_fit_is_an_error_and_changes_nothing(llama, options, match):
    before = copy.deepcopy(llama.state_dict())
    with pytest.raises(SpecError, match=match):
        hc_rewrite.rewrite(llama, (_ids(2, 7, 0),), **options)
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())


def test_reference_collapse_is_ours_in_fp32():
    """The flavour's branch input equals the paper's ``stream_pre`` on an fp32 stream (they differ only in the
    precision of a low-precision stream's products)."""
    w, _ = _stream()
    h = torch.rand(2, 3, N)
    torch.testing.assert_close(production.collapse(w, h), ref.stream_pre(w, h))
