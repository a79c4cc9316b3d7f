"""What the A/B benchmarks of one stream op's compiled form share (:mod:`benchmarks.sinkhorn_ab`,
:mod:`benchmarks.projection_ab`): the e2e stack on the CPU, each row compiled from a code object of its own with
Inductor's and AOTAutograd's caches off (dynamo would otherwise reuse one row's compiled code for the other), rows
interleaved in one process with the order rotated each round, medians as ratios to the compiled plain stack."""
from __future__ import annotations

import argparse
import statistics

import torch

from .compiled_check import check_compiled
from .e2e import Runner, step_rotated


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    return p


def setup(args) -> tuple:
    """``(run_args, x, rows)``: caches off, the e2e input, and the compiled plain stack as row ``residual``."""
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    run_args = argparse.Namespace(d=args.d, layers=args.layers, kernels="on")
    torch.manual_seed(0)
    x = torch.randn(4, 256, args.d)
    return run_args, x, {"residual": Runner("residual", "compiled", run_args, x, "cpu")}


def compiled_row(variant: str, key: str, run_args, x) -> Runner:
    """The default-form ``variant`` row compiled now (the caller has put the form to measure in place), from a
    step function of its own, checked against its eager model."""
    row = Runner(f"module-{variant}", "eager", run_args, x, "cpu")
    name = "step_" + key.replace("-", "_")
    namespace = {"m": row.params_of}
    exec(compile(f"def {name}(x):\n    return m(x)\n", f"<{key}>", "exec"), namespace)
    row.model = torch.compile(namespace[name])
    row.check_err = check_compiled(row.model, row.params_of, x, autocast=row.autocast)
    print(f"{key}: compiled, max error against eager {row.check_err:.2e}", flush=True)
    return row


def run(rows: dict, rounds: int) -> dict:
    """Warm-up, ``rounds`` interleaved rounds, the table printed; ``{row: median step / residual's}``."""
    for row in rows.values():
        row.warm_up(2)
    step_rotated(list(rows.values()), rounds)
    base = statistics.median(rows["residual"].times)
    result = {k: statistics.median(r.times) / base for k, r in rows.items()}
    for key, row in rows.items():
        print(f"{key:14s} {statistics.median(row.times):8.1f} ms  x{result[key]:.3f}")
    return result
