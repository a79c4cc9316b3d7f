"""The user's model, rewritten, compiles as one graph (issue 21, part 1).

``torch.compile(new, fullgraph=True)`` of the structure-preserving form traces the stream machinery (start, entry
and post of every site) into the model's graph: 1 graph (a counting backend), 0 breaks (``fullgraph`` raises at
one); values and gradients equal eager; per-block compile (``layer.compile(fullgraph=True)`` on every block, as
torchtitan does) compiles one graph that the blocks share; another batch size and sequence length cost at most one
recompile. Graph counts do not depend on the backend: these run on ``aot_eager`` (Inductor's own tests are elsewhere).
"""
from __future__ import annotations

import copy

import pytest
import torch

import hc_rewrite
from hc_rewrite.zoo import ZOO

from .helpers import CountingBackend, moved_copy, rel_err

TOL = 1e-5


def _main(out):
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return out[0]


def _rewrite(name, variant, seed=0):
    model = ZOO[name].build().eval()
    args, kwargs = ZOO[name].inputs(2, 8, torch.Generator().manual_seed(seed))
    return moved_copy(hc_rewrite.rewrite(model, args, kwargs, variant=variant, n=4), seed + 1)


def _loss_and_grads(model, args, kwargs):
    model.zero_grad(set_to_none=True)
    out = _main(model(*args, **kwargs))
    # a fixed random projection: a mean square of a normalised output (most models end in a norm) is nearly constant,
    # its gradients rounding noise that no comparison can use
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    (out.float() * probe).mean().backward()
    named = ((k.removeprefix("_orig_mod."), p) for k, p in model.named_parameters())
    return out.detach(), {k: p.grad.clone() for k, p in named if k.startswith("hc.") and p.grad is not None}


CASES = [("llama", "mhc"), ("llama", "frac"), ("llama", "hc"), ("gpt2", "mhc"), ("qwen2", "frac"), ("t5", "hc"),
         ("bert", "frac"), ("vit", "mhc"), ("convffn_transformer", "hc"), ("alternating_layouts", "mhc"),
         ("resnet", "mhc")]


def _assert_grads_close(grads, ref_grads):
    """Each gradient within 1e-4 of eager, relative to the largest gradient (a few are ~1e-7: rounding)."""
    assert grads.keys() == ref_grads.keys() and grads
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-4 * scale, msg=k)


@pytest.mark.parametrize("name,variant", CASES, ids=[f"{n}-{v}" for n, v in CASES])
def test_whole_model_is_one_graph_with_eager_values_and_gradients(name, variant):
    new = _rewrite(name, variant)
    args, kwargs = ZOO[name].inputs(3, 6, torch.Generator().manual_seed(7))  # not the capture's shape
    ref, ref_grads = _loss_and_grads(new, args, kwargs)  # eval mode: no dropout draw to differ
    torch._dynamo.reset()
    backend = CountingBackend("aot_eager")
    compiled = torch.compile(new, backend=backend, fullgraph=True)  # a graph break raises
    got, grads = _loss_and_grads(compiled, args, kwargs)
    assert backend.graphs == 1
    assert rel_err(got, ref) <= TOL
    _assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("variant", ["mhc", "frac", "hc"])
def test_per_block_compile_shares_one_graph_across_blocks(variant):
    """As torchtitan compiles: each decoder layer on its own, ``fullgraph=True``. Every layer gets the stream value
    and no site's position reaches the traced code, so the layers share one graph; mHC's last layer has one of its
    own (the stream's last site has no ``H_res``: other parameter shapes), so 2 graphs for any depth. Values and
    gradients equal eager."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(3))
    new = moved_copy(hc_rewrite.rewrite(model, (ids,), variant=variant, n=4))
    ref, ref_grads = _loss_and_grads(new, (ids,), {"use_cache": False})
    torch._dynamo.reset()
    backend = CountingBackend()
    for layer in new.model.layers:
        layer.compile(backend=backend, fullgraph=True)
    got, grads = _loss_and_grads(new, (ids,), {"use_cache": False})
    assert backend.graphs == (2 if variant == "mhc" else 1)
    assert rel_err(got, ref) <= TOL
    _assert_grads_close(grads, ref_grads)


def test_other_batch_and_sequence_cost_at_most_one_recompile():
    """Four batch / sequence shapes: the first call compiles, a second shape makes it dynamic, the rest reuse it
    (sizes of 1 specialise in torch itself, for the original model too: not used here)."""
    new = _rewrite("llama", "mhc")
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = torch.compile(new, backend=backend, fullgraph=True)
    for batch, seq in ((2, 8), (3, 5), (4, 13), (5, 7)):
        ids = torch.randint(0, new.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            assert rel_err(_main(compiled(ids)), _main(new(ids))) <= TOL
    assert backend.graphs <= 2


def test_hooks_fire_under_compile():
    """The user's own forward pre-hooks and hooks on a block fire in the compiled model as in eager."""
    new = _rewrite("llama", "mhc")
    ids = torch.randint(0, new.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(5))
    seen = []
    block = new.model.layers[1]
    block.register_forward_pre_hook(lambda m, a: seen.append("pre"))
    block.register_forward_hook(lambda m, a, o: seen.append("post"))
    with torch.no_grad():
        ref = _main(new(ids))
        assert seen == ["pre", "post"]
        torch._dynamo.reset()
        got = _main(torch.compile(new, backend="aot_eager", fullgraph=True)(ids))
    assert seen == ["pre", "post", "pre", "post"]
    assert rel_err(got, ref) <= TOL


def test_the_stream_starts_where_the_module_hands_it_over():
    """No stream is started by changing the class of a tensor the user's code holds (what dynamo cannot trace): the
    plan names the module whose output, or whose input, the stream value is made from."""
    llama = _rewrite("llama", "mhc")
    assert [s.start for s in llama.hc_plan.streams] == [["output", "model.embed_tokens"]]
    t5 = _rewrite("t5", "frac")
    assert [s.start[:2] for s in t5.hc_plan.streams] == [["input", "encoder.block.0.layer.0"],
                                                        ["input", "decoder.block.0.layer.0"]]
    again = hc_rewrite.rebuild(ZOO["llama"].build().eval(), llama.hc_plan.to_json(), llama.state_dict())
    assert [s.start for s in again.hc_plan.streams] == [["output", "model.embed_tokens"]]
    ids = torch.randint(0, llama.config.vocab_size, (2, 5))
    with torch.no_grad():
        assert rel_err(_main(again(ids)), _main(llama(ids))) <= TOL


def test_a_copy_compiles_as_its_own_model():
    new = _rewrite("llama", "hc")
    other = copy.deepcopy(new)
    with torch.no_grad():
        for p in other.hc.parameters():
            p.mul_(1.5)
    ids = torch.randint(0, new.config.vocab_size, (2, 8))
    torch._dynamo.reset()
    with torch.no_grad():
        a = _main(torch.compile(new, backend="aot_eager", fullgraph=True)(ids))
        b = _main(torch.compile(other, backend="aot_eager", fullgraph=True)(ids))
        assert rel_err(a, _main(new(ids))) <= TOL and rel_err(b, _main(other(ids))) <= TOL



@pytest.mark.parametrize("variant", ["mhc", "frac"])
def test_plain_torch_compile_lowers_the_stream_ops(variant):
    """Plain ``torch.compile(new)`` (Inductor, as torchtitan and the HF Trainer call it) runs the lowering stage too
    (``hc_rewrite.inductor_pass``, an Inductor pre-grad pass): Inductor's code calls no batched matmul for the
    per-token n x n products (the reference ops do, tests/passes/test_decompose_stream_ops.py), and the compiled
    values and gradients equal eager."""
    import re
    from collections import Counter

    from torch._inductor.utils import run_and_get_code

    from benchmarks.e2e import GPTStack

    torch.manual_seed(0)
    x = torch.randn(2, 16, 64)
    options = {"sinkhorn_iters": 3} if variant == "mhc" else {}
    new = moved_copy(hc_rewrite.rewrite(GPTStack(64, 1), (x,), variant=variant, n=4, **options))
    ref, ref_grads = _loss_and_grads(new, (x,), {})
    torch._dynamo.reset()
    compiled = torch.compile(new, fullgraph=True)
    (got, grads), code = run_and_get_code(lambda: _loss_and_grads(compiled, (x,), {}))
    calls = Counter(m for src in code for m in re.findall(r"extern_kernels\.(\w+)\(", src))
    assert calls["bmm"] == 0 and calls["mm"] > 0, calls
    assert rel_err(got, ref) <= 1e-5
    _assert_grads_close(grads, ref_grads)


def test_the_inductor_pass_is_registered_once_after_the_users():
    from torch._inductor import config

    from hc_rewrite.inductor_pass import PASS, register

    def users_pass(graph):
        return None

    previous = config.pre_grad_custom_pass
    try:
        config.pre_grad_custom_pass = users_pass
        register()
        register()
        assert config.pre_grad_custom_pass == [users_pass, PASS]
    finally:
        config.pre_grad_custom_pass = previous
