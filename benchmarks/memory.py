"""Activation memory of a training step: the bytes autograd keeps for backward, per row of ``benchmarks/e2e.py``.

    python -m benchmarks.memory [--out benchmarks/results/memory-cpu-d256.json] [--mode compiled|eager]

One forward of each row (the e2e stack: d=256, 4 layers, 4 x 256 tokens, fp32, the same rows: residual, the
graph form of each variant, the default form ``module-*`` under plain ``torch.compile``, the PyPI package) under
``torch.autograd.graph.saved_tensors_hooks``: every tensor saved for backward (by eager autograd nodes and by the
compiled graphs' backward alike) is counted once per storage, at its storage's size; parameters (which are
kept anyway) are left out. Device independent: the numbers are the same on the CPU and on a GPU for fp32. The
ratio to the residual row is the figure of issue 21 (goals: mHC <= 1.35, HC <= 1.35, Frac <= 1.10 for the default
form). Also prints the per-site budget: the extra bytes per site in units of one token's hidden state.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from . import pypi_stacks
from .e2e import MODULE_ROWS, SAVE_ROWS, VARIANTS, build

DEFAULTS = dict(d=256, layers=4, batch=4, seq=256)


def saved_bytes(model, params, x) -> int:
    """Bytes of the distinct storages saved for backward by one forward of ``model(x)`` (parameters excluded)."""
    param_storages = {p.untyped_storage().data_ptr() for p in params.parameters()}
    seen: dict = {}

    def pack(t):
        if t.device.type != "meta":
            s = t.untyped_storage()
            ptr = s.data_ptr()
            if ptr not in param_storages:
                seen[ptr] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).float().square().mean()
    loss.backward()
    params.zero_grad(set_to_none=True)
    return sum(seen.values())


def measure(rows, args, mode="compiled") -> list:
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.seq, args.d)
    out = []
    for row in rows:
        model, params, how = build(row, args.d, args.layers, x, "cpu", mode == "compiled", "auto")
        saved_bytes(model, params, x)  # compile (and warm) outside the measured call
        out.append({"variant": row, "mode": mode, "compiled": how, "saved_bytes": saved_bytes(model, params, x)})
        torch._dynamo.reset()
    base = next(r["saved_bytes"] for r in out if r["variant"] == "residual")
    token = args.batch * args.seq * args.d * 4  # one hidden state of the batch, fp32
    sites = 2 * args.layers
    for r in out:
        r["x_residual"] = r["saved_bytes"] / base
        r["extra_hidden_states_per_site"] = (r["saved_bytes"] - base) / token / sites
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out")
    parser.add_argument("--mode", choices=("compiled", "eager"), default="compiled")
    parser.add_argument("--variants", nargs="+")
    for name, value in DEFAULTS.items():
        parser.add_argument(f"--{name}", type=int, default=value)
    args = parser.parse_args(argv)
    rows = args.variants or ["residual", *VARIANTS[1:], *MODULE_ROWS, *SAVE_ROWS,
                             *(pypi_stacks.KINDS if pypi_stacks.available() else ())]
    if "residual" not in rows:
        rows = ["residual", *rows]
    runs = measure(rows, args, args.mode)
    print(f"{'row':14} {'saved MiB':>10} {'x res':>6} {'+hidden/site':>12}  compiled with")
    for r in runs:
        print(f"{r['variant']:14} {r['saved_bytes'] / 2**20:10.2f} {r['x_residual']:6.3f} "
              f"{r['extra_hidden_states_per_site']:12.2f}  {r['compiled']}")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "mode": args.mode,
                       "config": {k: getattr(args, k) for k in DEFAULTS}, "runs": runs}, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
