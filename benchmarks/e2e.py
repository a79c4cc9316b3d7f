"""Training step time (and peak GPU memory) of a pre-norm GPT-style stack: plain residual vs its residual
streams rewritten by ``hc_rewrite`` (mHC n=4, Frac m=4, HC n=4), and the same stack wired by hand with the
PyPI package ``hyper-connections`` (rows ``pypi-*``, :mod:`benchmarks.pypi_stacks`).

    python -m benchmarks.e2e [--out results.json]          # CUDA: d=2048, 4 layers, 8 x 1024 tokens, bf16
    python -m benchmarks.e2e --device cpu --out benchmarks/results/e2e-cpu-d256.json
                                                            # CPU: d=256, 4 layers, 4 x 256 tokens, fp32
    python -m benchmarks.e2e --tiny        # d=64, 2 layers, 2 x 32 tokens, CPU, eager: a smoke run

The stack: RMSNorm, SDPA causal attention (head dim 128), 4d GELU MLP, final RMSNorm; the loss is the
mean square of the output (no vocabulary: only the residual machinery differs between variants). AdamW
(fused on CUDA), bf16 autocast on CUDA, fp32 on CPU. ``compiled`` mode: the rewritten models (graph form)
under ``torch.compile(backend="hc_rewrite")`` (its lowering stage,
:func:`hc_rewrite.passes.pipeline.lower`, puts in the fused kernels on CUDA; on CPU Inductor compiles the
decomposed reference ops), or plain Inductor with ``--kernels off``; the residual and PyPI rows under
Inductor. Rows ``module-*``: the default (structure-preserving) form, the user's own model, under plain
``torch.compile`` (Inductor, with hc_rewrite's pre-grad lowering pass); ``module-*-static`` the same with static
coefficients only (``dynamic=False``: what the input-dependent coefficients cost), ``module-*-save`` without the
recompute tags. ``eager`` mode: no compile. Every compiled
row first checks that it computes its own eager model with the parameters moved (``compiled_check.py``).

On CUDA each row runs alone (its peak memory is its own): median of ``--steps`` steps after ``--warmup``.
On the CPU, where timings drift by +-20 % within minutes, the rows are interleaved: every round runs one
step of each row, in an order rotated each round, and the median per row is divided by the residual's
median of the same mode. Without CUDA (and without ``--device cpu`` or ``--tiny``) it prints a message and
exits 0. PyPI rows are added when the package is installed (``pip install -e ".[bench]"``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

try:
    import resource  # POSIX only: page faults per step
except ImportError:
    resource = None

import torch
import torch.nn.functional as F
from torch import nn

from hc_rewrite.variants import NAMES

from . import pypi_stacks
from .compiled_check import check_compiled


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
#: the default (structure-preserving) form: the user's model, compiled with plain ``torch.compile`` (Inductor)
MODULE_ROWS = tuple(f"module-{v}" for v in NAMES)
#: the same, compiled without hc_rewrite's recompute tags (AOTAutograd saves what its partitioner picks): the time
#: the recomputation costs, and the memory it saves (benchmarks/memory.py)
SAVE_ROWS = tuple(f"module-{v}-save" for v in NAMES)
#: the default form with static coefficients only (``dynamic=False``): what the input-dependent coefficients cost
STATIC_ROWS = tuple(f"module-{v}-static" for v in NAMES)
ROWS = (*VARIANTS, *MODULE_ROWS, *SAVE_ROWS, *STATIC_ROWS, *pypi_stacks.KINDS)
MODES = ("eager", "compiled")
#: per device: d, layers, batch, seq, warmup, steps, modes
DEFAULTS = {
    "cuda": dict(d=2048, layers=4, batch=8, seq=1024, warmup=3, steps=10, modes=["compiled"]),
    "cpu": dict(d=256, layers=4, batch=4, seq=256, warmup=2, steps=7, modes=list(MODES)),
    "tiny": dict(d=64, layers=2, batch=2, seq=32, warmup=1, steps=3, modes=["eager"]),
}


def _compile_rewritten(gm, kernels: str):
    """``(compiled module, how)`` for a rewritten GraphModule."""
    if kernels != "off":
        import hc_rewrite.backend  # noqa: F401  (registers backend="hc_rewrite")

        return torch.compile(gm, backend="hc_rewrite"), "backend=hc_rewrite"
    return torch.compile(gm), "inductor (reference ops)"


def build(row, d, layers, x, device, compile_, kernels, seed=0):
    """The model of benchmark row ``row`` on ``device``, the module holding its parameters, and how it runs."""
    torch.manual_seed(seed)
    model = GPTStack(d, layers).to(device)
    if row in pypi_stacks.KINDS:
        model = pypi_stacks.PyPIStack(model, d, row).to(device)
    if row == "residual" or row in pypi_stacks.KINDS:
        return (torch.compile(model) if compile_ else model), model, "inductor" if compile_ else "eager"
    import hc_rewrite

    if row in MODULE_ROWS or row in STATIC_ROWS:  # the user's own model, rewritten; plain torch.compile (what
        static = row in STATIC_ROWS                # torchtitan / Trainer call)
        new = hc_rewrite.rewrite(model, (x,), variant=row.removeprefix("module-").removesuffix("-static"), n=4,
                                 dynamic=not static)
        how = "inductor (default form" + (", static coefficients)" if static else ")")
        return (torch.compile(new) if compile_ else new), new, how if compile_ else "eager"
    if row in SAVE_ROWS:
        from hc_rewrite.inductor_pass import PASS

        new = hc_rewrite.rewrite(model, (x,), variant=row.removeprefix("module-").removesuffix("-save"), n=4)
        if not compile_:
            return new, new, "eager"
        compiled = torch.compile(new)
        PASS.recompute = False
        try:  # the first training call compiles forward and backward
            compiled(x).float().square().mean().backward()
        finally:
            PASS.recompute = True
        new.zero_grad(set_to_none=True)
        return compiled, new, "inductor (default form, no recompute tags)"
    gm = hc_rewrite.rewrite(model, (x,), variant=row, n=4, form="graph")
    if not compile_:
        return gm, gm, "eager"
    compiled, how = _compile_rewritten(gm, kernels)
    return compiled, gm, how


def _minor_faults() -> int:
    """Minor page faults of this process so far: a page the allocator took from the OS, touched for the first time.
    Recorded per step and row: a row whose buffers go back to the OS between steps pays the faults in its time."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


class Runner:
    """One row in one mode: its model, optimizer and training step."""

    def __init__(self, row, mode, args, x, device):
        self.row, self.mode, self.x, self.device = row, mode, x, device
        self.model, self.params_of, self.how = build(row, args.d, args.layers, x, device, mode == "compiled",
                                                     args.kernels)
        self.opt = torch.optim.AdamW(self.params_of.parameters(), lr=1e-4, fused=device == "cuda")
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda"
                         else torch.autocast("cpu", enabled=False))
        self.times: list = []
        self.faults: list = []  # minor page faults per timed step (a fault per page first touched)
        self.loss = float("nan")
        self.check_err = None
        if mode == "compiled":  # the compiled graph must be this row's own (benchmarks/compiled_check.py)
            self.check_err = check_compiled(self.model, self.params_of, x, autocast=self.autocast)

    def warm_up(self, steps: int) -> None:
        for _ in range(steps):
            self.step(False)

    def step(self, timed: bool):
        sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        f0 = _minor_faults()
        t0 = time.perf_counter()
        with self.autocast:
            loss = self.model(self.x).float().square().mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync()
        if timed:
            self.times.append((time.perf_counter() - t0) * 1e3)
            self.faults.append(_minor_faults() - f0)
        self.loss = float(loss.detach())

    def result(self) -> dict:
        return {"variant": self.row, "mode": self.mode, "compiled": self.how,
                "step_ms": statistics.median(self.times), "times_ms": [round(t, 3) for t in self.times],
                "faults_per_step": statistics.median(self.faults),
                "loss": self.loss, "params": sum(p.numel() for p in self.params_of.parameters()),
                "compiled_vs_eager": self.check_err}


def run_alone(row, mode, args, x, device) -> dict:
    """Warm-up then timed steps of one row, nothing else alive (CUDA: its peak memory is its own)."""
    r = Runner(row, mode, args, x, device)
    r.warm_up(args.warmup)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.steps):
        r.step(True)
    out = r.result()
    if device == "cuda":
        out["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    del r
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def run_interleaved(keys, args, x, device, progress=print) -> list:
    """Every ``(row, mode)`` of ``keys`` built and warmed up, then ``args.steps`` rounds of one step each, the
    order rotated every round (so slow phases of a shared machine hit every row alike)."""
    runners = []
    for row, mode in keys:
        t0 = time.perf_counter()
        r = Runner(row, mode, args, x, device)
        r.warm_up(args.warmup)
        runners.append(r)
        progress(f"  built {row:10} {mode:8} ({r.how}; warm-up {time.perf_counter() - t0:.0f} s)")
    step_rotated(runners, args.steps)
    return [r.result() for r in runners]


def step_rotated(runners, rounds: int) -> None:
    """``rounds`` rounds of one timed step of every runner, the order rotated every round (so slow phases of a
    shared machine hit every row alike)."""
    for rnd in range(rounds):
        k = rnd % len(runners)
        for r in runners[k:] + runners[:k]:
            r.step(True)


def _rows(args) -> list:
    rows = list(args.variants) if args.variants else list(VARIANTS)
    if not args.variants and not args.tiny:
        rows += list(MODULE_ROWS)
    if not args.variants and not args.tiny and pypi_stacks.available():
        rows += list(pypi_stacks.KINDS)
    if any(r in pypi_stacks.KINDS for r in rows) and not pypi_stacks.available():
        raise SystemExit('benchmarks.e2e: the pypi-* rows need the PyPI package: pip install -e ".[bench]"')
    return rows


def _machine(device) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--tiny", action="store_true", help="d=64, 2 layers, 2 x 32 tokens, CPU, eager")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: CUDA if present, else a message and exit 0")
    for name in ("d", "layers", "batch", "seq", "warmup", "steps"):
        parser.add_argument(f"--{name}", type=int, help="default: per device (module docstring)")
    parser.add_argument("--modes", nargs="+", choices=MODES, help="default: compiled on CUDA, both on CPU")
    parser.add_argument("--variants", nargs="+", choices=ROWS,
                        help="rows (default: residual, the hc_rewrite variants, and pypi-* when installed)")
    parser.add_argument("--kernels", choices=("auto", "off"), default="auto",
                        help="off: compile the rewritten models with plain Inductor (reference ops)")
    args = parser.parse_args(argv)
    if args.tiny:
        device, preset = "cpu", "tiny"
        torch.set_num_threads(1)  # tiny matrices: threads only contend
    elif args.device == "cpu" or (args.device == "cuda" and not torch.cuda.is_available()):
        if args.device == "cuda":
            raise SystemExit("benchmarks.e2e: --device cuda, but no CUDA device is visible")
        device = preset = "cpu"
    elif torch.cuda.is_available():
        device = preset = "cuda"
    else:
        print("benchmarks.e2e: no CUDA device here; nothing measured (use --device cpu for the CPU benchmark, "
              "--tiny for a smoke run).")
        return 0
    for key, value in DEFAULTS[preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    rows = _rows(args)
    keys = [(row, mode) for mode in args.modes for row in rows]
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.seq, args.d, device=device)
    results = {"device": _machine(device), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "config": {k: getattr(args, k) for k in ("d", "layers", "batch", "seq", "warmup", "steps", "tiny")}
               | {"dtype": "bf16 autocast" if device == "cuda" else "float32", "interleaved": device == "cpu"},
               "runs": []}
    if device == "cuda":
        results["runs"] = [run_alone(row, mode, args, x, device) for row, mode in keys]
    else:
        results["runs"] = run_interleaved(keys, args, x, device)
    base = {r["mode"]: r for r in results["runs"] if r["variant"] == "residual"}
    print(f"{'variant':10} {'mode':8} {'step ms':>9} {'x res':>6} {'peak GiB':>9} {'x res':>6} {'faults':>7}"
          "  compiled with")
    for r in results["runs"]:
        b = base.get(r["mode"])
        r["x_residual"] = r["step_ms"] / b["step_ms"] if b else float("nan")
        peak = r.get("peak_GiB", float("nan"))
        rel_m = peak / b["peak_GiB"] if b and "peak_GiB" in b else float("nan")
        print(f"{r['variant']:10} {r['mode']:8} {r['step_ms']:9.2f} {r['x_residual']:6.3f} {peak:9.2f} {rel_m:6.3f}"
              f" {r['faults_per_step']:7.0f}  {r['compiled']}")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
