"""Acceptance 4: state_dict keeps the original names and values, adds ``hc.*``, round-trips through
torch.save / load_state_dict (into the same or a freshly rewritten module); train/eval is honoured."""
import copy
import io

import pytest
import torch

import hc_rewrite

from .helpers import EQUIV_MODELS, FRESH_SEED, VARIANTS, inputs, main_output, rel_err


def run(module, name, seed=FRESH_SEED):
    args, kwargs = inputs(name, seed)
    with torch.no_grad():
        return main_output(module(*args, **kwargs))


def perturb(module):
    """Change every parameter (original and hc.*) so that outputs differ."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("name", EQUIV_MODELS)
def test_original_parameters_kept_new_ones_under_hc(name, rewritten):
    r = rewritten(name, "mhc", True)
    new_sd = r.new.state_dict()
    orig_params = dict(r.model.named_parameters(remove_duplicate=False))
    for k, p in orig_params.items():
        assert k in new_sd, k
        assert torch.equal(new_sd[k], p.detach()), k
    for k, v in r.model.state_dict().items():  # buffers too
        assert k in new_sd and torch.equal(new_sd[k], v), k
    new_params = dict(r.new.named_parameters(remove_duplicate=False))
    extra = sorted(set(new_params) - set(orig_params))
    assert extra and all(k.startswith("hc.") for k in extra)
    assert not any(k.startswith("hc.") for k in orig_params)
    assert {k for k in new_sd if k.startswith("hc.")} == {f"hc.{k}" for k in r.new.hc.state_dict()}


def test_tied_weights_stay_tied(fresh_rewritten):
    """GPT-2 ties lm_head to the token embedding: still one tensor in the rewritten module, trained once."""
    new = fresh_rewritten("gpt2", "hc", True).new
    assert new.lm_head.weight is new.transformer.wte.weight
    opt = torch.optim.SGD(new.parameters(), lr=0.1)
    args, kwargs = inputs("gpt2", seed=55)
    main_output(new(*args, **kwargs)).pow(2).mean().backward()
    opt.step()
    assert torch.equal(new.state_dict()["lm_head.weight"], new.state_dict()["transformer.wte.weight"])


@pytest.mark.parametrize("name", [
    "gpt2", "llama", "bert", "vit", "minilm",
])
def test_state_dict_adds_only_hc_keys(name, fresh_rewritten):
    r = fresh_rewritten(name, "frac", True)
    extra = sorted(set(r.new.state_dict()) - set(r.model.state_dict()))
    assert extra and [k for k in extra if not k.startswith("hc.")] == []
    # so the original weights load into the rewritten module with only hc.* missing
    fresh = r.new
    result = fresh.load_state_dict(r.model.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith("hc.") for k in result.missing_keys)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_save_perturb_load_roundtrip(name, variant, fresh_rewritten):
    new = fresh_rewritten(name, variant, True).new
    new.eval()
    ref = run(new, name)
    buf = io.BytesIO()
    torch.save(new.state_dict(), buf)
    perturb(new)
    assert not torch.allclose(run(new, name), ref)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert new.load_state_dict(state).missing_keys == []
    assert torch.equal(run(new, name), ref)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_load_into_freshly_rewritten_module(name, variant, fresh_rewritten, zoo_model):
    """Train one rewritten module a little, save it, load into a new rewrite (other init seed): same
    outputs."""
    r = fresh_rewritten(name, variant, True)
    trained = r.new
    trained.train()
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-2)
    args, kwargs = inputs(name, seed=55)
    for _ in range(2):
        opt.zero_grad()
        main_output(trained(*args, **kwargs)).pow(2).mean().backward()
        opt.step()
    trained.eval()
    ref = run(trained, name)
    buf = io.BytesIO()
    torch.save(trained.state_dict(), buf)

    model = zoo_model(name)
    cap_args, cap_kwargs = inputs(name, seed=0)
    other = hc_rewrite.rewrite(model, cap_args, cap_kwargs, variant=variant, n=4, dynamic=True, seed=7, form="graph")
    other.eval()
    assert not torch.allclose(run(other, name), ref)  # a trained module differs from a fresh one
    buf.seek(0)
    result = other.load_state_dict(torch.load(buf, weights_only=True))
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(run(other, name), ref)
    # and the untrained original still matches neither
    assert rel_err(run(model, name), ref) > 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_train_eval_switch(name, variant, fresh_rewritten):
    """gpt2 / bert configs keep their default dropout 0.1."""
    r = fresh_rewritten(name, variant, True)
    new, model = r.new, r.model
    assert not new.training
    new.train()
    assert new.training and all(m.training for m in new.modules())
    torch.manual_seed(0)
    a, b = run(new, name), run(new, name)
    assert not torch.allclose(a, b)  # dropout is live
    new.eval()
    assert not new.training and not any(m.training for m in new.modules())
    c, d = run(new, name), run(new, name)
    assert torch.equal(c, d)
    assert rel_err(run(model, name), c) <= 1e-5
    new.train(False)
    assert not new.training
    new.train(True)
    assert new.training
    new.eval()


def test_rewrite_of_a_training_model_is_in_training_mode(toys, make_toy):
    model, x, x2 = make_toy(toys.PreNormMLP, p=0.2)
    model.train()
    new = hc_rewrite.rewrite(model, (x,), variant="hc", n=2, form="graph")
    assert new.training and model.training
    torch.manual_seed(0)
    assert not torch.allclose(new(x2), new(x2))
    new.eval()
    model.eval()
    with torch.no_grad():
        assert rel_err(model(x2), new(x2)) <= 1e-5


def test_rewrites_are_deterministic(toys, make_toy):
    model, x, _ = make_toy(toys.PreNormMLP)
    a = hc_rewrite.rewrite(model, (x,), variant="mhc", n=4, form="graph").state_dict()
    b = hc_rewrite.rewrite(model, (x,), variant="mhc", n=4, form="graph").state_dict()
    c = hc_rewrite.rewrite(model, (x,), variant="mhc", n=4, seed=1, form="graph").state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["hc.s0_0.phi"], c["hc.s0_0.phi"])


def test_deepcopy_keeps_calling_convention(rewritten):
    r = rewritten("gpt2", "hc", True)
    dup = copy.deepcopy(r.new)
    assert hasattr(dup, "hc_report")
    assert torch.equal(run(dup, "gpt2"), run(r.new, "gpt2"))
