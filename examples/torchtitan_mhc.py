"""mHC in torchtitan (0.3) by config: its Llama 3 debug model with every residual connection rewritten.

In a torchtitan trainer config (``torchtitan/models/llama3/config_registry.py`` style)::

    def llama3_debugmodel_mhc() -> Trainer.Config:
        config = llama3_debugmodel()
        config.model_spec = model_spec()          # the converter below, on torchtitan's own model registry
        config.optimizer = optimizer()            # connections without weight decay
        return config

then ``torchrun ... -m torchtitan.train --module llama3 --config llama3_debugmodel_mhc`` as for any config. Run this
file to build the model the way the trainer does (meta device, ``to_empty``, ``init_states``) and print what the
rewrite did::

    python examples/torchtitan_mhc.py --variant mhc --n 4
"""
from __future__ import annotations

import argparse

import torch
from torchtitan.components.optimizer.optimizer import OptimizersContainer
from torchtitan.models.llama3 import model_registry

from hc_rewrite.integrations.torchtitan import HyperConnectionsConverter, param_groups, with_connections


def model_spec(variant: str = "mhc", n: int = 4, attn_backend: str = "flex"):
    """torchtitan's ``debugmodel`` spec with the hyper-connections converter, and its HF state-dict adapter passing
    the connection parameters through."""
    spec = model_registry("debugmodel", attn_backend=attn_backend,
                          converters=[HyperConnectionsConverter.Config(variant=variant, n=n)])
    spec.state_dict_adapter = with_connections(spec.state_dict_adapter)
    return spec


def optimizer(lr: float = 8e-4) -> OptimizersContainer.Config:
    """torchtitan's default AdamW, with the connection parameters in a group without weight decay."""
    return OptimizersContainer.Config(
        param_groups=param_groups("AdamW", lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1))


def build(spec, sdpa: bool = True):
    """The model of ``spec``, built as torchtitan's trainer builds it."""
    config = spec.model
    if sdpa:  # FlexAttention has no backward on the CPU
        from torchtitan.models.common.attention import ScaledDotProductAttention

        for layer in config.layers:
            layer.attention.inner_attention = ScaledDotProductAttention.Config()
    with torch.device("meta"):
        model = config.build()
    model.verify_module_protocol()
    model.to_empty(device="cpu")
    model.init_states()
    return model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="mhc", choices=["mhc", "frac", "hc"])
    ap.add_argument("--n", type=int, default=4)
    args = ap.parse_args(argv)
    model = build(model_spec(args.variant, args.n))
    print(model.hc_report)
    tokens = torch.randint(0, 2048, (2, 32))
    print(f"logits {tuple(model(tokens).shape)}; connection parameters: "
          f"{sum(p.numel() for p in model.hc.parameters()):,}")


if __name__ == "__main__":
    main()
