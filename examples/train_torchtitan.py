"""Train torchtitan's Llama 3 debug model with mHC connections on several ranks: the converter, torchtitan's own
selective activation checkpointing, per-block torch.compile, FSDP2 and a DCP checkpoint to resume from.

torchtitan 0.3's ``parallelize_llama`` does not run on CPU/gloo (it picks device 'cuda', and its FSDP setup needs
``ReduceOp.PREMUL_SUM``, which gloo lacks), so this script calls the APIs it calls, in its order:
``SelectiveAC.apply`` (torchtitan), torchtitan's own ``apply_compile`` (each block after its checkpointing, with
``fullgraph=True``: one graph per block), ``fully_shard`` per block then the root with
``set_force_sum_reduction_for_comms(True)`` (torch); torchtitan's ``OptimizersContainer`` (with
:func:`~hc_rewrite.integrations.torchtitan.param_groups`) and its checkpointer's ``ModelWrapper`` with ``dcp.save`` /
``dcp.load``, as its CheckpointManager does. The model is built the trainer's way: the
converter on the config, the meta device, ``to_empty``, ``init_states``. Data: seeded random tokens, the same global
batch per step whatever the number of ranks::

    torchrun --nproc_per_node 2 examples/train_torchtitan.py --steps 5 --save-at 3 --ckpt /tmp/ckpt
    torchrun --nproc_per_node 2 examples/train_torchtitan.py --steps 5 --resume 3 --ckpt /tmp/ckpt
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchtitan.components.checkpointer.base import ModelWrapper
from torchtitan.config import CompileConfig
from torchtitan.components.optimizer.optimizer import OptimizersContainer
from torchtitan.distributed.activation_checkpoint import SelectiveAC
from torchtitan.distributed.compile import apply_compile
from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.models.llama3 import llama3_configs

from hc_rewrite.integrations.torchtitan import HyperConnectionsConverter, param_groups

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_fsdp import mean_over_ranks, shut_down  # noqa: E402

VOCAB = 2048


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="mhc", choices=["mhc", "frac", "hc"])
    ap.add_argument("--layers", type=int, default=2, help="first layers of the debug model (it has 6)")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4, help="global batch (split over the ranks)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--compile", default="aot_eager", help="backend of the per-block compile; 'none': no compile")
    ap.add_argument("--save-at", type=int, help="write a DCP checkpoint after this many steps")
    ap.add_argument("--resume", type=int, help="load the DCP checkpoint written after this many steps, go on")
    ap.add_argument("--ckpt", help="DCP checkpoint folder")
    ap.add_argument("--out", help="write the per-step losses (rank 0) as JSON here")
    return ap.parse_args(argv)


def build(args):
    config = llama3_configs["debugmodel"](attn_backend="flex")
    config.layers = config.layers[: args.layers]
    for layer in config.layers:  # FlexAttention has no backward on the CPU
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    config = HyperConnectionsConverter.Config(variant=args.variant).build().convert(config)
    with torch.device("meta"):
        model = config.build()
    model.verify_module_protocol()
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_states()
    return model


def parallelize(model, args, world: int):
    SelectiveAC(SelectiveAC.Config()).apply(model)
    if args.compile != "none":
        # torchtitan's own per-block compile; of the parallel dims it reads only whether tensor parallelism is on
        apply_compile(model, compile_config=CompileConfig(backend=args.compile),
                      parallel_dims=SimpleNamespace(tp_enabled=False))
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers.values():
            fully_shard(block).set_force_sum_reduction_for_comms(True)
        fully_shard(model).set_force_sum_reduction_for_comms(True)
    return model


def batch(step: int, args):
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (args.batch, args.seq + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def main(argv=None) -> list:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    model = parallelize(build(args), args, world)
    opt = OptimizersContainer.Config(param_groups=param_groups("AdamW", lr=args.lr, weight_decay=0.0),
                                     implementation="for-loop").build(model_parts=[model])
    first = 0
    if args.resume is not None:
        dcp.load({"model": ModelWrapper(model), "optimizer": opt}, checkpoint_id=args.ckpt)
        first = args.resume
    per_rank = args.batch // world
    losses = []
    for step in range(first, args.steps):
        x, y = batch(step, args)
        x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        # FSDP sums the gradients (gloo has no averaging reduce): the mean over ranks is a scaled loss
        (loss / world).backward()
        opt.step()
        losses.append(mean_over_ranks(loss, world))
        if rank == 0:
            print(f"step {step}  loss {losses[-1]:.6f}", flush=True)
        if args.save_at is not None and step + 1 == args.save_at:
            dcp.save({"model": ModelWrapper(model), "optimizer": opt}, checkpoint_id=args.ckpt)
    if rank == 0 and args.out:
        Path(args.out).write_text(json.dumps({"losses": losses, "world": world, "first": first}, indent=1))
    model = opt = loss = None  # dropped before the process group ends (shut_down)
    shut_down(world)
    return losses


if __name__ == "__main__":
    main()
