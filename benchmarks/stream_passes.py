"""What Inductor makes of the stream ops: kernels, library calls and memory traffic of a compiled training step.

    python -m benchmarks.stream_passes [--variants residual mhc frac hc] [--tokens 1024 --d 256] [--out f.json]

The subject: two pre-norm MLP sites (``x = x + MLP(RMSNorm(x))`` twice, the same weights), so the post of one
site meets the pre of the next. Each row compiles the forward and backward (fp32, on the CPU: the device the
CI has) once from scratch and reads Inductor's own counters:

* ``kernels``: the kernels Inductor generated (its scheduler's nodes after fusion, library calls left out);
* ``stream passes``: the elements its kernels and library calls read and write (Inductor's own count per
  scheduler node, each buffer once) in units of one ``[T, C]`` tensor: one pass over the narrow stream (an mHC
  stream ``[T, 4, C]`` is 4). Library calls are listed by name; ``bmm`` calls are the per-token ``n x n``
  products of the reference, which the fusible form does not have.

The rows ``<variant>/reference`` compile the rewritten model with ``options={"decompose": False}``: the stream ops
as AOTAutograd decomposes the reference (``hc_rewrite.ops.reference``), against ``<variant>``: the fusible form
the backend hands Inductor (``hc_rewrite.ops.fusible``). The columns ``+ per site`` subtract the residual row
and divide by the number of sites: what a site of the variant adds. What the numbers mean: docs/kernels.md.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import re
import sys

import torch
from torch import nn

from hc_rewrite.variants import NAMES

SITES = 2


class TwoSites(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.RMSNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d, bias=False), nn.GELU(), nn.Linear(4 * d, d, bias=False))

    def forward(self, x):
        x = x + self.mlp(self.norm(x))
        return x + self.mlp(self.norm(x))


def measure(row: str, tokens: int, d: int) -> dict:
    """Compile one training step (forward + backward) of ``row`` afresh; Inductor's counters for it."""
    import hc_rewrite
    import hc_rewrite.backend  # noqa: F401
    from torch._inductor import config, metrics
    from torch._inductor.utils import run_and_get_code

    variant, _, how = row.partition("/")
    torch.manual_seed(0)
    x = torch.randn(1, tokens, d)
    model = TwoSites(d)
    if variant == "residual":
        compiled = torch.compile(model)
    else:
        model = hc_rewrite.rewrite(model, (x,), variant=variant, n=4, form="graph")
        compiled = torch.compile(model, backend="hc_rewrite", options={"decompose": how != "reference"})
    torch._dynamo.reset()
    metrics.reset()
    torch._logging.set_logs(inductor_metrics=True)  # Inductor counts the bytes of its kernels only when logging them
    quiet = _Drop()  # ... and then prints them: keep them quiet
    logging.getLogger("torch._inductor.compile_fx.__inductor_metrics").addFilter(quiet)
    try:
        with config.patch(fx_graph_cache=False):
            _, code = run_and_get_code(lambda: compiled(x).square().mean().backward())
    finally:
        logging.getLogger("torch._inductor.compile_fx.__inductor_metrics").removeFilter(quiet)
        torch._logging.set_logs()
    unit = tokens * d
    kernels = [(elems / unit, _origins(node)) for node, elems in metrics.nodes_num_elem if not _is_extern(node)]
    calls = [elems / unit for node, elems in metrics.nodes_num_elem if _is_extern(node)]
    externs = collections.Counter(m for src in code for m in re.findall(r"extern_kernels\.(\w+)\(", src))
    return {"row": row, "kernels": len(kernels), "stream_passes": sum(k for k, _ in kernels) + sum(calls),
            "extern": dict(sorted(externs.items())),
            "largest": [f"{k:.2f} {o}" for k, o in sorted(kernels, reverse=True)[:12]]}


class _Drop(logging.Filter):
    def filter(self, record):
        return False


def _origins(node) -> str:
    """The ATen ops a scheduler node was made of, most frequent first (for reading, not parsing)."""
    ops = collections.Counter()
    for sub in node.get_nodes():
        for origin in getattr(sub.node, "origins", ()):
            if origin.op == "call_function":
                ops[str(origin.target).replace("aten.", "").replace(".default", "")] += 1
    return " ".join(f"{k}" + (f"x{v}" if v > 1 else "") for k, v in ops.most_common(8))


def _is_extern(node) -> bool:
    return type(node).__name__ in ("ExternKernelSchedulerNode", "NopKernelSchedulerNode")


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=list(NAMES), choices=NAMES)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--largest", action="store_true", help="list each row's largest kernels and their ATen ops")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [measure("residual", args.tokens, args.d)]
    for v in args.variants:
        rows += [measure(f"{v}/reference", args.tokens, args.d), measure(v, args.tokens, args.d)]
    base = rows[0]
    print("| row | kernels | stream passes | + per site | library calls |\n|---|---|---|---|---|")
    for r in rows:
        r["passes_per_site"] = (r["stream_passes"] - base["stream_passes"]) / SITES
        calls = ", ".join(f"{k} {v}" for k, v in r["extern"].items())
        print(f"| {r['row']} | {r['kernels']} | {r['stream_passes']:.1f} | {r['passes_per_site']:+.1f} | {calls} |")
    if args.largest:
        for r in rows:
            print(f"\n{r['row']}: largest kernels (stream passes, ATen ops)\n  " + "\n  ".join(r["largest"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"tokens": args.tokens, "d": args.d, "sites": SITES, "torch": torch.__version__, "rows": rows},
                      f, indent=1)
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
