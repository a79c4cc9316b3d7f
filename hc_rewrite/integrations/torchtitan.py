"""torchtitan integration: enable mHC / Frac / HC by config.

:class:`HyperConnectionsConverter` is a model converter in torchtitan's own protocol
(``torchtitan.protocols.model.ModelConfigConverter``, torchtitan 0.3): ``convert(model_config)`` returns a config
of the same class whose ``build()`` builds the model as before (on the meta device, as torchtitan's trainer does)
and rewrites it with :func:`hc_rewrite.rewrite`. What torchtitan then does to a model works on the result:

* ``verify_module_protocol()``: the connection modules (``model.hc``, ``model.hc.s0_0``, ...) are torchtitan
  ``Module`` s;
* ``to_empty`` + ``init_states()`` (``init_weights``): torchtitan's init recursion reaches the connections and
  calls their ``reset_parameters()``: the function-preserving init (the model computes what the plain model with
  the same weights computes);
* FSDP2 (``fully_shard`` of the blocks and the root: the connections are root parameters), DCP checkpoints (they
  are ordinary state-dict entries, ``hc.*``);
* :func:`param_groups`: optimizer groups with the connections first, without weight decay.

Usage (a torchtitan trainer config)::

    from hc_rewrite.integrations.torchtitan import HyperConnectionsConverter, param_groups

    model_converters = [HyperConnectionsConverter.Config(variant="mhc", n=4)]
    optimizer = OptimizersContainer.Config(param_groups=param_groups("AdamW", lr=8e-4, weight_decay=0.1))
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn
from torchtitan.protocols.model import ModelConfigConverter
from torchtitan.protocols.module import Module

from .. import api
from ..variants.base import ConnectionParams, Connections

#: FQN pattern of the connection parameters (``model.hc``) for torchtitan's optimizer ``ParamGroupConfig``.
CONNECTIONS = r"^hc\."

_titan_classes: dict = {}
_config_classes: dict = {}


def _titan(cls: type) -> type:
    """``cls`` with torchtitan's ``Module`` mixed in (same layout: instances can switch class)."""
    if issubclass(cls, Module):
        return cls
    out = _titan_classes.get(cls)
    if out is None:
        out = type(f"Titan{cls.__name__}", (cls, Module), {"__module__": __name__})
        _titan_classes[cls] = out
    return out


def adapt(model: nn.Module) -> nn.Module:
    """Make the connection modules of a rewritten ``model`` torchtitan ``Module`` s, in place (see module
    docstring); returns ``model``."""
    holder = getattr(model, "hc", None)
    if not isinstance(holder, nn.Module):
        raise ValueError("adapt: this model was not rewritten by hc_rewrite (no 'hc' connections)")
    holder.__class__ = _titan(Connections)
    for child in holder.children():
        if not isinstance(child, ConnectionParams):
            raise TypeError(f"unexpected module {type(child).__name__} under model.hc")
        child.__class__ = _titan(type(child))
    return model


def _rewriting_config_class(config_cls: type, options: tuple) -> type:
    """A subclass of the model's config class whose ``build`` rewrites the model it builds (one per class and
    rewrite options; slotted dataclass configs take no new attributes, so the options live on the class)."""
    key = (config_cls, options)
    out = _config_classes.get(key)
    if out is None:
        spec = dict(options)

        def build(self, **kwargs):
            model = config_cls.build(self, **kwargs)
            return rewrite_titan_model(model, **spec)

        out = type(f"HC{config_cls.__name__}", (config_cls,), {"build": build, "__module__": __name__,
                                                               "__qualname__": f"HC{config_cls.__qualname__}"})
        _config_classes[key] = out
    return out


def rewrite_titan_model(model: nn.Module, *, seq_len: int = 8, **options) -> nn.Module:
    """:func:`hc_rewrite.rewrite` of a torchtitan language model (its forward takes ``tokens [B, S]``) on an
    example of ``seq_len`` tokens made on the model's device (meta included), then :func:`adapt`."""
    device = next(model.parameters()).device
    tokens = torch.zeros(1, seq_len, dtype=torch.long, device=device)
    return adapt(api.rewrite(model, (tokens,), **options))


class HyperConnectionsConverter(ModelConfigConverter):
    """Rewrite the residual streams of the model torchtitan builds (see module docstring)."""

    @dataclass(kw_only=True, slots=True)
    class Config(ModelConfigConverter.Config):
        variant: str = "mhc"
        """mhc, frac or hc."""

        n: int = 4
        """Expansion rate (mhc, hc) or number of fractions (frac)."""

        dynamic: bool = True
        """Input-dependent coefficients."""

        sinkhorn_iters: int = 20
        """Sinkhorn-Knopp iterations of mHC's residual mixing."""

        seed: int = 0
        """Seed of the dynamic projections' init at rewrite time (init_states draws them again)."""

        example_seq_len: int = 8
        """Length of the token example the model is captured with (any length runs afterwards)."""

    def __init__(self, config: Config, **kwargs):
        from ..spec import make_spec

        make_spec(config.variant, config.n, config.dynamic, sinkhorn_iters=config.sinkhorn_iters,
                  seed=config.seed)  # a spec that does not fit fails here, before any model is built
        self.config = config

    def convert(self, model_config):
        c = self.config
        options = (("variant", c.variant), ("n", c.n), ("dynamic", c.dynamic), ("sinkhorn_iters", c.sinkhorn_iters),
                   ("seed", c.seed), ("seq_len", c.example_seq_len))
        cls = _rewriting_config_class(type(model_config), options)
        return cls(**{f.name: getattr(model_config, f.name) for f in fields(model_config) if f.init})


def param_groups(optimizer_name: str = "AdamW", *, weight_decay: float = 0.1, **optimizer_kwargs) -> list:
    """torchtitan ``ParamGroupConfig`` s: the connection parameters without weight decay, every other parameter
    with ``weight_decay``; both with ``optimizer_kwargs`` (``lr`` ...)."""
    from torchtitan.components.optimizer.optimizer import ParamGroupConfig

    return [
        ParamGroupConfig(pattern=CONNECTIONS, optimizer_name=optimizer_name,
                         optimizer_kwargs={**optimizer_kwargs, "weight_decay": 0.0}),
        ParamGroupConfig(pattern=r".*", optimizer_name=optimizer_name,
                         optimizer_kwargs={**optimizer_kwargs, "weight_decay": weight_decay}),
    ]


_adapter_classes: dict = {}


def with_connections(adapter_cls: type) -> type:
    """A subclass of a torchtitan ``StateDictAdapter`` (e.g. ``Llama3StateDictAdapter``, a model spec's
    ``state_dict_adapter``) that passes the connection parameters (``hc.*``) through ``to_hf`` / ``from_hf``
    unchanged and converts the rest as before: an HF checkpoint of the rewritten model keeps its connections, and a
    plain HF checkpoint (no ``hc.*``) converts as it did. Usage: ``spec.state_dict_adapter =
    with_connections(spec.state_dict_adapter)``."""
    out = _adapter_classes.get(adapter_cls)
    if out is None:
        def to_hf(self, state_dict):
            ours = {k: v for k, v in state_dict.items() if k.startswith("hc.")}
            return {**adapter_cls.to_hf(self, {k: v for k, v in state_dict.items() if k not in ours}), **ours}

        def from_hf(self, hf_state_dict):
            ours = {k: v for k, v in hf_state_dict.items() if k.startswith("hc.")}
            return {**adapter_cls.from_hf(self, {k: v for k, v in hf_state_dict.items() if k not in ours}), **ours}

        out = type(f"HC{adapter_cls.__name__}", (adapter_cls,), {"to_hf": to_hf, "from_hf": from_hf,
                                                                 "__module__": __name__})
        _adapter_classes[adapter_cls] = out
    return out
