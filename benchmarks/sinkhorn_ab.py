"""A/B of mHC's Sinkhorn in the compiled default-form training step on the CPU: the C++ kernel
(:mod:`hc_rewrite.ops.cpu_sinkhorn`) against Inductor's tiled form (:func:`hc_rewrite.ops.fusible.tiled_sinkhorn`).

    python -m benchmarks.sinkhorn_ab [--rounds 15]

The e2e stack (d=256, 4 layers, 4 x 256 tokens, fp32, AdamW), rows interleaved in one process (the order rotated
each round), each compiled from a code object of its own with Inductor's and AOTAutograd's caches off (dynamo would
otherwise reuse one row's compiled code for the other). Prints each row's median step and its ratio to the compiled
plain stack's, and the kernel's calls per step (one forward and one backward per site with ``H_res``).
"""
from __future__ import annotations

import argparse
import statistics

import torch

from hc_rewrite.ops import cpu_sinkhorn, fusible
from hc_rewrite.variants.mhc import mhc_coeffs_op

from .compiled_check import check_compiled
from .e2e import Runner, step_rotated


def _tiled(w, phi, alpha, b_pre, b_post, b_res, eps, iters):
    return mhc_coeffs_op(w, phi, alpha, b_pre, b_post, b_res, eps, iters, sinkhorn=fusible.tiled_sinkhorn,
                         project=fusible.narrow_rms_project)


FORMS = {"kernel": fusible.mhc_coeffs, "tiled": _tiled}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    run_args = argparse.Namespace(d=args.d, layers=args.layers, kernels="on")
    torch.manual_seed(0)
    x = torch.randn(4, 256, args.d)
    rows = {"residual": Runner("residual", "compiled", run_args, x, "cpu")}
    original = fusible.FUSIBLE["mhc_coeffs"]
    try:
        for name, form in FORMS.items():
            fusible.FUSIBLE["mhc_coeffs"] = form
            row = Runner("module-mhc", "eager", run_args, x, "cpu")
            namespace = {"m": row.params_of}
            exec(compile(f"def step_{name}(x):\n    return m(x)\n", f"<{name}>", "exec"), namespace)
            row.model = torch.compile(namespace[f"step_{name}"])
            row.check_err = check_compiled(row.model, row.params_of, x, autocast=row.autocast)
            rows[name] = row
            print(f"{name}: compiled, max error against eager {row.check_err:.2e}", flush=True)
    finally:
        fusible.FUSIBLE["mhc_coeffs"] = original
    for row in rows.values():
        row.warm_up(2)
    calls = [0]
    run = cpu_sinkhorn._run

    def counting(*a):
        calls[0] += 1
        return run(*a)

    cpu_sinkhorn._run = counting
    try:
        step_rotated(list(rows.values()), args.rounds)
    finally:
        cpu_sinkhorn._run = run
    base = statistics.median(rows["residual"].times)
    result = {k: statistics.median(r.times) / base for k, r in rows.items()}
    for key, row in rows.items():
        print(f"{key:9s} {statistics.median(row.times):8.1f} ms  x{result[key]:.3f}")
    print(f"kernel calls per kernel-row step: {calls[0] / args.rounds:.0f}")
    return result


if __name__ == "__main__":
    main()
