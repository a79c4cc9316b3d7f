"""Compile every kernel configuration the fused ops launch, ahead of time, for a GPU architecture —
on any machine, no GPU needed (triton's own compiler and ``ptxas``), and report registers, spills and
shared memory per kernel.

    python -m hc_rewrite.kernels.aot_check [--arch 90 80] [--n 4] [--width 2048]

The ops are run on small CPU tensors with the launches recorded instead of executed (outputs are then
garbage, which does not matter: only the argument types and constexprs are kept), and each distinct
launch is compiled with ``triton.compile`` for ``cuda:<arch>``. This catches what the CPU interpreter
cannot: type and layout errors of the real compiler, unsupported ops, register spills. It does not run
anything, so correctness on the GPU is still for the GPU tests.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
          torch.int64: "i64", torch.int32: "i32"}


class _Recorder:
    def __init__(self):
        self.launches = {}

    def wrap(self, kernel):
        rec = self

        class _Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    names = kernel.arg_names
                    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
                    sig, const = {}, {}
                    for name, value in list(zip(names, args)) + list(kwargs.items()):
                        if name in kwargs and name not in names[:len(args)]:
                            const[name] = value
                            sig[name] = "constexpr"
                        elif isinstance(value, torch.Tensor):
                            sig[name] = "*" + _TYPES[value.dtype]
                        elif isinstance(value, bool):
                            sig[name] = "i1"
                        elif isinstance(value, int):
                            sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
                        else:
                            sig[name] = "fp32"
                    key = (kernel.fn.__name__, tuple(sorted(sig.items())), tuple(sorted(const.items())),
                           tuple(sorted(options.items())))
                    rec.launches[key] = (kernel, sig, const, options)
                return launch
        return _Grid()


def record_launches(n=4, C=256, dtypes=(torch.bfloat16, torch.float32)):
    """Run every fused op (forward and backward) with launches recorded; returns the distinct launches."""
    from hc_rewrite import kernels
    from hc_rewrite.variants.frac import FracParams
    from hc_rewrite.variants.hc import HCParams
    from hc_rewrite.variants.mhc import MHCParams

    if kernels._load() is None:
        raise SystemExit("triton is not importable")
    from . import mix, proj

    rec = _Recorder()
    mods = (*kernels._load(), mix, proj)
    saved = [(m, getattr(m, "wrap_triton", None), getattr(m, "use_triton", None)) for m in mods]
    try:
        for m, wt, ut in saved:
            if wt is not None:
                m.wrap_triton = rec.wrap
            if ut is not None:
                m.use_triton = lambda *t: True
        fused = torch.ops.hc_fused
        T = 8
        for dt in dtypes:
            w = torch.randn(T, n, C, dtype=dt, requires_grad=True)
            y = torch.randn(T, C, dtype=dt, requires_grad=True)
            yf = torch.randn(T, n * C, dtype=dt, requires_grad=True)
            hp, hr = torch.rand(T, n, requires_grad=True), torch.rand(T, n, n, requires_grad=True)
            outs = []
            for has_res in (True, False):
                s = MHCParams(n, C, True, has_res=has_res)
                ps = (s.phi, s.alpha, s.b_pre, s.b_post, s.b_res)
                outs += list(fused.mhc_coeffs.default(w, *ps, 1e-6, 20))
                outs += list(fused.mhc_pre.default(w, *ps, 1e-6, 20)[:4])
                outs += list(fused.mhc_post_pre.default(w, y, hp, hr, *ps, 1e-6, 20)[:5])
                outs += list(fused.mhc_post_pre.default(w, y, hp, None, *ps, 1e-6, 20)[:5])
            h = HCParams(n, C, True)
            hps = (h.a_m, h.a_r, h.b, h.w_m, h.w_r, h.w_b)
            outs += list(fused.hc_coeffs.default(w, *hps)) + list(fused.hc_pre.default(w, *hps)[:4])
            f = FracParams(n, C, True)
            fps = (f.y, f.a, f.b, f.w_y, f.w_a, f.w_b)
            outs += list(fused.frac_coeffs.default(w, *fps)) + list(fused.frac_pre_coeffs.default(w, *fps)[:4])
            outs += [fused.stream_post.default(w, y, hp, hr), fused.stream_post.default(w, y, hp, None),
                     fused.stream_post.default(w, yf, hp, hr), fused.stream_post.default(w, y, hp[0], hr[0]),
                     fused.stream_pre.default(w, hp), fused.frac_pre.default(w, hr)]
            outs = [o for o in outs if o.numel() and o.requires_grad]
            leaves = [w, y, yf, hp, hr]
            torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs], allow_unused=True)
    finally:
        for m, wt, ut in saved:
            if wt is not None:
                m.wrap_triton = wt
            if ut is not None:
                m.use_triton = ut
    return list(rec.launches.values())


def compile_launch(kernel, sig, const, options, arch: int):
    """``triton.compile`` one launch for ``cuda:<arch>``; returns ``(seconds, ptxas -v summary)``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    t0 = time.time()
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(options))
    seconds = time.time() - t0
    return seconds, _ptxas_stats(compiled.asm["ptx"], arch), compiled.metadata.num_warps


def _ptxas_stats(ptx: str, arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(arch).path
    except TypeError:  # older triton: get_ptxas() takes no architecture
        ptxas = get_ptxas().path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}", src, "-o",
                               os.path.join(d, "k.o")], capture_output=True, text=True)
    log = proc.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    smem = re.search(r"(\d+) bytes smem", log)
    return (f"{regs.group(1) if regs else '?'} regs, {spill.group(1) if spill else '?'} B spill stores, "
            f"{smem.group(1) if smem else '0'} B static smem")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90])
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    args = parser.parse_args(argv)
    launches = record_launches(args.n, args.width)
    print(f"{len(launches)} distinct kernel launches (n={args.n}, C={args.width}, bf16 and fp32)")
    failed = 0
    for arch in args.arch:
        for kernel, sig, const, options in launches:
            flags = ",".join(f"{k}={v}" for k, v in sorted(const.items()) if v is not False)
            dt = sig.get("w_ptr", sig.get("x_ptr", ""))
            try:
                sec, stats, warps = compile_launch(kernel, sig, const, options, arch)
                print(f"sm_{arch} {kernel.fn.__name__:18} {dt:6} {flags:70} ok {sec:5.1f}s  {warps} warps  {stats}")
            except Exception as exc:  # report every failure, not only the first
                failed += 1
                print(f"sm_{arch} {kernel.fn.__name__:18} {dt:6} {flags:70} FAILED: {type(exc).__name__}: {exc}"[:2000])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
