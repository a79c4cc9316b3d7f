"""``hc-rewrite export-onnx``: rewrite a zoo model and export it to ONNX.

    hc-rewrite export-onnx --model gpt2 --variant mhc --n 4 --out gpt2_mhc.onnx

Wire it into the CLI with ``add_export_onnx_parser(subparsers)``; the subcommand's handler is stored as
the parser default ``func`` (call ``args.func(args)``; it returns the exit status).
"""
from __future__ import annotations

import argparse
import sys
import time

from . import variants


def add_export_onnx_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``export-onnx`` subcommand on ``subparsers`` (from ``parser.add_subparsers()``)."""
    from .zoo import ZOO

    p = subparsers.add_parser(
        "export-onnx",
        help="rewrite a zoo model and export it to ONNX (dynamic batch and sequence)",
        description=(
            "Rewrite a model of the zoo (hc_rewrite.zoo) into mHC / Frac / HC connections and export it "
            "to ONNX with the dynamo exporter. Batch and sequence axes are dynamic unless --static-shapes."
        ),
    )
    p.add_argument("--model", required=True, choices=sorted(ZOO), metavar="NAME",
                   help=f"zoo model: {', '.join(sorted(ZOO))}")
    p.add_argument("--variant", default="mhc", choices=variants.NAMES, help="connection variant (default: mhc)")
    p.add_argument("--n", type=int, default=4, help="expansion rate / number of fractions (default: 4)")
    p.add_argument("--static", action="store_true",
                   help="static connections (coefficients do not depend on the input; rewrite(dynamic=False))")
    p.add_argument("--static-shapes", action="store_true",
                   help="export with the example's batch and sequence sizes fixed")
    p.add_argument("--out", default=None, help="output path (default: <model>_<variant>.onnx)")
    p.add_argument("--batch", type=int, default=2, help="batch size of the example input (default: 2)")
    p.add_argument("--seq", type=int, default=8, help="sequence length of the example input (default: 8)")
    p.add_argument("--verify", action="store_true",
                   help="run the file with onnxruntime on the example and compare with PyTorch")
    p.set_defaults(func=run_export_onnx)
    return p


def run_export_onnx(args) -> int:
    """Handler of ``export-onnx``; returns the exit status."""
    import torch

    from . import rewrite
    from .errors import HCRewriteError
    from .onnx_export import _default_dynamic_shapes, export_onnx, onnx_input_layout
    from .zoo import get

    if not args.static_shapes and (args.batch < 2 or args.seq < 2):
        print("export-onnx: --batch and --seq must be >= 2 for dynamic axes (torch.export specialises a "
              "size of 1); use --static-shapes to export fixed sizes", file=sys.stderr)
        return 2
    out = args.out or f"{args.model}_{args.variant}.onnx"
    entry = get(args.model)
    t0 = time.perf_counter()
    model = entry.build()
    ex_args, ex_kwargs = entry.inputs(batch=args.batch, seq=args.seq, generator=torch.Generator().manual_seed(0))
    try:
        new_model = rewrite(model, ex_args, ex_kwargs, variant=args.variant, n=args.n, dynamic=not args.static, form="graph")
    except (HCRewriteError, ValueError) as e:
        print(f"export-onnx: cannot rewrite {args.model}: {e}", file=sys.stderr)
        return 1
    dynamic = not args.static_shapes
    export_onnx(new_model, ex_args, out, example_kwargs=ex_kwargs, dynamic_batch=dynamic, dynamic_seq=dynamic,
                verify=args.verify)
    names, tensors, _ = onnx_input_layout(new_model, ex_args, ex_kwargs)
    axes = _default_dynamic_shapes(names, tensors, dynamic, dynamic)
    inputs = ", ".join(
        f"{n}[{', '.join((ax or {}).get(i, str(size)) for i, size in enumerate(t.shape))}]"
        for n, t, ax in zip(names, tensors, axes)
    )
    print(f"wrote {out}: {args.model} -> {args.variant} n={args.n} "
          f"({'static' if args.static else 'dynamic'} connections), inputs {inputs}"
          f"{', verified with onnxruntime' if args.verify else ''} ({time.perf_counter() - t0:.1f}s)")
    return 0
