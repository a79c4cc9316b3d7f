"""The mHC paper's stability figure at CPU scale: composite gain of H_res vs step and vs layer, and gradient norms,
for the same deep byte-level Llama trained as residual, HC and mHC from the same initial function.

    python examples/stability.py [--layers 12 --steps 600 --out benchmarks/results/stability-cpu.json
                                  --plot benchmarks/plots/stability.png]

Corpus, model and optimiser are examples/train_lm.py's (the Python standard library's source, bytes; a Llama from a
small config; AdamW, warm-up then cosine, gradient clipping at 1.0). Every ``--every`` steps the gains of
:func:`hc_rewrite.diagnostics.site_stats` are taken on one fixed training batch, with the total gradient norm
(before clipping) of that step. Output: JSON (per variant: steps, losses, gradient norms, the largest composite
forward/backward gain per logged step, the composite forward gain per site at the last step) and a PNG.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_lm  # noqa: E402  (the corpus, model and optimiser of the training example)

import hc_rewrite  # noqa: E402
from hc_rewrite import diagnostics  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="residual,hc,mhc")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--every", type=int, default=20, help="log the gains every N steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/stability-cpu.json")
    ap.add_argument("--plot", default="benchmarks/plots/stability.png")
    return ap.parse_args(argv)


def train(variant, base, data, starts, probe, args) -> dict:
    if variant == "residual":
        model = copy.deepcopy(base).train()
    else:  # the caller's model is not modified: every variant starts from the same weights
        model = hc_rewrite.rewrite(base, (), {"input_ids": probe}, variant=variant, n=4).train()
    opt = train_lm.make_optimizer(model, args.lr, 0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, train_lm.lr_lambda(args.warmup, args.steps))
    out = {"variant": variant, "steps": [], "loss": [], "grad_norm": [], "max_composite_fwd_gain": [],
           "max_composite_bwd_gain": []}
    t0 = time.perf_counter()
    for step in range(args.steps):
        x, y = train_lm.windows(data, starts[step], args.seq)
        loss = train_lm.lm_loss(model, x, y, None)
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step % args.every == 0 or step == args.steps - 1:
            out["steps"].append(step)
            out["loss"].append(float(loss))
            out["grad_norm"].append(norm)
            if variant != "residual":
                stats = diagnostics.site_stats(model, input_ids=probe)
                logs = diagnostics.summary(stats)
                out["max_composite_fwd_gain"].append(logs.get("hc/max_composite_fwd_gain"))
                out["max_composite_bwd_gain"].append(logs.get("hc/max_composite_bwd_gain"))
                out["last_by_site"] = [r["composite_fwd_gain"]["max"] for r in stats
                                       if r["composite_fwd_gain"] is not None]
            print(f"{variant:8} step {step:4d}  loss {float(loss):.3f}  grad norm {norm:8.3f}"
                  + (f"  composite gain {out['max_composite_fwd_gain'][-1]:.3g}" if variant != "residual" else ""),
                  flush=True)
    out["wall_s"] = time.perf_counter() - t0
    return out


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for r in results:
        if r["variant"] != "residual":
            axes[0].plot(r["steps"], r["max_composite_fwd_gain"], label=f"{r['variant']} forward")
            axes[0].plot(r["steps"], r["max_composite_bwd_gain"], "--", label=f"{r['variant']} backward")
            axes[1].plot(range(len(r["last_by_site"])), r["last_by_site"], marker="o", label=r["variant"])
        axes[2].plot(r["steps"], r["grad_norm"], label=r["variant"])
    axes[0].set(title="largest composite gain of H_res vs step", xlabel="step", yscale="log")
    axes[1].set(title="composite forward gain vs site, last step", xlabel="site (2 per layer)", yscale="log")
    axes[2].set(title="gradient norm (before clipping) vs step", xlabel="step", yscale="log")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    data, _, _ = train_lm.load_corpus()
    starts = train_lm.train_starts(len(data), args.steps, args.batch, args.seq, args.seed)
    probe, _ = train_lm.windows(data, starts[0], args.seq)
    base = train_lm.build_base(args.d, args.layers, args.heads, args.seq, args.seed)
    results = [train(v, base, data, starts, probe, args) for v in args.variants.split(",")]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"config": vars(args), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                   "results": results}, f, indent=1)
    plot(results, args.plot)
    print(f"wrote {args.out} and {args.plot}")
    return results


if __name__ == "__main__":
    main()
