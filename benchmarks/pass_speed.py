"""Speed of the rewrite passes themselves (capture excluded) against depth.

    python -m benchmarks.pass_speed [--layers 12 24 48 96] [--repeats 3]

For each depth, a GPT-2 decoder (width 64) is captured once; the passes of ``rewrite(form="graph")``
(:data:`~hc_rewrite.passes.pipeline.ANALYSIS`: cleanup, detection, grouping; then
:data:`~hc_rewrite.passes.pipeline.GRAPH_FORM`: the rewrite) then run on fresh copies of the captured graph,
median of ``--repeats``.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch


def main(argv=None) -> int:
    from transformers import GPT2Config, GPT2LMHeadModel

    from hc_rewrite.capture import capture
    from hc_rewrite.passes.pipeline import ANALYSIS, GRAPH_FORM, PassContext
    from hc_rewrite.spec import make_spec

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", nargs="*", type=int, default=[12, 24, 48, 96])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    print("| layers | graph nodes | sites | passes ms (median) | ms per layer |")
    print("|---|---|---|---|---|")
    for layers in args.layers:
        cfg = GPT2Config(n_layer=layers, n_embd=64, n_head=4, vocab_size=256, n_positions=128)
        model = GPT2LMHeadModel(cfg).eval()
        captured = capture(model, (torch.randint(0, 256, (2, 16)),))
        times = []
        for _ in range(args.repeats):
            ctx = PassContext(copy.deepcopy(captured.gm), make_spec("mhc", 4))
            t0 = time.perf_counter()
            ANALYSIS(ctx)  # as hc_rewrite.rewrite runs them: one recompile, at the end of the rewrite
            GRAPH_FORM(ctx)
            times.append((time.perf_counter() - t0) * 1e3)
            n = ctx.results["insert_hyper_connections"]
        med = statistics.median(times)
        print(f"| {layers} | {len(captured.gm.graph.nodes)} | {n} | {med:.0f} | {med / layers:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
