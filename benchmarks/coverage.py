"""Coverage table: every architecture of the zoo, sites found / rewritten, equivalence error per variant.

The errors are those of the default, structure-preserving form (``rewrite(form="module")``), measured on fresh
random inputs at the entry's *other shape*: another batch size and another sequence length or image side than
the example the model was captured with (``ZooEntry.other``; "batch only" where the original model itself only
takes its configured image size). "dead params" counts the connection parameters that get no gradient from one
training-mode backward pass (must be 0). The last column is what the flat graph form (``form="graph"``) rewrites
with mHC.

    python -m benchmarks.coverage [--out docs/coverage.md] [--models gpt2 bert ...] [--readme]

``--readme`` also replaces the table between the coverage markers in README.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
import warnings

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = ("mhc", "frac", "hc")
BEGIN, END = "<!-- coverage:begin -->", "<!-- coverage:end -->"
TOL = 1e-5


def _main_output(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def _other_shape(entry) -> str:
    other = entry.other
    what = [f"batch {other['batch']}"]
    if "seq" in other:
        what.append(f"length {other['seq']}")
    if "size" in other:
        what.append(f"{other['size']}px")
    return ", ".join(what) if len(what) > 1 else what[0] + " only"


def _dead(new, args, kwargs) -> int:
    """Connection parameters without a gradient after one training-mode backward pass."""
    new.train()
    try:
        _main_output(new(*args, **kwargs)).float().pow(2).mean().backward()
    finally:
        new.eval()
    return sum(1 for p in new.hc.parameters() if p.grad is None)


def measure(name: str) -> dict:
    import hc_rewrite
    from hc_rewrite.zoo import ZOO

    entry = ZOO[name]
    model = entry.build()
    args, kwargs = entry.inputs()
    row = {"model": name, "family": entry.family, "class": type(model).__name__, "other": _other_shape(entry)}
    a2, k2 = entry.other_inputs(generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        ref = _main_output(model(*a2, **k2))
    t0 = time.perf_counter()
    for variant in VARIANTS:
        try:
            new = hc_rewrite.rewrite(model, args, kwargs, variant=variant, n=4)
        except Exception as e:  # noqa: BLE001 - a failure is a row of the table, not a crash
            row[variant] = f"error: {type(e).__name__}"
            row.setdefault("why", f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
            continue
        rep = new.hc_report
        with torch.no_grad():
            got = _main_output(new(*a2, **k2))
        row[variant] = ((got - ref).abs().max() / ref.abs().max()).item()
        row[f"{variant}_dead"] = _dead(new, a2, k2)
        row.update(sites=len(rep.sites), rewritten=len(rep.rewritten), streams=len(rep.streams),
                   kinds=", ".join(sorted({s.kind for s in rep.rewritten})), shapes=rep.shapes)
        if rep.refused:
            row.setdefault("why", "; ".join(f"{s.name}: {s.reason}" for s in rep.refused)[:200])
    try:
        flat = hc_rewrite.rewrite(model, args, kwargs, variant="mhc", n=4, form="graph")
        row["graph"] = f"{len(flat.hc_report.rewritten)}/{len(flat.hc_report.sites)}"
        row["graph_dead"] = _dead(flat, args, kwargs)
    except Exception as e:  # noqa: BLE001
        row["graph"] = f"error: {type(e).__name__}"
    row["seconds"] = time.perf_counter() - t0
    return row


def _ok(r: dict) -> bool:
    return bool(r.get("sites")) and r.get("rewritten") == r.get("sites") and all(
        isinstance(r.get(v), float) and r[v] <= TOL and r.get(f"{v}_dead") == 0 for v in VARIANTS)


def to_markdown(rows: list[dict]) -> str:
    head = ("| model | family | class | streams | sites found | rewritten | kinds | other shapes | mhc rel. err "
            "| frac rel. err | hc rel. err | dead params | graph form (mhc) |")
    lines = [head, "|" + "---|" * 13]
    notes = []
    for r in rows:
        errs = [f"{r[v]:.1e}" if isinstance(r.get(v), float) else str(r.get(v)) for v in VARIANTS]
        dead = sum(r.get(f"{v}_dead", 0) for v in VARIANTS) + r.get("graph_dead", 0)
        lines.append(f"| {r['model']} | {r['family']} | {r['class']} | {r.get('streams', '-')} | "
                     f"{r.get('sites', '-')} | {r.get('rewritten', '-')} | {r.get('kinds', '-')} | {r['other']} | "
                     + " | ".join(errs) + f" | {dead} | {r.get('graph', '-')} |")
        if r.get("why"):
            notes.append(f"- {r['model']}: {r['why']}")
        if r.get("shapes", "").startswith("example's shapes"):  # capture.TRACE_CALL: the default form only
            tried = r["shapes"].split(" (", 1)[1].rstrip(")") if " (" in r["shapes"] else ""
            notes.append(f"- {r['model']}: sites found in a trace of one eager call, so no graph form ({tried})")
        elif r.get("shapes", "dynamic") != "dynamic":
            notes.append(f"- {r['model']}: {r['shapes']}")
    ok = sum(1 for r in rows if _ok(r))
    lines.append("")
    lines.append(f"{ok} of {len(rows)} architectures: every site rewritten in the structure-preserving form, every "
                 f"variant equivalent at init at a shape the capture never saw (max relative error <= {TOL:g}, fp32, "
                 "fresh random inputs; captured at batch 2 x length 8 or the entry's image size; n = 4, dynamic) "
                 "and no dead connection parameter (all three variants and the graph form where there is one).")
    if notes:
        lines += ["", "Refused or limited:", *notes]
    return "\n".join(lines)


def main(argv=None) -> int:
    from tqdm import tqdm

    from hc_rewrite.zoo import ZOO

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=None, help="zoo names (default: all)")
    ap.add_argument("--out", default="docs/coverage.md")
    ap.add_argument("--readme", action="store_true", help="also update the table in README.md")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass
    names = args.models or list(ZOO)
    rows = [measure(n) for n in tqdm(names, desc="coverage", unit="model")]
    table = to_markdown(rows)
    header = (f"# Coverage\n\nGenerated by `python -m benchmarks.coverage` "
              f"(torch {torch.__version__}, {platform.machine()} CPU). Each model is a `transformers` "
              "architecture built from a small config (2 layers unless noted) or a hand-written user-style module "
              "(`hc_rewrite/zoo_handwritten.py`); `minilm` is the pretrained all-MiniLM-L6-v2.\n\n")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write(header + table + "\n")
    print(table)
    if args.readme:
        text = open("README.md").read()
        if BEGIN in text and END in text:
            pre, rest = text.split(BEGIN, 1)
            _, post = rest.split(END, 1)
            open("README.md", "w").write(pre + BEGIN + "\n" + table + "\n" + END + post)
    return 0 if all(_ok(r) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
