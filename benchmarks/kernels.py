"""Achieved bandwidth of the fused stream kernels against the same math under plain Inductor.

    python -m benchmarks.kernels [--out results.json] [--tokens 16384] [--n 4] [--widths 2048 4096]

On a CUDA device: measures the device copy bandwidth (bytes read + written by a large tensor copy),
then, for n = 4 and each width C, the forward time of every fused op (eager call, and under
``torch.compile``, where Inductor inlines the triton kernels), its achieved GB/s over the minimum bytes
the op must move (see ``docs/kernels.md``), the same math compiled from ``hc_rewrite.ops.reference``
with plain Inductor, and, if the PyPI package ``hyper-connections`` is importable, its modules compiled
with ``torch.compile`` (whole site: pre + post). Forward + backward times are reported as well.
Without CUDA it prints a message and exits 0.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def _bench(fn, warmup=5, reps=25):
    """Median milliseconds of ``fn()`` (CUDA events, after ``warmup`` calls)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(nbytes=1 << 30):
    """Device copy bandwidth in GB/s: (read + written bytes) / time of ``dst.copy_(src)``."""
    import torch

    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src), warmup=3, reps=20)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _perturb(module, scale=0.1):
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def _cases(T, n, C, dtype):
    """Benchmark cases at one width: ``(name, bytes, fused_fn, reference_fn, inputs)``."""
    import torch

    from hc_rewrite.variants.frac import FracParams
    from hc_rewrite.variants.hc import HCParams
    from hc_rewrite.variants.mhc import MHCParams
    from hc_rewrite.ops import reference as ref

    dev, e = "cuda", torch.tensor([], dtype=dtype).element_size()
    fused = torch.ops.hc_fused
    w = torch.randn(T, n, C, device=dev, dtype=dtype)
    y = torch.randn(T, C, device=dev, dtype=dtype)
    m = _perturb(MHCParams(n, C, True, device=dev))
    mp = tuple(m.coeff_args())
    h_pre, h_post, h_res = (x.detach() for x in ref.mhc_coeffs(w, *mp))
    hc = _perturb(HCParams(n, C, True, device=dev))
    hp = tuple(hc.coeff_args())
    fr = _perturb(FracParams(n, C // n, True, device=dev))
    fp = tuple(fr.coeff_args())
    wf = w.reshape(T, n * C)[:, :C].reshape(T, n, C // n).contiguous()   # a Frac stream: d = C
    f_pre, f_post, f_res = (x.detach() for x in ref.frac_coeffs(wf, *fp))
    coeff_bytes = T * (2 * n + n * n) * 4
    E = lambda k: k * T * C * e  # noqa: E731  (k stream-widths of C elements per token)

    def mhc_site_ref(w_, y_):
        a, b, c = ref.mhc_coeffs(w_, *mp)
        return ref.stream_post(w_, ref.stream_pre(w_, a) + y_, b, c)

    def mhc_site_fused(w_, y_):
        br, _, b, c, _, _ = fused.mhc_pre.default(w_, *mp, 1e-6, 20)
        return fused.stream_post.default(w_, br + y_, b, c)

    def hc_site_ref(w_, y_):
        a, b, c = ref.hc_coeffs(w_, *hp)
        return ref.stream_post(w_, ref.stream_pre(w_, a) + y_, b, c)

    def hc_site_fused(w_, y_):
        br, _, b, c, _, _ = fused.hc_pre.default(w_, *hp)
        return fused.stream_post.default(w_, br + y_, b, c)

    def frac_site_ref(w_, y_):
        a, b, c = ref.frac_coeffs(w_, *fp)
        return ref.stream_post(w_, ref.frac_pre(w_, a) + y_, b, c)

    def frac_site_fused(w_, y_):
        br, _, b, c, _, _ = fused.frac_pre_coeffs.default(w_, *fp)
        return fused.stream_post.default(w_, br + y_, b, c)

    return [
        ("mhc_coeffs", E(n) + coeff_bytes, lambda: fused.mhc_coeffs.default(w, *mp, 1e-6, 20),
         lambda: ref.mhc_coeffs(w, *mp), "mhc"),
        ("stream_pre (mHC/HC)", E(n + 1), lambda: fused.stream_pre.default(w, h_pre),
         lambda: ref.stream_pre(w, h_pre), "mhc"),
        ("mhc_pre = coeffs + pre", E(n + 1) + coeff_bytes, lambda: fused.mhc_pre.default(w, *mp, 1e-6, 20),
         lambda: (lambda c: (ref.stream_pre(w, c[0]),) + tuple(c))(ref.mhc_coeffs(w, *mp)), "mhc"),
        ("stream_post (mHC/HC)", E(2 * n + 1), lambda: fused.stream_post.default(w, y, h_post, h_res),
         lambda: ref.stream_post(w, y, h_post, h_res), "mhc"),
        ("mhc_post_pre = post + next pre", E(2 * n + 2) + coeff_bytes,
         lambda: fused.mhc_post_pre.default(w, y, h_post, h_res, *mp, 1e-6, 20),
         lambda: (lambda w1: (w1, ref.stream_pre(w1, ref.mhc_coeffs(w1, *mp)[0])))(
             ref.stream_post(w, y, h_post, h_res)), "mhc"),
        ("site mHC (pre + post)", E(3 * n + 2), lambda: mhc_site_fused(w, y), lambda: mhc_site_ref(w, y), "mhc"),
        ("hc_pre = coeffs + pre", E(n + 1), lambda: fused.hc_pre.default(w, *hp),
         lambda: (lambda c: (ref.stream_pre(w, c[0]),) + tuple(c))(ref.hc_coeffs(w, *hp)), "hc"),
        ("site HC (pre + post)", E(3 * n + 2), lambda: hc_site_fused(w, y), lambda: hc_site_ref(w, y), "hc"),
        ("frac_pre_coeffs", E(2), lambda: fused.frac_pre_coeffs.default(wf, *fp),
         lambda: (lambda c: (ref.frac_pre(wf, c[0]),) + tuple(c))(ref.frac_coeffs(wf, *fp)), "frac"),
        ("stream_post (Frac)", E(3), lambda: fused.stream_post.default(wf, y, f_post, f_res),
         lambda: ref.stream_post(wf, y, f_post, f_res), "frac"),
        ("site Frac (pre + post)", E(5), lambda: frac_site_fused(wf, y), lambda: frac_site_ref(wf, y), "frac"),
    ], (w, y, wf)


def _package_sites(T, n, C, dtype):
    """Whole-site forward of the PyPI ``hyper-connections`` modules (compiled), or ``{}``."""
    import torch

    try:
        import hyper_connections as hcpkg
    except ImportError:
        return {}
    out = {}
    makers = {"mhc": lambda: hcpkg.mc_get_init_and_expand_reduce_stream_functions(n),
              "hc": lambda: hcpkg.get_init_and_expand_reduce_stream_functions(n),
              "frac": lambda: hcpkg.get_init_and_expand_reduce_stream_functions(1, num_fracs=n)}
    x = torch.randn(T // 1024, 1024, C, device="cuda", dtype=dtype)
    for variant, make in makers.items():
        try:
            init, expand, _reduce = make()
            hyper = init(dim=C).to("cuda", dtype)
            stream = expand(x)

            def site(s=stream, h=hyper):
                branch_in, add_residual = h(s)
                return add_residual(branch_in)

            f = torch.compile(site)
            out[variant] = {"fwd_ms": _bench(f)}
        except Exception as exc:  # an API change in the package must not stop the benchmark
            out[variant] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return out


def _fwd_bwd(fn, inputs):
    """A closure running ``fn`` and a backward through all its floating outputs w.r.t. ``inputs``."""
    import torch

    def run():
        outs = fn()
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        outs = [o for o in outs if o is not None and o.numel() and o.requires_grad]
        torch.autograd.grad(outs, inputs, [torch.ones_like(o) for o in outs], allow_unused=True)
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--widths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--no-backward", action="store_true", help="forward timings only")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("benchmarks.kernels: no CUDA device here; nothing measured (the kernels need a GPU).")
        return 0
    from hc_rewrite import kernels

    if not kernels.fused_ops():
        print("benchmarks.kernels: triton is not importable; nothing measured (pip install triton).")
        return 0
    dtype = torch.bfloat16
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bf16",
               "tokens": args.tokens, "n": args.n, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
               "copy_GBps": copy_bandwidth(), "cases": []}
    bw = results["copy_GBps"]
    print(f"{results['device']}: copy bandwidth {bw:.0f} GB/s (read + write), torch {torch.__version__}")
    header = (f"{'C':>5} {'op':32} {'MB':>7} {'fused ms':>9} {'compiled':>9} {'GB/s':>7} {'%copy':>6} "
              f"{'inductor':>9} {'GB/s':>7} {'fwd+bwd fused':>14} {'inductor':>9}")
    print(header)
    for C in args.widths:
        cases, tensors = _cases(args.tokens, args.n, C, dtype)
        pkg = _package_sites(args.tokens, args.n, C, dtype)
        for name, nbytes, fused_fn, ref_fn, variant in cases:
            torch.compiler.reset()
            row = {"C": C, "op": name, "variant": variant, "bytes": nbytes}
            with torch.no_grad():
                row["fused_eager_ms"] = _bench(fused_fn)
                row["fused_compiled_ms"] = _bench(torch.compile(fused_fn))
                row["inductor_ms"] = _bench(torch.compile(ref_fn))
            if not args.no_backward:
                w, y, wf = tensors
                ins = [t.requires_grad_() for t in (w, y, wf)]
                row["fused_fwd_bwd_ms"] = _bench(torch.compile(_fwd_bwd(fused_fn, ins)))
                row["inductor_fwd_bwd_ms"] = _bench(torch.compile(_fwd_bwd(ref_fn, ins)))
                for t in ins:
                    t.requires_grad_(False)
            if name.startswith("site") and variant in pkg:
                row["hyper_connections"] = pkg[variant]
            gbps = lambda ms: nbytes / (ms * 1e-3) / 1e9  # noqa: E731
            row["fused_GBps"] = gbps(row["fused_compiled_ms"])
            row["inductor_GBps"] = gbps(row["inductor_ms"])
            results["cases"].append(row)
            print(f"{C:>5} {name:32} {nbytes / 1e6:7.1f} {row['fused_eager_ms']:9.3f} "
                  f"{row['fused_compiled_ms']:9.3f} {row['fused_GBps']:7.0f} {100 * row['fused_GBps'] / bw:5.0f}% "
                  f"{row['inductor_ms']:9.3f} {row['inductor_GBps']:7.0f} "
                  f"{row.get('fused_fwd_bwd_ms', float('nan')):14.3f} {row.get('inductor_fwd_bwd_ms', float('nan')):9.3f}"
                  + (f"  hyper-connections: {pkg[variant]}" if 'hyper_connections' in row else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
