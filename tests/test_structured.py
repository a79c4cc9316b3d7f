"""The structure-preserving rewrite (the default ``form="module"``): the rewritten model is the user's model.

One test (or a few) per numbered point of the acceptance list: class and module tree, every input at any
shape, Python control flow and dropout, generate, save / load, and module-level tools (hooks, PEFT,
activation checkpointing, torch.compile). Distributed training is in tests/test_distributed.py.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hc_rewrite
from hc_rewrite.stream_value import StreamError
from hc_rewrite.zoo import ZOO
from hc_rewrite.zoo_handwritten import SameTensorTwoLayouts

from .helpers import moved_copy, rel_err, snapshot

TOL = 1e-5


def _ids(model, batch, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)


@pytest.fixture(scope="module")
def llama():
    """A HF Llama and its mHC rewrite, captured at batch 1 (so nothing may specialise the batch dim)."""
    model = ZOO["llama"].build().eval()
    before = snapshot(model)
    new = hc_rewrite.rewrite(model, (_ids(model, 1, 6),), variant="mhc", n=4)
    return model, new, before


# ----------------------------------------------------------------------------- 1. class and module tree
def test_class_and_module_tree_are_the_users(llama):
    model, new, before = llama
    assert type(new) is type(model)
    assert type(new.model.layers) is nn.ModuleList
    assert type(new.model.layers[0].self_attn.q_proj) is nn.Linear
    orig_names = {n for n, _ in model.named_modules()}
    new_names = {n for n, _ in new.named_modules()}
    assert orig_names <= new_names
    assert all(n == "hc" or n.startswith("hc.") for n in new_names - orig_names)
    assert new.config.vocab_size == model.config.vocab_size
    assert new.get_input_embeddings() is new.model.embed_tokens
    assert callable(new.generate) and callable(new.save_pretrained)
    # every original parameter keeps its name; the new ones live under hc.
    keys = set(new.state_dict())
    assert set(model.state_dict()) <= keys
    assert all(k.startswith("hc.") for k in keys - set(model.state_dict()))
    # the caller's model is untouched: same weights, no hooks added
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_forward_hooks_on_original_submodules_fire_and_act(llama):
    model, new, _ = llama
    new = copy.deepcopy(new)
    ids = _ids(model, 2, 7, seed=1)
    calls = []
    target = new.model.layers[1].mlp.down_proj
    h = target.register_forward_hook(lambda m, a, out: calls.append(out.shape))
    with torch.no_grad():
        base = new(ids).logits
    assert calls == [torch.Size([2, 7, model.config.hidden_size])]
    h.remove()
    target.register_forward_hook(lambda m, a, out: out * 0)  # the module really computes the branch
    with torch.no_grad():
        zeroed = new(ids).logits
    assert rel_err(base, zeroed) > 1e-3


# ----------------------------------------------------------------------------- 2. every input, any shape
@pytest.mark.parametrize("batch,seq", [(1, 5), (3, 9), (4, 16)])
def test_any_batch_and_length_after_capture_at_batch_one(llama, batch, seq):
    model, new, _ = llama
    ids = _ids(model, batch, seq, seed=batch)
    with torch.no_grad():
        assert rel_err(model(ids).logits, new(ids).logits) <= TOL


def test_padding_mask_labels_hidden_states_and_return_dict(llama):
    model, new, _ = llama
    ids = _ids(model, 3, 10, seed=2)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    labels = ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        a = model(ids, attention_mask=mask, labels=labels, output_hidden_states=True)
        b = new(ids, attention_mask=mask, labels=labels, output_hidden_states=True)
        t = new(ids, attention_mask=mask, return_dict=False)
    assert rel_err(a.logits, b.logits) <= TOL
    assert abs(a.loss.item() - b.loss.item()) <= TOL * abs(a.loss.item())
    assert len(a.hidden_states) == len(b.hidden_states)
    for ha, hb in zip(a.hidden_states, b.hidden_states):  # the reduced stream: the original's value at init
        assert type(hb) is torch.Tensor and rel_err(ha, hb) <= TOL
    assert isinstance(t, tuple) and rel_err(a.logits, t[0]) <= TOL


def test_kv_cache_step_matches_the_original(llama):
    model, new, _ = llama
    ids = _ids(model, 2, 8, seed=3)
    with torch.no_grad():
        pa = model(ids[:, :6], use_cache=True)
        pb = new(ids[:, :6], use_cache=True)
        a = model(ids[:, 6:], past_key_values=pa.past_key_values, use_cache=True).logits
        b = new(ids[:, 6:], past_key_values=pb.past_key_values, use_cache=True).logits
    assert rel_err(a, b) <= TOL


# fp64: the connection parameters were initialised in fp32 (the model was), so ~1e-8 of init rounding stays
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.bfloat16, 5e-2)])
def test_to_dtype_after_the_rewrite(llama, dtype, tol):
    model, new, _ = llama
    m2, n2 = copy.deepcopy(model).to(dtype), copy.deepcopy(new).to(dtype)
    assert all(p.dtype == dtype for p in n2.hc.parameters())
    ids = _ids(model, 2, 9, seed=4)
    with torch.no_grad():
        a, b = m2(ids).logits, n2(ids).logits
    assert b.dtype == dtype and rel_err(a, b) <= tol


# ----------------------------------------------------------------------------- 3. never silently different
class ShapeBranchNet(nn.Module):
    """Python control flow on a shape, on ``self.training``, and functional dropout in the branch."""

    def __init__(self, d=16, p=0.3):
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(3))
        self.fcs = nn.ModuleList(nn.Linear(d, d) for _ in range(3))
        self.p = p

    def forward(self, x):
        h = self.inp(x)
        for norm, fc in zip(self.norms, self.fcs):
            y = fc(norm(h))
            if x.shape[0] > 2:  # the capture at batch 2 takes the other branch
                y = y * 2.0
            if self.training:
                y = F.dropout(y, self.p, True)
            h = h + y
        return h


def test_shape_branch_taken_as_in_the_original():
    model = ShapeBranchNet().eval()
    x2 = torch.randn(2, 5, 8)
    new = hc_rewrite.rewrite(model, (x2,), variant="mhc")
    x5 = torch.randn(5, 5, 8)
    with torch.no_grad():
        assert rel_err(model(x5), new(x5)) <= TOL
        assert rel_err(model(x2), new(x2)) <= TOL


def test_functional_dropout_and_training_branches_follow_the_mode():
    model = ShapeBranchNet()
    x = torch.randn(3, 5, 8)
    new = hc_rewrite.rewrite(model.eval(), (x,), variant="hc")
    model.train(), new.train()
    torch.manual_seed(7)
    a = model(x)
    torch.manual_seed(7)
    b = new(x)
    assert rel_err(a, b) <= TOL  # same RNG draws: the same dropout masks as the original
    new.eval()
    with torch.no_grad():
        assert rel_err(b, new(x)) > 1e-2  # and dropout really is active in train mode only


def test_hf_attention_and_residual_dropout_in_train_mode():
    model = ZOO["gpt2"].build()
    model.config.resid_pdrop = model.config.attn_pdrop = model.config.embd_pdrop = 0.2
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.2
    ids = _ids(model, 2, 8)
    new = hc_rewrite.rewrite(model.eval(), (ids,), variant="mhc")
    model.train(), new.train()
    torch.manual_seed(3)
    a = model(ids).logits
    torch.manual_seed(3)
    b = new(ids).logits
    assert rel_err(a, b) <= TOL


# ----------------------------------------------------------------------------- 4. generate
@pytest.mark.parametrize("name,cls", [("llama", None), ("gpt2", None), ("t5", "T5ForConditionalGeneration"),
                                      ("bart", "BartForConditionalGeneration")])
def test_generate_gives_the_same_greedy_tokens(name, cls):
    import transformers

    model = ZOO[name].build()
    if cls is not None:  # the zoo has the bare encoder-decoders; generate needs the LM head
        model = getattr(transformers, cls)(model.config)
        model.config.decoder_start_token_id = model.generation_config.decoder_start_token_id = 0
    model.eval()
    ids = _ids(model, 2, 7, seed=5)
    kwargs = {"decoder_input_ids": ids[:, :3]} if cls is not None else {}
    new = hc_rewrite.rewrite(model, (ids,), kwargs, variant="mhc")
    gen = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    a = model.generate(ids, **gen)
    b = new.generate(ids, **gen)
    assert torch.equal(a.sequences, b.sequences)
    assert max(rel_err(x, y) for x, y in zip(a.scores, b.scores)) <= TOL  # every step's logits, KV cache on
    if cls is None:
        assert len(set(a.sequences[0].tolist())) > 2  # a real sequence, not one repeated token


# ----------------------------------------------------------------------------- 5. save / load
def test_save_pretrained_and_from_pretrained_roundtrip(llama, tmp_path):
    model, new, _ = llama
    moved = moved_copy(new)
    moved.save_pretrained(tmp_path)
    back = hc_rewrite.from_pretrained(tmp_path)
    assert type(back) is type(model)
    ids = _ids(model, 2, 9, seed=6)
    with torch.no_grad():
        a, b = moved(ids).logits, back(ids).logits
        assert rel_err(model(ids).logits, a) > 1e-4  # the connection parameters did move
    assert torch.equal(a, b)
    assert back.hc_plan.to_dict() == new.hc_plan.to_dict()


def test_a_config_object_that_is_not_transformers_is_never_written_to():
    """torchtitan's model configs are slotted dataclasses with ``to_dict``: the plan lives on the model only."""
    import dataclasses

    @dataclasses.dataclass(slots=True)
    class Config:
        dim: int = 16

        def to_dict(self):
            return dataclasses.asdict(self)

    model = ShapeBranchNet().eval()
    model.config = Config()
    x = torch.randn(2, 5, 8)
    new = hc_rewrite.rewrite(model, (x,), variant="mhc", n=4)
    assert new.config.to_dict() == {"dim": 16} and not hasattr(new.config, "hc_rewrite")
    assert new.hc_plan.to_dict()["streams"]
    assert rel_err(model(x), new(x)) <= TOL
    hc_rewrite.strip(new)  # and back
    assert new.config.to_dict() == {"dim": 16}


def test_plain_module_state_dict_and_plan_roundtrip():
    model = ShapeBranchNet().eval()
    x = torch.randn(2, 5, 8)
    new = moved_copy(hc_rewrite.rewrite(model, (x,), variant="frac", n=4))
    plan, state = new.hc_plan.to_json(), new.state_dict()
    back = hc_rewrite.rebuild(ShapeBranchNet().eval(), plan, state)
    with torch.no_grad():
        assert torch.equal(new(x), back(x))


# ----------------------------------------------------------------------------- 6. module-level tools
def test_peft_lora_changes_the_output_and_trains(llama):
    import peft  # a test dependency: a missing PEFT is a failure, not a skip

    model, new, _ = llama
    lora = peft.get_peft_model(copy.deepcopy(new), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = _ids(model, 2, 8, seed=8)
    with torch.no_grad():
        before = lora(ids).logits
    opt = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.5)
    lora.train()
    for _ in range(2):
        opt.zero_grad()
        lora(ids, labels=ids).loss.backward()
        opt.step()
    lora.eval()
    with torch.no_grad():
        after = lora(ids).logits
    assert rel_err(before, after) > 1e-4
    trained = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)


def test_transformers_trainer_gets_a_loss_and_trains(llama, tmp_path):
    import transformers

    model, new, _ = llama
    moved = copy.deepcopy(new).train()
    ids = _ids(model, 8, 12, seed=11)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                                          learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1,
                                          save_strategy="no")
    before = {k: v.clone() for k, v in moved.hc.state_dict().items()}
    trainer = transformers.Trainer(model=moved, args=args, train_dataset=data)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(before[k], v) for k, v in moved.hc.state_dict().items())  # the connections train


def _grads(model, ids):
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_per_layer_gives_the_same_gradients(llama):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    model, new, _ = llama
    ids = _ids(model, 2, 8, seed=9)
    plain = moved_copy(new).train()
    ref = _grads(plain, ids)
    assert any(k.startswith("hc.") for k in ref)
    ckpt = copy.deepcopy(plain)
    layer_cls = type(ckpt.model.layers[0])
    apply_activation_checkpointing(ckpt, check_fn=lambda m: isinstance(m, layer_cls))
    got = _grads(ckpt, ids)
    got = {k.replace("._checkpoint_wrapped_module", ""): v for k, v in got.items()}
    assert got.keys() == ref.keys()
    assert max(rel_err(ref[k], got[k]) for k in ref) <= 1e-5
    hf = copy.deepcopy(plain)
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    got = _grads(hf, ids)
    assert max(rel_err(ref[k], got[k]) for k in ref) <= 1e-5


def test_reentrant_checkpointing_is_a_clear_error(llama):
    model, new, _ = llama
    hf = copy.deepcopy(new).train()
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    ids = _ids(model, 2, 8)
    with pytest.raises(StreamError, match="use_reentrant=False"):
        hf(ids, labels=ids).loss.backward()


@pytest.mark.parametrize("backend,options", [("aot_eager", None), ("hc_rewrite", {"compiler": "aot_eager"})])
def test_torch_compile_whole_model_and_one_block(llama, backend, options):
    """Compiles and stays exact; the stream ops run eagerly between the compiled graphs (graph breaks)."""
    model, new, _ = llama
    moved = moved_copy(new)
    ids = _ids(model, 2, 8, seed=10)
    with torch.no_grad():
        ref = moved(ids).logits
    torch._dynamo.reset()
    compiled = torch.compile(moved, backend=backend, options=options)
    with torch.no_grad():
        assert rel_err(ref, compiled(ids).logits) <= TOL
    block = copy.deepcopy(moved)
    block.model.layers[0].compile(backend=backend, options=options)
    with torch.no_grad():
        assert rel_err(ref, block(ids).logits) <= TOL


def test_inplace_op_on_the_stream_is_an_error_not_a_wrong_result():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(16)
            self.fc = nn.Linear(16, 16)
            self.ln2 = nn.LayerNorm(16)
            self.fc2 = nn.Linear(16, 16)
            self.scale = False

        def forward(self, h):
            h = h + self.fc(self.ln(h))
            if self.scale:
                h.mul_(2.0)  # the captured call never ran this
            return h + self.fc2(self.ln2(h))

    model = InPlace().eval()
    x = torch.randn(2, 4, 16)
    new = hc_rewrite.rewrite(model, (x,), variant="mhc")
    new.scale = True
    with pytest.raises(StreamError, match="in-place mul_"):
        new(x)


def test_compile_stream_ops_hands_the_stream_math_to_the_backend(llama):
    """``torch.compile(model)`` runs the stream ops eagerly between graphs; ``compile_stream_ops`` compiles each
    site's math with the hc_rewrite backend (which lowers it to the fused kernels on CUDA) and stays exact."""
    from hc_rewrite.backend import hc_rewrite_backend
    from hc_rewrite.backend import stream_op_nodes

    model, new, _ = llama
    moved = moved_copy(new)
    ids = _ids(model, 2, 8, seed=12)
    with torch.no_grad():
        ref = moved(ids).logits
    seen = []

    def spy(gm, example_inputs):
        seen.append(len(stream_op_nodes(gm)))
        return hc_rewrite_backend(gm, example_inputs, options={"compiler": "aot_eager"})

    torch._dynamo.reset()
    hc_rewrite.compile_stream_ops(moved, backend=spy)
    with torch.no_grad():
        assert rel_err(ref, moved(ids).logits) <= TOL
        other = _ids(model, 3, 5)
        assert rel_err(moved_copy(new)(other).logits, moved(other).logits) <= TOL  # another shape, same compile
    assert seen and all(k > 0 for k in seen)  # every graph the backend got holds stream ops
    assert len(seen) <= 4  # compiled once per kind of site math (dynamic shapes), not once per call
    moved.train()
    moved(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in moved.hc.parameters())


def test_a_result_that_differs_from_the_original_is_refused(monkeypatch):
    """The check run compares the rewritten model with the original on the example call: broken site math
    (here the post op shifted by 0.1) is a StructureError, and the caller's model is untouched."""
    import hc_rewrite.stream_value as sv

    model = ShapeBranchNet().eval()
    before = snapshot(model)
    real = sv.site_post

    def broken(variant, w, y, h_post, h_res):
        w_new, end = real(variant, w, y, h_post, h_res)
        return w_new, end + 0.1

    monkeypatch.setattr(sv, "site_post", broken)
    with pytest.raises(hc_rewrite.StructureError, match="differs from the original"):
        hc_rewrite.rewrite(model, (torch.randn(2, 5, 8),), variant="mhc")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_rewriting_a_rewritten_model_again_is_refused(llama):
    model, new, _ = llama
    with pytest.raises(ValueError, match="already rewritten"):
        hc_rewrite.rewrite(new, (_ids(model, 1, 6),), variant="hc")


def test_models_sharing_an_input_tensor_keep_their_own_streams():
    """A stream that starts at the model's input: the caller's tensor is never turned into a stream value, so
    several rewritten models (other variants) can take the same tensor object, in any order."""
    model = ShapeBranchNet(d=16).eval()
    inp = torch.randn(2, 5, 8)
    h = model.inp(inp).detach()  # a stream that starts at the input of the model below

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.norms = model.norms
            self.fcs = model.fcs

        def forward(self, x):
            for norm, fc in zip(self.norms, self.fcs):
                x = x + fc(norm(x))
            return x

    stack = Stack().eval()
    news = [hc_rewrite.rewrite(stack, (h,), variant=v, n=4) for v in ("frac", "mhc", "hc")]
    with torch.no_grad():
        ref = stack(h)
        for _ in range(2):
            for new in news:
                assert rel_err(ref, new(h)) <= TOL
    assert type(h) is torch.Tensor and not hasattr(h, "_hc_info")


@pytest.mark.parametrize("variant", ["mhc", "frac", "hc"])
def test_stream_starting_from_another_streams_value(variant):
    torch.manual_seed(0)
    model, x = SameTensorTwoLayouts().eval(), torch.randn(2, 16, 16)
    new = hc_rewrite.rewrite(model, (x,), variant=variant)
    rep = new.hc_report
    assert not rep.refused and [(s.layout, s.sites) for s in rep.streams] == [
        ("channels-first", 2), ("channels-last", 2), ("channels-first", 1)]
    x2 = torch.randn(5, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(new(x2), model(x2), rtol=1e-5, atol=1e-5)
    new.train()
    new(x2).pow(2).mean().backward()
    assert not [n for n, p in new.hc.named_parameters() if p.grad is None]


def test_a_root_nn_sequential_keeps_working():
    """``nn.Sequential`` calls every child in turn: ``model.hc`` (added last) hands its input back unchanged."""

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.norm, self.fc = nn.LayerNorm(d), nn.Linear(d, d)

        def forward(self, x):
            return x + self.fc(self.norm(x))

    torch.manual_seed(0)
    model = nn.Sequential(Block(16), Block(16), nn.LayerNorm(16)).eval()
    x = torch.randn(2, 5, 16)
    for variant in hc_rewrite.variants.NAMES:
        new = hc_rewrite.rewrite(model, (x,), variant=variant)
        assert type(new) is nn.Sequential and len(new.hc_report.rewritten) == 2
        other = torch.randn(3, 4, 16)
        with torch.no_grad():
            assert rel_err(model(other), new(other)) < 1e-5
            assert rel_err(model(other), moved_copy(new)(other)) > 1e-4  # the connections take part
