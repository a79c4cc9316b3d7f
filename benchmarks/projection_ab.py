"""A/B of the dynamic coefficients' projection in the compiled default-form training step on the CPU: the
forward product as a library call in the narrow orientation (:func:`hc_rewrite.ops.fusible.narrow_matmul`) against
one reduction per column that Inductor computes with the row statistics (:func:`hc_rewrite.ops.fusible.column_matmul`).

    python -m benchmarks.projection_ab [--variants hc frac mhc] [--rounds 15]

The e2e stack (d=256, 4 layers, 4 x 256 tokens, fp32, AdamW), rows interleaved in one process (the order rotated
each round), each compiled from a code object of its own with Inductor's and AOTAutograd's caches off (dynamo would
otherwise reuse one row's compiled code for the other). Prints each row's median step and its ratio to the compiled
plain stack's. ``docs/kernels.md`` item 8 has the runs behind the choice (column sums for HC only).
"""
from __future__ import annotations

import argparse
import statistics

import torch

from hc_rewrite.ops import fusible
from hc_rewrite.ops import reference as ref
from hc_rewrite.variants.mhc import mhc_coeffs_op

from .compiled_check import check_compiled
from .e2e import Runner, step_rotated


def _mhc(matmul):
    def coeffs(w, phi, alpha, b_pre, b_post, b_res, eps, iters):
        return mhc_coeffs_op(w, phi, alpha, b_pre, b_post, b_res, eps, iters, sinkhorn=fusible.sinkhorn,
                             project=lambda x, weight, e: ref.rms_project(x, weight, e, matmul=matmul))
    return coeffs


def _ln(op, matmul):
    def project(x, weight):
        return fusible.centered_ln_project(x, weight, matmul=matmul)

    def coeffs(*args):
        return op(*args, project=project)
    return coeffs


#: ``{variant: (op name, {form: implementation})}``
FORMS = {
    "hc": ("hc_coeffs", {"library": _ln(ref.hc_coeffs, fusible.narrow_matmul),
                         "column": _ln(ref.hc_coeffs, fusible.column_matmul)}),
    "frac": ("frac_coeffs", {"library": _ln(ref.frac_coeffs, fusible.narrow_matmul),
                             "column": _ln(ref.frac_coeffs, fusible.column_matmul)}),
    "mhc": ("mhc_coeffs", {"library": _mhc(fusible.narrow_matmul), "column": _mhc(fusible.column_matmul)}),
}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(FORMS), default=["hc", "frac"])
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
    for variant in args.variants:
        op, forms = FORMS[variant]
        original = fusible.FUSIBLE[op]
        try:
            for name, form in forms.items():
                fusible.FUSIBLE[op] = form
                key = f"{variant}-{name}"
                row = Runner(f"module-{variant}", "eager", run_args, x, "cpu")
                namespace = {"m": row.params_of}
                exec(compile(f"def step_{variant}_{name}(x):\n    return m(x)\n", f"<{key}>", "exec"), namespace)
                row.model = torch.compile(namespace[f"step_{variant}_{name}"])
                row.check_err = check_compiled(row.model, row.params_of, x, autocast=row.autocast)
                rows[key] = row
                print(f"{key}: compiled, max error against eager {row.check_err:.2e}", flush=True)
        finally:
            fusible.FUSIBLE[op] = original
    for row in rows.values():
        row.warm_up(2)
    step_rotated(list(rows.values()), args.rounds)
    base = statistics.median(rows["residual"].times)
    result = {k: statistics.median(r.times) / base for k, r in rows.items()}
    for key, row in rows.items():
        print(f"{key:14s} {statistics.median(row.times):8.1f} ms  x{result[key]:.3f}")
    return result


if __name__ == "__main__":
    main()
