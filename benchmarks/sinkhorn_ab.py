"""A/B of mHC's Sinkhorn in the compiled default-form training step on the CPU: the C++ kernel
(:mod:`hc_rewrite.ops.cpu_sinkhorn`) against Inductor's tiled form (:func:`hc_rewrite.ops.fusible.tiled_sinkhorn`).

    python -m benchmarks.sinkhorn_ab [--rounds 15]

The e2e stack (d=256, 4 layers, 4 x 256 tokens, fp32, AdamW), rows interleaved in one process (the order rotated
each round), each compiled from a code object of its own with Inductor's and AOTAutograd's caches off (dynamo would
otherwise reuse one row's compiled code for the other). Prints each row's median step and its ratio to the compiled
plain stack's, and the kernel's calls per step (one forward and one backward per site with ``H_res``).
"""
from __future__ import annotations

from hc_rewrite.ops import cpu_sinkhorn, fusible
from hc_rewrite.variants.mhc import mhc_coeffs_op

from . import form_ab


def _tiled(w, phi, alpha, b_pre, b_post, b_res, eps, iters):
    return mhc_coeffs_op(w, phi, alpha, b_pre, b_post, b_res, eps, iters, sinkhorn=fusible.tiled_sinkhorn,
                         project=fusible.narrow_rms_project)


FORMS = {"kernel": fusible.mhc_coeffs, "tiled": _tiled}


def main(argv=None) -> dict:
    args = form_ab.parser(__doc__).parse_args(argv)
    run_args, x, rows = form_ab.setup(args)
    original = fusible.FUSIBLE["mhc_coeffs"]
    try:
        for name, form in FORMS.items():
            fusible.FUSIBLE["mhc_coeffs"] = form
            rows[name] = form_ab.compiled_row("mhc", name, run_args, x)
    finally:
        fusible.FUSIBLE["mhc_coeffs"] = original
    calls = [0]
    run = cpu_sinkhorn._run

    def counting(*a):
        calls[0] += 1
        return run(*a)

    cpu_sinkhorn._run = counting
    try:
        result = form_ab.run(rows, args.rounds)
    finally:
        cpu_sinkhorn._run = run
    print(f"kernel calls per kernel-row step: {calls[0] / args.rounds:.0f}")
    return result


if __name__ == "__main__":
    main()
