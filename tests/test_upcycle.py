"""Upcycling and deferred init (issue 23, items 2-3): a plain checkpoint (the original model's, no connection keys)
loads into the rewritten model through ``load_state_dict`` (strict) and torch DCP, the connections at their
function-preserving init, and the result computes what the trained original computes; ``init_connections``
restores that init after ``to_empty``; a partial load (a PEFT adapter) leaves trained connections alone."""
from __future__ import annotations

import copy

import pytest
import torch

import hc_rewrite
from hc_rewrite.zoo import ZOO

from .conftest import PreNormMLP
from .helpers import moved_copy, rel_err

TOL = 1e-5


def _ids(model, seed, batch=2, seq=9):
    return torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _trained_plain():
    """A plain Llama trained 3 steps (its weights are no longer anyone's init)."""
    torch.manual_seed(0)
    model = ZOO["llama"].build().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(3):
        ids = _ids(model, step)
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    return _trained_plain()


def _fresh_rewrite(variant):
    torch.manual_seed(123)  # other base weights than the trained model's
    model = ZOO["llama"].build().eval()
    return hc_rewrite.rewrite(model, (_ids(model, 5),), variant=variant, n=4)


def _connections(model):
    return {k: v.detach().clone() for k, v in model.hc.state_dict().items()}


@pytest.mark.parametrize("variant", ["mhc", "frac", "hc"])
def test_a_plain_state_dict_loads_strictly_and_gives_the_trained_original(trained, variant):
    new = moved_copy(_fresh_rewrite(variant))  # connections moved off their init: the load must put them back
    init = _connections(_fresh_rewrite(variant))
    result = new.load_state_dict(trained.state_dict())  # strict
    assert not result.missing_keys and not result.unexpected_keys
    got = _connections(new)
    assert got.keys() == init.keys() and all(torch.equal(got[k], init[k]) for k in init)
    ids = _ids(trained, 11, batch=3, seq=7)
    with torch.no_grad():
        assert rel_err(trained(ids).logits, new(ids).logits) <= TOL


def test_a_state_dict_with_the_connections_loads_them(trained):
    new = _fresh_rewrite("mhc")
    moved = moved_copy(new)
    new.load_state_dict(moved.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(new.hc.parameters(), moved.hc.parameters()))


def test_a_partial_load_keeps_trained_connections_and_reports_what_is_missing(trained):
    new = moved_copy(_fresh_rewrite("mhc"))
    before = _connections(new)
    part = {k: v for k, v in trained.state_dict().items() if "q_proj" in k}  # an adapter-sized slice
    result = new.load_state_dict(part, strict=False)
    assert any(k.startswith("hc.") for k in result.missing_keys)  # torch's report, unchanged
    assert all(torch.equal(before[k], v) for k, v in _connections(new).items())
    first = next(k for k in new.state_dict() if k.startswith("hc."))
    some = {**trained.state_dict(), first: new.state_dict()[first]}
    with pytest.raises(RuntimeError, match="Missing key"):
        new.load_state_dict(some)  # some connection keys but not all: an error, as torch makes it


def test_dcp_load_of_a_plain_checkpoint(trained, tmp_path):
    import torch.distributed.checkpoint as dcp

    dcp.save(trained.state_dict(), checkpoint_id=str(tmp_path / "plain"))
    new = moved_copy(_fresh_rewrite("mhc"))
    state = {k: v for k, v in new.state_dict().items() if k not in set(hc_rewrite.connection_keys(new))}
    dcp.load(state, checkpoint_id=str(tmp_path / "plain"))
    new.load_state_dict(state)  # strict: the connections back at their init
    ids = _ids(trained, 12)
    with torch.no_grad():
        assert rel_err(trained(ids).logits, new(ids).logits) <= TOL


@pytest.mark.parametrize("variant", ["mhc", "frac", "hc"])
def test_init_connections_after_to_empty_gives_the_rewrites_own_init(variant):
    new = _fresh_rewrite(variant)
    empty = copy.deepcopy(new).to_empty(device="cpu")
    with torch.no_grad():
        for p in empty.hc.parameters():
            p.fill_(float("nan"))  # what to_empty may leave
    hc_rewrite.init_connections(empty)
    assert all(torch.equal(a, b) for a, b in zip(empty.hc.parameters(), new.hc.parameters()))
    with pytest.raises(ValueError, match="not rewritten"):
        hc_rewrite.init_connections(ZOO["llama"].build())


@pytest.mark.parametrize("variant", ["mhc", "frac", "hc"])
def test_rewrite_on_the_meta_device_then_materialise_init_and_check(variant):
    with torch.device("meta"):
        model = PreNormMLP()  # written as torchtitan writes models: nothing in forward reads a tensor value
    new = hc_rewrite.rewrite(model, (torch.empty(2, 8, 16, device="meta"),), variant=variant, n=4)
    assert all(p.is_meta for p in new.parameters()) and type(new) is PreNormMLP
    assert new.hc_report.init_rel_err is None and "meta device" in str(new.hc_report)
    # torchtitan's order: to_empty, then every module's own init (the connections are not reached by it) ...
    new.to_empty(device="cpu")
    torch.manual_seed(0)
    for m in new.modules():
        if hasattr(m, "reset_parameters") and not isinstance(m, hc_rewrite.variants.base.ConnectionParams):
            m.reset_parameters()
    hc_rewrite.init_connections(new)
    original = PreNormMLP()
    original.load_state_dict({k: v for k, v in new.state_dict().items() if not k.startswith("hc.")})
    x = torch.randn(3, 5, 16)
    assert hc_rewrite.check(new, original, (x,)) <= TOL
    with torch.no_grad():  # and the check is a real one: moved connections fail it
        for p in new.hc.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(hc_rewrite.StructureError, match="differs from the original"):
        hc_rewrite.check(new, original, (x,))


def test_a_model_whose_forward_reads_values_on_meta_is_a_clear_error():
    import transformers

    config = ZOO["llama"].build().config
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    with pytest.raises(hc_rewrite.StructureError, match="cannot run on the meta device"):
        hc_rewrite.rewrite(model, (torch.zeros(2, 8, dtype=torch.long, device="meta"),), variant="mhc")
