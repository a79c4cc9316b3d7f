"""What people put around a compiled model gives the eager numbers, or says why not (issue 21, item 5).

Activation checkpointing with ``torch.compile`` in both orders, each block compiled with ``fullgraph=True`` (compile
each block, then checkpoint it; checkpoint, then compile, as torchtitan does: the checkpointed region traced with the
site math through ``CheckpointMode``), one graph the blocks share; a region that holds one end of a site only gives
the eager numbers or an error, never other numbers; selective activation checkpointing (``context_fn`` policies, as torchtitan's
op-level SAC) eager and compiled, PEFT LoRA under compile (one graph), ``generate`` of a compiled model. Hooks under
compile are in test_one_graph.py; FSDP2 with per-block compile on 2 gloo ranks in test_distributed.py.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

import hc_rewrite
from benchmarks.e2e import GPTStack
from hc_rewrite.zoo import ZOO

from .helpers import CountingBackend, assert_pairwise_cover, moved_copy, rel_err

VARIANTS = ("mhc", "frac", "hc")
BACKEND = "aot_eager"


def _policy(ctx, op, *args, **kwargs):
    """torchtitan's op-level SAC in small: keep matmul outputs, recompute the rest."""
    return CheckpointPolicy.MUST_SAVE if op in (torch.ops.aten.mm.default,) else CheckpointPolicy.PREFER_RECOMPUTE


SAC = functools.partial(create_selective_checkpoint_contexts, _policy)


@functools.lru_cache(maxsize=None)
def _rewritten(variant):
    torch.manual_seed(0)
    model = GPTStack(32, 3).train()  # a pre-norm transformer stack, 2 sites per block
    return moved_copy(hc_rewrite.rewrite(model, (torch.randn(2, 8, 32),), variant=variant, n=4), 1)


def _run(model, x):
    """Output and every parameter's gradient of a random-projection loss (keys without wrapper prefixes)."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).mean().backward()
    strip = ("._checkpoint_wrapped_module", "_orig_mod.")
    grads = {}
    for k, p in model.named_parameters():
        for s in strip:
            k = k.replace(s, "")
        grads[k] = p.grad.clone()
    return out.detach(), grads


def _assert_same(got, ref):
    (out, grads), (ref_out, ref_grads) = got, ref
    assert rel_err(ref_out, out) <= 1e-5
    assert grads.keys() == ref_grads.keys() and any(k.startswith("hc.") for k in grads)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)


def _wrap(model, order, context_fn=None, fullgraph=True):
    """Checkpoint every block and compile every block (``fullgraph``: as torchtitan does), in ``order``."""
    kw = {} if context_fn is None else {"context_fn": context_fn}
    blocks = model.blocks
    for i, block in enumerate(blocks):
        if order == "compile-then-checkpoint":
            block.compile(backend=BACKEND, fullgraph=True)
            blocks[i] = checkpoint_wrapper(block, **kw)
        elif order == "checkpoint-then-compile":
            blocks[i] = checkpoint_wrapper(block, **kw)
            blocks[i].compile(backend=BACKEND, fullgraph=fullgraph)
        else:  # checkpoint only, eager
            blocks[i] = checkpoint_wrapper(block, **kw)
    return model


ORDERS = ("eager", "compile-then-checkpoint", "checkpoint-then-compile")
#: variant x order, each with AC or SAC so that every (variant, AC/SAC) and (order, AC/SAC) pair occurs too: a pairwise
#: covering array of the 18-case product (torchtitan's order, checkpoint then compile, with SAC for mHC)
CHECKPOINT_CASES = [
    ("mhc", True, ORDERS[0]), ("mhc", False, ORDERS[1]), ("mhc", True, ORDERS[2]),
    ("frac", False, ORDERS[0]), ("frac", True, ORDERS[1]), ("frac", False, ORDERS[2]),
    ("hc", True, ORDERS[0]), ("hc", True, ORDERS[1]), ("hc", False, ORDERS[2]),
]


def test_the_checkpoint_cases_cover_every_pair_of_factors():
    assert_pairwise_cover(CHECKPOINT_CASES, [VARIANTS, (False, True), ORDERS])


@pytest.mark.parametrize("variant,sac,order", CHECKPOINT_CASES,
                         ids=[f"{o}-{'sac' if s else 'ac'}-{v}" for v, s, o in CHECKPOINT_CASES])
def test_checkpointing_with_and_without_compile_gives_the_eager_gradients(variant, sac, order):
    new = _rewritten(variant)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(3))  # not the capture's shape
    ref = _run(new, x)
    torch._dynamo.reset()
    model = _wrap(copy.deepcopy(new), order, SAC if sac else None)
    _assert_same(_run(model, x), ref)


def _block_graphs(model, order="compile-then-checkpoint") -> int:
    """Graphs compiled for the blocks' forward (each block compiled and checkpointed with SAC, in ``order``), one
    call; a graph break fails (``fullgraph=True``)."""
    torch._dynamo.reset()
    counts = []

    def backend(gm, example_inputs):
        if "qkv" in gm.code:  # the block's forward (a hook of a compiled module is a frame of its own: the start's)
            counts.append(gm)
        return gm.forward

    for i, block in enumerate(model.blocks):
        if order == "compile-then-checkpoint":
            block.compile(backend=backend, fullgraph=True)
            model.blocks[i] = checkpoint_wrapper(block, context_fn=SAC)
        else:
            model.blocks[i] = checkpoint_wrapper(block, context_fn=SAC)
            model.blocks[i].compile(backend=backend, fullgraph=True)
    _run(model, torch.randn(2, 8, 32))
    return len(counts)


@pytest.mark.parametrize("order", ["compile-then-checkpoint", "checkpoint-then-compile"])
def test_checkpointed_blocks_compile_to_graphs_they_share(order):
    """The number of graphs does not grow with depth (never one per layer): the first block (its input does not
    require grad), the others, mHC's last (no ``H_res`` at its last site: other parameter shapes); compiled, then
    checkpointed, each once more for the recompute in backward (it runs outside the model's forward, without its
    CheckpointMode on the torch function mode stack, which dynamo guards)."""
    counts = {}
    for layers in (3, 4):
        torch.manual_seed(0)
        model = GPTStack(32, layers).train()
        new = hc_rewrite.rewrite(model, (torch.randn(2, 8, 32),), variant="mhc", n=4)
        counts[layers] = _block_graphs(new, order)
    assert counts[3] == counts[4] <= (3 if order == "checkpoint-then-compile" else 6)


class _SplitRegion(torch.nn.Module):
    """A block that checkpoints a site's branch entry but not its add (the site crosses the region's boundary open),
    or (``nested``) checkpoints a region inside a checkpointed region."""

    def __init__(self, d, nested=False):
        super().__init__()
        self.nested = nested
        self.norm, self.fc = torch.nn.LayerNorm(d), torch.nn.Linear(d, d)
        self.norm2, self.fc2 = torch.nn.LayerNorm(d), torch.nn.Linear(d, d)

    def _block(self, x):
        x = x + self.fc(self.norm(x))
        return x + self.fc2(self.norm2(x))

    def forward(self, x):
        ckpt = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        if self.nested:
            return ckpt(lambda t: ckpt(self._block, t), x)
        x = x + ckpt(lambda t: self.fc(self.norm(t)), x)
        return x + self.fc2(self.norm2(x))


@pytest.mark.parametrize("nested", [False, True], ids=["open-site", "nested"])
def test_a_region_with_an_open_site_or_nested_gives_the_eager_numbers_or_names_the_cause(nested):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), _SplitRegion(16, nested), _SplitRegion(16, nested)).train()
    x = torch.randn(2, 5, 16)
    new = moved_copy(hc_rewrite.rewrite(model, (x,), variant="mhc"))
    ref = _run(new, x)
    for fullgraph in (False, True):
        torch._dynamo.reset()
        compiled = copy.deepcopy(new)
        for block in list(compiled)[1:3]:
            block.compile(backend=BACKEND, fullgraph=fullgraph)
        if fullgraph and nested:  # the inner region is handed to the stream value: eager, a graph break
            with pytest.raises(Exception, match="nested in another checkpointed region"):
                compiled(x)
        else:
            _assert_same(_run(compiled, x), ref)


@pytest.mark.parametrize("variant", ["mhc", "frac"])  # HC shares mHC's widened-stream code
def test_peft_lora_under_compile_is_one_graph_with_eager_gradients(variant):
    import peft

    model = ZOO["llama"].build().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(5))
    new = moved_copy(hc_rewrite.rewrite(model, (ids,), variant=variant), 1)
    lora = peft.get_peft_model(new, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # LoRA's B starts at zero: move it so its gradients and output are not trivial
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    lora.train()
    ids = torch.randint(0, model.config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(6))

    def run(m):
        lora.zero_grad(set_to_none=True)
        loss = m(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in lora.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = run(lora)
    assert ref_grads and all("lora_" in k for k in ref_grads)
    torch._dynamo.reset()
    backend = CountingBackend(BACKEND)
    loss, grads = run(torch.compile(lora, backend=backend, fullgraph=True))  # a graph break raises
    assert backend.graphs == 1
    assert rel_err(ref_loss, loss) <= 1e-5
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("variant", ["mhc", "frac"])
def test_generate_of_a_compiled_model_gives_the_eager_tokens_and_scores(variant):
    model = ZOO["llama"].build().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(5))
    new = moved_copy(hc_rewrite.rewrite(model, (ids,), variant=variant), 1)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    ref = new.generate(ids, **gen)
    torch._dynamo.reset()
    compiled = copy.deepcopy(new)
    compiled.compile(backend=BACKEND)  # generate calls the module: the compiled call
    got = compiled.generate(ids, **gen)
    assert torch.equal(ref.sequences, got.sequences)
    assert max(rel_err(a, b) for a, b in zip(ref.scores, got.scores)) <= 1e-5


def test_hf_gradient_checkpointing_under_a_whole_model_fullgraph_compile():
    """HF's own per-layer checkpointing inside ``torch.compile(model, fullgraph=True)``: one graph, eager's values and
    gradients. (HF's forward writes a context variable in the checkpointed layer, which dynamo refuses for the plain
    model too unless ``skip_fwd_side_effects_in_bwd_under_checkpoint`` is on, as torchtitan sets it.)"""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=4, use_cache=False)
    model = transformers.LlamaForCausalLM(config)
    new = moved_copy(hc_rewrite.rewrite(model, (torch.randint(0, 64, (2, 7)),), variant="mhc")).train()
    x = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1))

    def run(m):
        m.zero_grad(set_to_none=True)
        out = m(x).logits
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
        return out.detach(), {k.replace("_orig_mod.", ""): p.grad.clone() for k, p in m.named_parameters()}

    ref = run(new)
    checkpointed = copy.deepcopy(new)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch._dynamo.reset()
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        backend = CountingBackend(BACKEND)
        _assert_same(run(torch.compile(checkpointed, fullgraph=True, backend=backend)), ref)
        assert backend.graphs == 1
