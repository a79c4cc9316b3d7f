"""Training step time and peak memory of a pre-norm GPT-style stack: plain residual vs its residual
streams rewritten by ``hc_rewrite`` (mHC n=4, Frac m=4, HC n=4).

    python -m benchmarks.e2e [--out results.json] [--d 2048 --layers 4 --batch 8 --seq 1024]
    python -m benchmarks.e2e --tiny        # d=64, 2 layers, 2 x 32 tokens, CPU, no compile: a smoke run

The stack: RMSNorm, SDPA causal attention (head dim 128), 4d GELU MLP, final RMSNorm; the loss is the
mean square of the output (no vocabulary: only the residual machinery differs between variants). Fused
AdamW, bf16 autocast, everything under ``torch.compile``: the rewritten models with
``backend="hc_rewrite"`` (its lowering stage, :func:`hc_rewrite.passes.pipeline.lower`, puts in the fused
kernels), or plain Inductor with ``--kernels off``. Step time: median of ``--steps`` steps after ``--warmup``
steps. Without CUDA (and without ``--tiny``) it prints a message and exits 0.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from hc_rewrite.variants import NAMES


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.heads = max(1, d // 128)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).transpose(1, 3).unbind(2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(o.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.attn = Attention(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d, bias=False), nn.GELU(), nn.Linear(4 * d, d, bias=False))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPTStack(nn.Module):
    def __init__(self, d, layers):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.norm = nn.RMSNorm(d)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


VARIANTS = ("residual", *NAMES)


def _compile_rewritten(gm, kernels: str):
    """``(compiled module, how)`` for a rewritten GraphModule."""
    if kernels != "off":
        import hc_rewrite.backend  # noqa: F401  (registers backend="hc_rewrite")

        return torch.compile(gm, backend="hc_rewrite"), "backend=hc_rewrite"
    return torch.compile(gm), "inductor (reference ops)"


def build(variant, d, layers, x, device, compile_, kernels, seed=0):
    """The model of ``variant`` on ``device`` and a description of how it is compiled."""
    torch.manual_seed(seed)
    model = GPTStack(d, layers).to(device)
    if variant == "residual":
        return (torch.compile(model) if compile_ else model), model, "inductor" if compile_ else "eager"
    import hc_rewrite

    gm = hc_rewrite.rewrite(model, (x,), variant=variant, n=4, form="graph")
    if not compile_:
        return gm, gm, "eager"
    compiled, how = _compile_rewritten(gm, kernels)
    return compiled, gm, how


def run_variant(variant, args, device):
    x = torch.randn(args.batch, args.seq, args.d, device=device)
    model, params_of, how = build(variant, args.d, args.layers, x, device, not args.tiny, args.kernels)
    opt = torch.optim.AdamW(params_of.parameters(), lr=1e-4, fused=device == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            loss = model(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    out = {"variant": variant, "compiled": how, "step_ms": statistics.median(times), "loss": float(loss.detach()),
           "params": sum(p.numel() for p in params_of.parameters())}
    if device == "cuda":
        out["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    del model, params_of, opt
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--tiny", action="store_true", help="d=64, 2 layers, 2 x 32 tokens, CPU, eager")
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--kernels", choices=("auto", "off"), default="auto",
                        help="off: compile the rewritten models with plain Inductor (reference ops)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.d, args.layers, args.batch, args.seq, args.warmup, args.steps = 64, 2, 2, 32, 1, 3
        device = "cpu"
        torch.set_num_threads(1)  # tiny matrices: threads only contend
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        print("benchmarks.e2e: no CUDA device here; nothing measured (use --tiny for a CPU smoke run).")
        return 0
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
               "config": {k: getattr(args, k) for k in ("d", "layers", "batch", "seq", "warmup", "steps", "tiny")},
               "runs": []}
    print(f"{'variant':10} {'step ms':>9} {'x res':>6} {'peak GiB':>9} {'x res':>6}  compiled with")
    base = None
    for variant in args.variants:
        r = run_variant(variant, args, device)
        results["runs"].append(r)
        if variant == "residual":
            base = r
        rel_t = r["step_ms"] / base["step_ms"] if base else float("nan")
        peak = r.get("peak_GiB", float("nan"))
        rel_m = peak / base["peak_GiB"] if base and "peak_GiB" in base else float("nan")
        print(f"{variant:10} {r['step_ms']:9.2f} {rel_t:6.3f} {peak:9.2f} {rel_m:6.3f}  {r['compiled']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
