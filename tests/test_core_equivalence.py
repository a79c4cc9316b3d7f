"""Acceptance 1-2: a rewritten model computes what the original computes at init, on inputs it never
saw; the caller's model is untouched; every residual site of the zoo models is rewritten."""
import pytest
import torch

import hc_rewrite
from hc_rewrite.capture import prepare_kwargs
from hc_rewrite.zoo import ZOO

from .helpers import EQUIV_MODELS, FRESH_SEED, VARIANTS, inputs, main_output, rel_err

TOL = 1e-5


def _outputs(model, new, name, seed=FRESH_SEED, batch=2, seq=8):
    """The original's and the graph form's outputs on one input. The graph form binds the capture's constants
    (``use_cache=False`` where the forward takes it): the original is called with the same ones, so its own
    output structure (whatever a ``transformers`` version names its fields) is what the rewrite must give."""
    args, kwargs = inputs(name, seed, batch, seq)
    with torch.no_grad():
        return model(*args, **prepare_kwargs(model, kwargs)), new(*args, **kwargs)


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", EQUIV_MODELS)
def test_function_preserved_at_init(name, variant, dynamic, rewritten):
    r = rewritten(name, variant, dynamic)
    model, new = r.model, r.new
    fresh_args, fresh_kwargs = inputs(name, FRESH_SEED)
    fresh = list(fresh_args) + list(fresh_kwargs.values())
    seen = list(r.args) + list(r.kwargs.values())
    assert not all(torch.equal(a, b) for a, b in zip(fresh, seen))  # not the capture inputs
    ref, out = _outputs(model, new, name)
    assert type(out) is type(ref)
    a, b = main_output(ref), main_output(out)
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    assert torch.isfinite(b).all()
    assert rel_err(a, b) <= TOL
    if hasattr(ref, "keys"):  # HF ModelOutput: the original's own fields, each preserved
        assert set(out.keys()) == set(ref.keys())
        for k in out.keys():
            if isinstance(out[k], torch.Tensor):
                assert rel_err(ref[k], out[k]) <= TOL, k


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", EQUIV_MODELS)
def test_caller_model_untouched(name, variant, dynamic, rewritten):
    r = rewritten(name, variant, dynamic)
    model, new = r.model, r.new
    after = model.state_dict()
    assert list(after) == list(r.before)
    for k, v in r.before.items():
        assert torch.equal(after[k], v), k
    assert not model.training  # its mode is untouched too
    assert not any(k.startswith("hc") for k, _ in model.named_children())
    ours = {t.data_ptr() for t in list(new.parameters()) + list(new.buffers())}
    theirs = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    assert not ours & theirs  # no storage shared with the caller's model
    assert not {id(p) for p in new.parameters()} & {id(p) for p in model.parameters()}


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", EQUIV_MODELS)
def test_every_site_rewritten(name, variant, dynamic, rewritten):
    new = rewritten(name, variant, dynamic).new
    rep = new.hc_report
    layers = ZOO[name].layers
    assert len(rep.rewritten) == 2 * layers
    assert rep.refused == []
    assert len(rep.streams) == 1 and rep.streams[0].sites == 2 * layers
    assert (rep.variant, rep.n, rep.dynamic) == (variant, 4, dynamic)
    assert rep.capture.startswith("torch.export")
    n_hc = sum(p.numel() for k, p in new.named_parameters() if k.startswith("hc."))
    assert rep.new_parameters == n_hc > 0
    assert len(list(new.hc.children())) == 2 * layers
    text = str(rep)
    assert f"{2 * layers} rewritten" in text and type(rep.model) is str and rep.model in text


@pytest.mark.parametrize("name", EQUIV_MODELS)
def test_other_batch_and_length(name, rewritten):
    """The capture is not specialised to the example's batch or sequence size."""
    new = rewritten(name, "mhc", True).new
    model = rewritten(name, "mhc", True).model
    ref, out = _outputs(model, new, name, seed=FRESH_SEED + 1, batch=3, seq=5)
    assert main_output(out).shape == main_output(ref).shape
    assert rel_err(main_output(ref), main_output(out)) <= TOL


def test_positional_and_keyword_calls_agree(rewritten):
    r = rewritten("gpt2", "frac", True)
    _, kwargs = inputs("gpt2", FRESH_SEED)
    with torch.no_grad():
        by_kw = main_output(r.new(**kwargs))
        by_pos = main_output(r.new(kwargs["input_ids"]))
        ref = main_output(r.model(kwargs["input_ids"]))
    assert torch.equal(by_kw, by_pos)
    assert rel_err(ref, by_pos) <= TOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_toy_nets_preserved(variant, toys, make_toy):
    for cls in (toys.PreNormMLP, toys.PostNormNet, toys.NonDominatedNet):
        model, x, x2 = make_toy(cls)
        new = hc_rewrite.rewrite(model, (x,), variant=variant, n=4, form="graph")
        with torch.no_grad():
            assert rel_err(model(x2), new(x2)) <= TOL, cls.__name__


def test_report_matches_rewrite(toys, make_toy):
    model, x, _ = make_toy(toys.NonDominatedNet)
    rep = hc_rewrite.report(model, (x,), variant="frac", n=2, dynamic=False, form="graph")
    new = hc_rewrite.rewrite(model, (x,), variant="frac", n=2, dynamic=False, form="graph")
    assert rep.to_dict() == new.hc_report.to_dict()
    assert [s.rewritten for s in rep.sites] == [True, False, True]
    assert "does not dominate" in rep.refused[0].reason


def test_float64_model_mhc_preserved_to_float64_precision(toys, make_toy):
    model, x, x2 = make_toy(toys.PreNormMLP)
    model = model.double()
    new = hc_rewrite.rewrite(model, (x.double(),), variant="mhc", n=4, form="graph")
    assert all(p.dtype == torch.float64 for p in new.hc.parameters())
    with torch.no_grad():
        assert rel_err(model(x2.double()), new(x2.double())) <= 1e-12
