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

from hc_rewrite.ops import fusible
from hc_rewrite.ops import reference as ref
from hc_rewrite.variants.mhc import mhc_coeffs_op

from . import form_ab


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
    parser = form_ab.parser(__doc__)
    parser.add_argument("--variants", nargs="+", choices=list(FORMS), default=["hc", "frac"])
    args = parser.parse_args(argv)
    run_args, x, rows = form_ab.setup(args)
    for variant in args.variants:
        op, forms = FORMS[variant]
        original = fusible.FUSIBLE[op]
        try:
            for name, form in forms.items():
                fusible.FUSIBLE[op] = form
                rows[f"{variant}-{name}"] = form_ab.compiled_row(variant, f"{variant}-{name}", run_args, x)
        finally:
            fusible.FUSIBLE[op] = original
    return form_ab.run(rows, args.rounds)


if __name__ == "__main__":
    main()
