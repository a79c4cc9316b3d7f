"""Train a rewritten HF Llama the way large models are trained: per-block FSDP2, activation checkpointing,
torch.compile, several processes. The same script runs on CPUs (gloo) and GPUs (nccl)::

    torchrun --nproc_per_node 2 examples/train_fsdp.py --steps 20                 # FSDP2, 2 ranks
    torchrun --nproc_per_node 2 examples/train_fsdp.py --steps 20 --parallel ddp  # DDP instead
    python examples/train_fsdp.py --steps 20                                      # one process, no wrapper

The model is ``hc_rewrite.rewrite(LlamaForCausalLM(config), ...)`` (mHC n=4 by default, the structure-preserving
form: the same class and module tree, so ``fully_shard`` and ``checkpoint_wrapper`` go on its decoder
layers as on any Llama). Data: byte-level windows of this interpreter's standard library (see train_lm.py), the
same global batch for every world size; each rank trains on its slice. Rank 0 prints the loss of every step
(averaged over ranks) and, with ``--out``, writes them as JSON, so runs with different world sizes can be compared
(tests/test_distributed.py: 2 ranks give the losses of one process).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_lm import load_corpus, train_starts, windows  # noqa: E402

import hc_rewrite  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="mhc", choices=["mhc", "frac", "hc", "none"], help="none: the plain residual")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64, help="hidden size")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8, help="global batch (split over the ranks)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parallel", default="fsdp", choices=["fsdp", "ddp"], help="wrapper when run with torchrun")
    ap.add_argument("--no-checkpointing", action="store_true", help="no activation checkpointing per layer")
    ap.add_argument("--compile", default="inductor", help="torch.compile backend for each layer; 'none': no compile")
    ap.add_argument("--stdlib", help="corpus root (default: this interpreter's standard library)")
    ap.add_argument("--out", help="write the per-step losses (rank 0) as JSON here")
    return ap.parse_args(argv)


def mean_over_ranks(loss: torch.Tensor, world: int) -> float:
    """The loss averaged over the ranks (each rank's loss is the mean over its share of the global batch)."""
    seen = loss.detach().clone()
    if world > 1:
        dist.all_reduce(seen, op=dist.ReduceOp.SUM)
        seen /= world
    return seen.item()


def shut_down(world: int) -> None:
    """End the process group, after the caller dropped its wrapped model and optimizer: a DDP reducer (or FSDP state)
    that outlives destroy_process_group() would destroy the gloo group on exit while holding the GIL, and gloo's
    worker thread, which needs the GIL to drop its last tensors, would wait for it forever."""
    if world > 1:
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def build(args, device):
    import transformers

    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(
        vocab_size=257, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=args.seq,
        tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    if args.variant != "none":
        example = torch.zeros(1, args.seq, dtype=torch.long)
        model = hc_rewrite.rewrite(model, (example,), variant=args.variant, n=args.n)
    return model.to(device)


def wrap(model, args, world: int):
    """Compile per decoder layer, activation checkpointing per layer, then FSDP2 per layer + root (or DDP).

    Compile first, then checkpoint: each layer is one graph that the layers share. The other order (checkpoint, then
    compile the wrapper with ``fullgraph=True``, as torchtitan does: examples/train_torchtitan.py) gives the same
    numbers, the checkpointed region traced into the layer's graph (docs/design.md "Checkpointing inside a compiled
    region")."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = model.model.layers
    for i, layer in enumerate(layers):
        if args.compile != "none":
            layer.compile(backend=args.compile)
        if not args.no_checkpointing:
            layers[i] = checkpoint_wrapper(layer)
    if world > 1 and args.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
    elif world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    return model


def main(argv=None) -> list:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} does not split over {world} ranks")
    train, _val, info = load_corpus(args.stdlib)
    starts = train_starts(len(train), args.steps, args.batch, args.seq, args.seed)
    model = wrap(build(args, device), args, world)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    per_rank = args.batch // world
    losses = []
    t0 = time.time()
    for step in range(args.steps):
        x, y = windows(train, starts[step, rank * per_rank:(rank + 1) * per_rank], args.seq)
        x, y = x.to(device), y.to(device)
        loss = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1).float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(mean_over_ranks(loss, world))
        if rank == 0:
            print(f"step {step:4d}  loss {losses[-1]:.5f}  ({time.time() - t0:.1f}s)", flush=True)
    if rank == 0 and args.out:
        Path(args.out).write_text(json.dumps({"losses": losses, "world": world, "parallel": args.parallel,
                                              "variant": args.variant, "corpus": info}, indent=1))
    model = opt = loss = None  # dropped before the process group ends (shut_down)
    shut_down(world)
    return losses


if __name__ == "__main__":
    main()
