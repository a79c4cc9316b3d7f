"""The default (structure-preserving) form over the whole zoo: every architecture keeps its class, every site
found is rewritten, the model is exact at a batch size and sequence length / image size it was not captured at
(``ZooEntry.other``), and every connection parameter gets a gradient from one backward pass (no dead
parameters)."""
from __future__ import annotations

import pytest
import torch

import hc_rewrite
from hc_rewrite.variants import NAMES as VARIANTS
from hc_rewrite.zoo import ZOO

from .helpers import CAPTURE_SEED, FRESH_SEED, inputs, main_output, rel_err


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_in_the_structure_preserving_form(name, zoo_model):
    model = zoo_model(name)
    args, kwargs = inputs(name, CAPTURE_SEED)
    new = hc_rewrite.rewrite(model, args, kwargs, variant="mhc", n=4)
    rep = new.hc_report
    assert type(new) is type(model) and rep.form == "module"
    assert rep.sites and not rep.refused, rep
    a2, k2 = ZOO[name].other_inputs(torch.Generator().manual_seed(FRESH_SEED))
    with torch.no_grad():
        assert rel_err(main_output(model(*a2, **k2)), main_output(new(*a2, **k2))) <= 1e-5
    new.train()
    out = main_output(new(*a2, **k2))
    out.float().pow(2).mean().backward()
    dead = [n for n, p in new.hc.named_parameters() if p.grad is None]
    assert not dead, f"connection parameters without a gradient: {dead}"


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "mhc"])
@pytest.mark.parametrize("name", ["gpt2", "bert", "t5", "resnet"])
def test_other_variants_in_the_structure_preserving_form(name, variant, zoo_model):
    model = zoo_model(name)
    args, kwargs = inputs(name, CAPTURE_SEED)
    new = hc_rewrite.rewrite(model, args, kwargs, variant=variant, n=4)
    assert not new.hc_report.refused
    a2, k2 = inputs(name, FRESH_SEED, batch=3, seq=12)
    with torch.no_grad():
        assert rel_err(main_output(model(*a2, **k2)), main_output(new(*a2, **k2))) <= 1e-5
