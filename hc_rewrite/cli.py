"""``hc-rewrite``: the command-line tool.

    hc-rewrite models                                   # the architectures of the built-in zoo
    hc-rewrite report --model gpt2 --variant mhc --n 4  # table of every stream and residual site
    hc-rewrite report --model bert --graph bert.png     # ... and a picture (.png, .dot or .mmd)
    hc-rewrite report --model mypkg.models:make         # your own model: make() -> (model, args, kwargs)
    hc-rewrite export-onnx --model gpt2 --out gpt2_mhc.onnx
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from . import variants
from .spec import FLAVOURS


def load_model(spec: str):
    """``NAME`` from :mod:`hc_rewrite.zoo`, or ``package.module:callable`` returning ``(model, args, kwargs)``."""
    if ":" in spec:
        mod_name, _, fn_name = spec.partition(":")
        out = getattr(importlib.import_module(mod_name), fn_name)()
        if not (isinstance(out, tuple) and len(out) == 3):
            raise SystemExit(f"{spec}() must return (model, args, kwargs)")
        return out
    from .zoo import get

    try:
        entry = get(spec)
    except KeyError as e:
        raise SystemExit(str(e.args[0]))
    args, kwargs = entry.inputs()
    return entry.build(), args, kwargs


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="zoo name (see `hc-rewrite models`) or module:callable")
    p.add_argument("--variant", default="mhc", choices=variants.NAMES, help="default: mhc")
    p.add_argument("--n", type=int, default=4, help="expansion rate / number of fractions (default 4)")
    p.add_argument("--static", action="store_true", help="static coefficients (default: dynamic)")
    p.add_argument("--flavour", default="paper", choices=FLAVOURS,
                   help="mhc only: the paper's math (default) or a production model's (deepseek-v4, glm5-next)")
    p.add_argument("--form", default="module", choices=["module", "graph"],
                   help="module: the user's model with its structure kept (default); graph: one flat graph")


def _cmd_models(args) -> int:
    from .zoo import ZOO

    wn = max(len(e.name) for e in ZOO.values())
    wf = max(len(e.family) for e in ZOO.values())
    for e in ZOO.values():
        print(f"{e.name:{wn}s}  {e.family:{wf}s}  {e.notes}".rstrip())
    return 0


def _cmd_report(args) -> int:
    from . import report
    from .visualize import write_graph

    model, margs, mkwargs = load_model(args.model)
    rep = report(model, margs, mkwargs, variant=args.variant, n=args.n, dynamic=not args.static,
                 form=getattr(args, "form", "module"), flavour=args.flavour)
    if args.json:
        print(json.dumps(rep.to_dict(), indent=2))
    else:
        print(rep)
    if args.graph:
        print(f"wrote {write_graph(rep, args.graph)}", file=sys.stderr)
    return 0 if rep.rewritten else 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hc-rewrite", description="Rewrite residual streams into mHC / Frac / HC.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("models", help="list the built-in model zoo")
    p.set_defaults(func=_cmd_models)
    p = sub.add_parser("report", help="print every residual stream and site, rewritten or refused, and why")
    _add_spec_args(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--graph", metavar="FILE", help="also write the stream graph: FILE.png, FILE.dot or FILE.mmd")
    p.set_defaults(func=_cmd_report)
    try:
        from .cli_export import add_export_onnx_parser
    except ImportError:
        pass
    else:
        add_export_onnx_parser(sub)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
