"""Train a byte-level causal LM with plain residuals, mHC, Frac-connections and Hyper-connections, on
the same data, seed, steps and tokens, and compare the loss curves.

The base model is a ``transformers`` Llama built from a small config (vocabulary: the 256 byte values, an
end-of-file token and padding up to 264). It is built once from ``--seed``; the residual run trains a
copy of it and every other run trains ``hc_rewrite.rewrite(base, ...)``, so all runs start from the same
function (the rewrite is function-preserving at init: the step-0 losses are equal).

Corpus: the Python standard library source that ships with the interpreter
(``sysconfig.get_paths()["stdlib"]``, ``*.py``; test suites and site-packages left out), available offline
on every machine. A file is held out for validation when the SHA-1 of its relative path says so
(deterministic, about 5 % of the files); training windows are sampled with a seeded generator, the same
for every run; validation windows are evenly spaced over the held-out bytes.

    python examples/train_lm.py --mode smoke             # ~1 min on a CPU (used by the tests)
    python examples/train_lm.py --mode cpu               # a few minutes on a 2-core CPU
    python examples/train_lm.py --mode full --compile    # sized for ~8 min on one H100 (bf16 autocast)
    python examples/train_lm.py --mode cpu --variants residual,mhc --steps 100 --out /tmp/run

Writes ``train_lm_<mode>.png`` (train and validation loss curves), ``train_lm_<mode>.md`` (results
table) and ``train_lm_<mode>.json`` (every number) into ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

VARIANTS = ("residual", "mhc", "frac", "hc")
LABELS = {"residual": "residual (baseline)", "mhc": "mHC", "frac": "Frac", "hc": "HC"}
COLORS = {"residual": "black", "mhc": "tab:red", "frac": "tab:blue", "hc": "tab:green"}
EOS = 256  # end-of-file token, between files
VOCAB = 264  # 256 bytes + EOS, padded to a multiple of 8
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}

#: Model / run size per mode. ``tokens per run = steps * batch * seq``.
MODES = {
    "smoke": dict(d=64, layers=2, heads=4, seq=64, batch=8, steps=30, lr=3e-3, warmup=3,
                  eval_every=10, eval_batches=4, amp="fp32", threads=1),
    "cpu": dict(d=128, layers=4, heads=4, seq=128, batch=8, steps=200, lr=3e-3, warmup=20,
                eval_every=20, eval_batches=8, amp="fp32"),
    "full": dict(d=512, layers=8, heads=8, seq=512, batch=32, steps=1500, lr=1.5e-3, warmup=150,
                 eval_every=100, eval_batches=32, amp="bf16"),
}


# ----------------------------------------------------------------------------------------------- data

def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path) -> list[str]:
    """Relative paths (POSIX, sorted) of the standard library's ``*.py`` files, tests and site-packages
    left out."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                out.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(out)


def is_validation(rel: str, val_percent: int) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 100 < val_percent


def load_corpus(root: Path | None = None, val_percent: int = 5):
    """``(train, val, info)``: int16 token tensors (bytes, EOS after each file) and a description."""
    root = Path(root) if root else stdlib_root()
    files = stdlib_files(root)
    if not files:
        raise SystemExit(f"no *.py files under {root}")
    parts = {"train": [], "val": []}
    counts = {"train": 0, "val": 0}
    eos = torch.tensor([EOS], dtype=torch.int16)
    digest = hashlib.sha1()
    for rel in files:
        data = (root / rel).read_bytes()
        if not data:
            continue
        digest.update(rel.encode() + b"\0" + data)
        split = "val" if is_validation(rel, val_percent) else "train"
        parts[split] += [torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int16), eos]
        counts[split] += 1
    train, val = torch.cat(parts["train"]), torch.cat(parts["val"])
    info = dict(root=str(root), python=platform.python_version(), train_files=counts["train"],
                val_files=counts["val"], train_tokens=len(train), val_tokens=len(val),
                sha1=digest.hexdigest()[:12])
    return train, val, info


def train_starts(n_tokens: int, steps: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    """``[steps, batch]`` window starts; the same for every run with the same seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seq - 1, (steps, batch), generator=g)


def val_starts(n_tokens: int, n_batches: int, batch: int, seq: int) -> torch.Tensor:
    """``[n_batches, batch]`` evenly spaced window starts over the held-out tokens."""
    count = n_batches * batch
    return torch.linspace(0, n_tokens - seq - 2, count).long().view(n_batches, batch)


def windows(data: torch.Tensor, starts: torch.Tensor, seq: int):
    x = torch.stack([data[int(s):int(s) + seq + 1] for s in starts]).long()
    return x[:, :-1], x[:, 1:]


# ---------------------------------------------------------------------------------------------- model

def build_base(d: int, layers: int, heads: int, seq: int, seed: int):
    """A Llama (RMSNorm, RoPE, SwiGLU) built from a small config, initialised from ``seed``."""
    import transformers

    hidden = 64 * math.ceil(8 * d / 3 / 64)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=d, intermediate_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=seq,
        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=None, tie_word_embeddings=False,
        use_cache=False, attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.config.use_cache = False
    return model.train()


def logits_of(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def lm_loss(model, x, y, amp_dtype) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = logits_of(model(input_ids=x))
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def make_optimizer(model, lr: float, weight_decay: float):
    """AdamW; weight decay on the original weight matrices only (not on norms, biases or ``hc.``)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and not name.startswith("hc.") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def lr_lambda(warmup: int, steps: int, floor: float = 0.1):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


# --------------------------------------------------------------------------------------------- memory

class PeakMemory:
    """Peak memory of one run: CUDA ``max_memory_allocated``, or on CPU the peak resident set size
    sampled every few ms by a thread, minus the RSS when the run started (``None`` where unreadable)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = self.peak = None
        self._stop = threading.Event()
        self._thread = None

    @staticmethod
    def rss() -> int | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self.base = self.peak = self.rss()
        if self.base is not None:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.003):
            r = self.rss()
            if r is not None and r > self.peak:
                self.peak = r

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def mib(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.base is None:
            return None
        return (self.peak - self.base) / 2**20

    def label(self) -> str:
        return "CUDA peak allocated" if self.device.type == "cuda" else "peak RSS delta (sampled)"


# ----------------------------------------------------------------------------------------------- runs

def evaluate(model, val, vstarts, seq, amp_dtype, device) -> float:
    model.eval()
    total = 0.0
    with torch.no_grad():
        for starts in vstarts:
            x, y = windows(val, starts, seq)
            total += lm_loss(model, x.to(device), y.to(device), amp_dtype).item()
    model.train()
    return total / len(vstarts)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(variant, base, train, val, tstarts, vstarts, cfg, args, device, amp_dtype) -> dict:
    """Train one copy (residual) or rewrite (mhc / frac / hc) of ``base``; returns its curves."""
    import hc_rewrite
    from tqdm.auto import tqdm

    seq, batch, steps = cfg["seq"], cfg["batch"], cfg["steps"]
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    mem = PeakMemory(device)
    with mem:
        t0 = time.perf_counter()
        if variant == "residual":
            model = copy.deepcopy(base)
        else:
            example, _ = windows(train, tstarts[0], seq)
            model = hc_rewrite.rewrite(base, (), {"input_ids": example.to(device)}, variant=variant,
                                       n=args.n, dynamic=not args.static, form="graph")
        model.train()
        rewrite_s = time.perf_counter() - t0
        n_params = sum(p.numel() for p in model.parameters())
        hc_params = sum(p.numel() for name, p in model.named_parameters() if name.startswith("hc."))
        runner = torch.compile(model) if args.compile else model
        opt = make_optimizer(model, cfg["lr"], args.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg["warmup"], steps))

        train_losses, val_points = [], []
        val_points.append((0, 0, evaluate(runner, val, vstarts, seq, amp_dtype, device)))
        timed_s, timed_tokens = 0.0, 0
        bar = tqdm(range(steps), desc=f"{variant:>8}", disable=args.no_progress, dynamic_ncols=True,
                   file=sys.stderr)
        for step in bar:
            x, y = windows(train, tstarts[step], seq)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sync(device)
            t = time.perf_counter()
            loss = lm_loss(runner, x, y, amp_dtype)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            value = loss.item()  # syncs
            if step > 0 or steps == 1:  # step 0 pays for warm-up / compilation
                timed_s += time.perf_counter() - t
                timed_tokens += batch * seq
            train_losses.append(value)
            if not math.isfinite(value):
                bar.close()
                raise FloatingPointError(f"{variant}: loss {value} at step {step}")
            done = step + 1
            if done % cfg["eval_every"] == 0 or done == steps:
                val_points.append((done, done * batch * seq,
                                   evaluate(runner, val, vstarts, seq, amp_dtype, device)))
                bar.set_postfix(loss=f"{value:.3f}", val=f"{val_points[-1][2]:.3f}")
            elif step % 10 == 0:
                bar.set_postfix(loss=f"{value:.3f}", val=f"{val_points[-1][2]:.3f}")
        bar.close()
        wall_s = time.perf_counter() - t0
    tail = max(1, steps // 10)
    result = dict(
        variant=variant, params=n_params, hc_params=hc_params, rewrite_s=rewrite_s, wall_s=wall_s,
        train_losses=train_losses, val_points=val_points,
        step0_train_loss=train_losses[0], step0_val_loss=val_points[0][2],
        final_val_loss=val_points[-1][2], final_train_loss=sum(train_losses[-tail:]) / tail,
        tokens=steps * batch * seq, tokens_per_s=timed_tokens / timed_s if timed_s else float("nan"),
        peak_mem_mib=mem.mib(), peak_mem_kind=mem.label(),
    )
    if variant != "residual":
        result["report"] = str(model.hc_report).splitlines()[0] if hasattr(model, "hc_report") else ""
    del runner, model, opt
    return result


# ------------------------------------------------------------------------------------------- outputs

def tokens_to_reach(result: dict, target: float):
    for _, tokens, v in result["val_points"][1:]:
        if v <= target:
            return tokens
    return None


def fmt_tokens(n) -> str:
    if n is None:
        return "not reached"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def markdown_table(results: list[dict]) -> str:
    by = {r["variant"]: r for r in results}
    ref = by.get("residual")
    lines = [
        "| run | params (+ hc) | val loss @ step 0 | final val loss | Δ val vs residual | final train loss "
        "| tokens to reach residual's final val | tokens/s | peak memory (MiB) | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        delta = "—" if ref is None or r is ref else f"{r['final_val_loss'] - ref['final_val_loss']:+.4f}"
        reach = "—" if ref is None else fmt_tokens(tokens_to_reach(r, ref["final_val_loss"]))
        mem = "n/a" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
        lines.append(
            f"| {LABELS.get(r['variant'], r['variant'])} | {r['params'] / 1e6:.3f}M (+{r['hc_params']:,}) "
            f"| {r['step0_val_loss']:.6f} | {r['final_val_loss']:.4f} | {delta} | {r['final_train_loss']:.4f} "
            f"| {reach} | {r['tokens_per_s']:,.0f} | {mem} | {r['wall_s']:.1f} |"
        )
    return "\n".join(lines)


def smooth(values, window):
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot(results: list[dict], path: Path, title: str, batch_tokens: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = next((r for r in results if r["variant"] == "residual"), None)
    ncols = 3 if ref is not None and len(results) > 1 else 2
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.5))
    a, b = axes[0], axes[1]
    steps = max(len(r["train_losses"]) for r in results)
    window = max(1, steps // 25)
    lo_t, hi_v, lo_v = float("inf"), -float("inf"), float("inf")
    for r in results:
        c, lab = COLORS.get(r["variant"]), LABELS.get(r["variant"], r["variant"])
        toks = [(i + 1) * batch_tokens / 1e6 for i in range(len(r["train_losses"]))]
        sm = smooth(r["train_losses"], window)
        a.plot(toks, r["train_losses"], color=c, alpha=0.15, linewidth=0.8)
        a.plot(toks, sm, color=c, label=lab, linewidth=1.5)
        lo_t = min(lo_t, min(sm))
        vt = [p[1] / 1e6 for p in r["val_points"]]
        vv = [p[2] for p in r["val_points"]]
        b.plot(vt, vv, "o-", color=c, label=lab, markersize=3, linewidth=1.3)
        lo_v = min(lo_v, min(vv))
        later = vv[max(1, len(vv) // 5):] or vv
        hi_v = max(hi_v, max(later))
    a.set_title(f"train loss (running mean over {window} steps)")
    a.set_xlabel("training tokens (M)")
    a.set_ylabel("cross-entropy (nats / byte)")
    a.set_ylim(lo_t - 0.05, results[0]["train_losses"][0] + 0.1)
    b.set_title("validation loss (held-out stdlib modules)")
    b.set_xlabel("training tokens (M)")
    b.set_ylim(lo_v - 0.02, hi_v + 0.05)
    if ncols == 3:
        c_ax = axes[2]
        base = {p[0]: p[2] for p in ref["val_points"]}
        c_ax.axhline(0.0, color=COLORS["residual"], linewidth=1, label=LABELS["residual"])
        for r in results:
            if r is ref:
                continue
            pts = [(p[1] / 1e6, p[2] - base[p[0]]) for p in r["val_points"] if p[0] in base]
            c_ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=COLORS.get(r["variant"]),
                      label=LABELS.get(r["variant"], r["variant"]), markersize=3, linewidth=1.3)
        c_ax.set_title("validation loss minus residual's (below 0: better)")
        c_ax.set_xlabel("training tokens (M)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=sorted(MODES), default="smoke", help="size preset (default smoke)")
    ap.add_argument("--out", default="train_lm_out", help="output folder (default ./train_lm_out)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated runs, from {','.join(VARIANTS)} (default: all)")
    ap.add_argument("--steps", type=int, help="training steps (overrides the mode)")
    ap.add_argument("--batch", type=int, help="sequences per step (overrides the mode)")
    ap.add_argument("--seq", type=int, help="sequence length in bytes (overrides the mode)")
    ap.add_argument("--d", type=int, help="model width (overrides the mode)")
    ap.add_argument("--layers", type=int, help="decoder layers (overrides the mode)")
    ap.add_argument("--heads", type=int, help="attention heads (overrides the mode)")
    ap.add_argument("--lr", type=float, help="peak learning rate (overrides the mode)")
    ap.add_argument("--warmup", type=int, help="linear warm-up steps (overrides the mode)")
    ap.add_argument("--eval-every", type=int, help="validate every N steps (overrides the mode)")
    ap.add_argument("--eval-batches", type=int, help="validation batches (overrides the mode)")
    ap.add_argument("--amp", choices=["fp32", "bf16"], help="autocast dtype (default: the mode's; "
                    "bf16 only on CUDA)")
    ap.add_argument("--n", type=int, default=4, help="expansion rate (mhc, hc) / fractions (frac); default 4")
    ap.add_argument("--static", action="store_true", help="static instead of dynamic connections")
    ap.add_argument("--seed", type=int, default=0, help="model init and data order seed (default 0)")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping (default 1.0)")
    ap.add_argument("--val-percent", type=int, default=5, help="held-out share of files (default 5)")
    ap.add_argument("--stdlib", help="corpus root (default: this interpreter's standard library)")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    ap.add_argument("--compile", action="store_true", help="torch.compile every model (default off)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: 1 in smoke mode, "
                    "else torch's choice; 1 is much faster on a CPU shared with other work)")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    args = ap.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants:
        ap.error(f"--variants: unknown {bad}; choose from {','.join(VARIANTS)}")
    return args


def config_from(args) -> dict:
    cfg = dict(MODES[args.mode])
    for key in ("steps", "batch", "seq", "d", "layers", "heads", "lr", "warmup", "eval_every",
                "eval_batches", "amp"):
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
    if args.steps is not None and args.warmup is None:
        cfg["warmup"] = min(cfg["warmup"], max(1, cfg["steps"] // 10))
    cfg["eval_every"] = max(1, min(cfg["eval_every"], cfg["steps"]))
    return cfg


def main(argv=None) -> dict:
    """Run the comparison; returns ``{"config", "corpus", "results", "plot", "table", "json"}``."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    wanted = args.threads or MODES[args.mode].get("threads")
    if wanted:
        torch.set_num_threads(wanted)
    try:
        return _main(args, argv)
    finally:
        torch.set_num_threads(threads)


def _main(args, argv) -> dict:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    cfg = config_from(args)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                          else args.device)
    amp_dtype = torch.bfloat16 if cfg["amp"] == "bf16" and device.type == "cuda" else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    train, val, corpus = load_corpus(args.stdlib, args.val_percent)
    tstarts = train_starts(len(train), cfg["steps"], cfg["batch"], cfg["seq"], args.seed)
    vstarts = val_starts(len(val), cfg["eval_batches"], cfg["batch"], cfg["seq"])
    base = build_base(cfg["d"], cfg["layers"], cfg["heads"], cfg["seq"], args.seed).to(device)
    tokens = cfg["steps"] * cfg["batch"] * cfg["seq"]
    print(f"corpus: {corpus['train_files']} train / {corpus['val_files']} validation files of "
          f"{corpus['root']} (Python {corpus['python']}), {corpus['train_tokens']:,} / "
          f"{corpus['val_tokens']:,} bytes, sha1 {corpus['sha1']}")
    print(f"model: Llama d={cfg['d']} layers={cfg['layers']} heads={cfg['heads']} seq={cfg['seq']}, "
          f"{sum(p.numel() for p in base.parameters()) / 1e6:.2f}M params; {cfg['steps']} steps x "
          f"{cfg['batch']} x {cfg['seq']} = {tokens:,} tokens per run; device {device}, "
          f"{'bf16 autocast' if amp_dtype else 'fp32'}{', torch.compile' if args.compile else ''}")

    results = []
    for variant in args.variants:
        results.append(run_variant(variant, base, train, val, tstarts, vstarts, cfg, args, device, amp_dtype))
        r = results[-1]
        print(f"{variant:>8}: step-0 val {r['step0_val_loss']:.6f}  final val {r['final_val_loss']:.4f}  "
              f"{r['tokens_per_s']:,.0f} tok/s  {r['wall_s']:.1f}s", flush=True)

    stem = f"train_lm_{args.mode}"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads)")
    title = (f"byte-level Llama d={cfg['d']} L={cfg['layers']} seq={cfg['seq']} on the Python stdlib, "
             f"{tokens / 1e6:.2f}M tokens/run, n={args.n}, seed {args.seed} ({args.mode} mode, {device_name})")
    table = markdown_table(results)
    mem_kind = results[0]["peak_mem_kind"] if results else ""
    md = "\n".join([
        f"# train_lm --mode {args.mode}",
        "",
        f"`python examples/train_lm.py {' '.join(argv) if argv is not None else ' '.join(sys.argv[1:])}`",
        "",
        f"* model: transformers Llama, d={cfg['d']}, {cfg['layers']} layers, {cfg['heads']} heads, "
        f"byte vocabulary ({VOCAB}), seq {cfg['seq']}; init seed {args.seed}, the same base for every run",
        f"* data: Python {corpus['python']} stdlib `*.py` ({corpus['train_files']} train files, "
        f"{corpus['train_tokens']:,} bytes; {corpus['val_files']} held-out files, {corpus['val_tokens']:,} "
        f"bytes; sha1 {corpus['sha1']}); validation on {cfg['eval_batches']} x {cfg['batch']} windows",
        f"* training: {cfg['steps']} steps x {cfg['batch']} x {cfg['seq']} = {tokens:,} tokens per run, AdamW "
        f"(lr {cfg['lr']}, betas 0.9/0.95, wd {args.weight_decay} on weight matrices), warm-up "
        f"{cfg['warmup']} + cosine to 10 %, clip {args.clip}",
        f"* connections: n={args.n}, {'static' if args.static else 'dynamic'}",
        f"* device: {device_name}; {'bf16 autocast' if amp_dtype else 'fp32'}"
        f"{'; torch.compile' if args.compile else ''}; torch {torch.__version__}",
        f"* final train loss = mean of the last {max(1, cfg['steps'] // 10)} steps; tokens/s excludes step 0 "
        f"and validation; peak memory = {mem_kind}",
        "",
        table,
        "",
        f"![loss curves]({stem}.png)",
        "",
    ])
    table_path, json_path, plot_path = out / f"{stem}.md", out / f"{stem}.json", out / f"{stem}.png"
    table_path.write_text(md)
    json_path.write_text(json.dumps(dict(config=cfg, args=vars(args), corpus=corpus, device=device_name,
                                         torch=torch.__version__, results=results), indent=1))
    plot(results, plot_path, title, cfg["batch"] * cfg["seq"])
    print()
    print(table)
    print(f"\nwrote {plot_path}, {table_path}, {json_path}")
    return dict(config=cfg, corpus=corpus, results=results, plot=plot_path, table=table_path, json=json_path)


if __name__ == "__main__":
    main()
