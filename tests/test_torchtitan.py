"""The torchtitan converter (hc_rewrite.integrations.torchtitan) with torchtitan 0.3's own Llama 3 debug model, built
the way its trainer builds models: converter on the config, build on the meta device, ``to_empty``, ``init_states``.
torchtitan is a test dependency: a missing torchtitan fails these tests, it does not skip them."""
from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torchtitan.components.optimizer.optimizer import OptimizersContainer
from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.models.llama3 import llama3_configs

import hc_rewrite
from hc_rewrite.errors import SpecError
from hc_rewrite.integrations.torchtitan import HyperConnectionsConverter, param_groups

from .helpers import rel_err


def debug_config():
    """torchtitan's Llama 3 ``debugmodel`` (6 layers, dim 256) with SDPA: FlexAttention has no CPU backward."""
    config = llama3_configs["debugmodel"](attn_backend="flex")
    for layer in config.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    return config


def build_like_the_trainer(config, seed=0):
    with torch.device("meta"):
        model = config.build()
    model.verify_module_protocol()
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_states()
    return model


def _plain_twin(model):
    """The plain debug model with the rewritten model's plain weights."""
    plain = debug_config().build()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("hc.")})
    return plain


@pytest.mark.parametrize("variant", ["mhc", "frac", "hc"])
def test_converter_builds_a_rewritten_model_the_trainer_can_initialise(variant):
    converter = HyperConnectionsConverter.Config(variant=variant, n=4).build()
    config = converter.convert(debug_config())
    assert isinstance(config, type(debug_config()))  # torchtitan's checks on the config class still pass
    model = build_like_the_trainer(config)
    rep = model.hc_report
    assert len(rep.rewritten) == 12 and not rep.refused and "meta device" in rep.check
    assert all(torch.isfinite(p).all() for p in model.hc.parameters())  # init_states reached them
    tokens = torch.randint(0, 2048, (2, 24))  # another length than the capture's 8
    assert hc_rewrite.check(model, _plain_twin(model), (tokens,)) <= 1e-5
    loss = model(tokens).float().pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.hc.parameters())


def test_connections_get_a_parameter_group_without_weight_decay():
    model = build_like_the_trainer(HyperConnectionsConverter.Config().build().convert(debug_config()))
    groups, patterns = OptimizersContainer._build_param_groups(model, param_groups("AdamW", lr=1e-3), {})
    (hc, rest), = [groups["AdamW"]]
    assert hc["weight_decay"] == 0.0 and rest["weight_decay"] == 0.1 and hc["lr"] == rest["lr"] == 1e-3
    assert set(hc["param_names"]) == {k for k, _ in model.named_parameters() if k.startswith("hc.")}
    assert len(hc["params"]) + len(rest["params"]) == len(list(model.parameters()))


def test_dcp_checkpoint_round_trip_and_plain_checkpoint_upcycling(tmp_path):
    """A DCP checkpoint of the rewritten model resumes exactly; a plain model's DCP checkpoint loads into a fresh
    rewritten one without the connection keys, whose init then gives the plain model's function."""
    config = HyperConnectionsConverter.Config(variant="mhc").build().convert(debug_config())
    model = build_like_the_trainer(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 2048, (2, 16))
    for _ in range(2):
        opt.zero_grad()
        model(tokens).float().pow(2).mean().backward()
        opt.step()
    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path / "rewritten"))
    again = build_like_the_trainer(config, seed=1)
    state = again.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path / "rewritten"))
    again.load_state_dict(state)
    with torch.no_grad():
        assert rel_err(model(tokens), again(tokens)) == 0

    plain = debug_config().build()
    dcp.save(plain.state_dict(), checkpoint_id=str(tmp_path / "plain"))
    fresh = build_like_the_trainer(config, seed=2)
    state = {k: v for k, v in fresh.state_dict().items() if k not in hc_rewrite.connection_keys(fresh)}
    dcp.load(state, checkpoint_id=str(tmp_path / "plain"))
    fresh.load_state_dict(state, strict=False)
    hc_rewrite.init_connections(fresh)
    assert hc_rewrite.check(fresh, plain, (tokens,)) <= 1e-5


def test_a_spec_that_does_not_fit_fails_before_any_model_is_built():
    with pytest.raises(SpecError, match="n must be >= 1"):
        HyperConnectionsConverter.Config(n=0).build()
    with pytest.raises(SpecError, match="unknown variant"):
        HyperConnectionsConverter.Config(variant="resnet").build()


def test_example_config():
    """examples/torchtitan_mhc.py: the converter on torchtitan's own model registry, the optimizer groups."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "examples" / "torchtitan_mhc.py"
    spec = importlib.util.spec_from_file_location("torchtitan_mhc", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model = example.build(example.model_spec("hc", 2))
    assert model.hc_report.variant == "hc" and len(model.hc_report.rewritten) == 12
    tokens = torch.randint(0, 2048, (1, 12))
    assert hc_rewrite.check(model, _plain_twin(model), (tokens,)) <= 1e-5
    groups, _ = OptimizersContainer._build_param_groups(model, example.optimizer().param_groups, {})
    assert [g["weight_decay"] for g in groups["AdamW"]] == [0.0, 0.1]
    assert example.model_spec().state_dict_adapter.__name__ == "HCLlama3StateDictAdapter"


@pytest.mark.parametrize("variant", ["mhc", "hc"])  # the two the issue saw fail; Frac has no H_res matmul
def test_torchtitan_selective_activation_checkpointing_gives_the_same_gradients(variant):
    """torchtitan's own op-level SAC policy (its default; ``SelectiveAC.apply`` wraps every block), eager."""
    from torchtitan.distributed.activation_checkpoint import SelectiveAC

    config = HyperConnectionsConverter.Config(variant=variant).build().convert(debug_config())
    model = build_like_the_trainer(config)
    tokens = torch.randint(0, 2048, (2, 16))
    model(tokens).float().pow(2).mean().backward()
    plain = {id(p): p.grad.clone() for p in model.parameters()}
    model.zero_grad()
    SelectiveAC(SelectiveAC.Config()).apply(model)
    assert sum("Checkpoint" in type(m).__name__ for m in model.modules()) == 6
    model(tokens).float().pow(2).mean().backward()
    scale = max(g.abs().max() for g in plain.values())
    assert max((p.grad - plain[id(p)]).abs().max() for p in model.parameters()) / scale <= 1e-6


def test_hf_state_dict_adapter_passes_the_connections_through():
    from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter

    from hc_rewrite.integrations.torchtitan import with_connections

    config = HyperConnectionsConverter.Config().build().convert(debug_config())
    model = build_like_the_trainer(config)
    state = {k: v for k, v in model.state_dict().items()}
    with pytest.raises(KeyError):  # torchtitan's own adapter does not know them
        Llama3StateDictAdapter(config, None).to_hf(state)
    adapter = with_connections(Llama3StateDictAdapter)(config, None)
    hf = adapter.to_hf(state)
    assert {k for k in hf if k.startswith("hc.")} == set(hc_rewrite.connection_keys(model))
    assert any(k.startswith("model.layers.0.") for k in hf)  # the rest converted to HF names
    back = adapter.from_hf(hf)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
