"""Eager training step of the two forms of a rewrite, against the plain residual, on the CPU.

    python -m benchmarks.forms [--d 256 --layers 4 --batch 4 --seq 256 --steps 7] [--out benchmarks/results/forms-cpu.json]
    python -m benchmarks.forms --tiny          # a smoke run (seconds)

What the structure-preserving form (the default: hooks + a tensor subclass in the user's own code) costs
next to the flat graph form (one GraphModule of the example call) on the same stack (benchmarks/e2e.py's
pre-norm GPT stack, fp32), for mHC n=4, Frac m=4, HC n=4. One AdamW step per variant in turn (interleaved),
``--steps`` rounds after 2 warm-up rounds; reported: the median step time of each variant divided by the
residual's median. Timings on a shared CPU are noisy: compare the ratios of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from hc_rewrite.variants import NAMES as VARIANTS

from .e2e import GPTStack


def build(variant, form, args, x):
    import hc_rewrite

    torch.manual_seed(0)
    model = GPTStack(args.d, args.layers)
    if variant != "residual":
        model = hc_rewrite.rewrite(model, (x,), variant=variant, n=4, form=form)
    model.train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--tiny", action="store_true", help="d=64, 2 layers, 2 x 16 tokens, 2 steps")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.tiny:
        args.d, args.layers, args.batch, args.seq, args.steps = 128, 2, 2, 16, 2
    torch.set_num_threads(max(1, torch.get_num_threads()))
    x = torch.randn(args.batch, args.seq, args.d, generator=torch.Generator().manual_seed(0))
    runs = {("residual", "-"): build("residual", None, args, x)}
    for variant in VARIANTS:
        for form in ("graph", "module"):
            runs[(variant, form)] = build(variant, form, args, x)
    times = {key: [] for key in runs}
    for rnd in range(args.steps + 2):
        for key, (model, opt) in runs.items():
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            model(x).float().pow(2).mean().backward()
            opt.step()
            if rnd >= 2:
                times[key].append(time.perf_counter() - t0)
    base = statistics.median(times[("residual", "-")])
    rows = [{"variant": v, "form": f, "step_ms": 1e3 * statistics.median(t), "x_residual": statistics.median(t) / base}
            for (v, f), t in times.items()]
    result = {"config": {"d": args.d, "layers": args.layers, "batch": args.batch, "seq": args.seq,
                         "steps": args.steps, "dtype": "float32", "mode": "eager"},
              "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}",
              "date": time.strftime("%Y-%m-%d"), "runs": rows}
    print("| variant | form | step ms | x residual |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['form']} | {r['step_ms']:.1f} | {r['x_residual']:.3f} |")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
