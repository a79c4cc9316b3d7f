"""Sinkhorn-Knopp as one C++ kernel on the CPU: ``torch.ops.hc_cpu.sinkhorn`` and its backward.

What :func:`hc_rewrite.ops.reference.sinkhorn_log` computes on ``[..., n, n]`` fp32 logits (20 log-space iterations,
each a row then a column ``z <- z - logsumexp(z)``, then ``exp``), in one pass over the tokens: every tile of
``Vectorized<float>::size()`` tokens is loaded once with the tokens as the vector lanes, and all iterations run in
registers. While every entry of a tile lies within ``e^30`` of its row's maximum, the iterations run on scalings
of ``K = exp(z - rowmax)`` (``r <- 1 / (K c)``, ``c <- 1 / (K^T r)``: the same matrices up to rounding, one ``exp``
per entry in all); otherwise in log space. The backward kernel recomputes its tile's iterations and runs them
backwards: per half-step ``g <- g - s * sum(g)`` along the same row or column, ``s`` the matrix after that step.
The output is laid out ``[n * n, tokens]`` (entries major), as the narrow projection hands the logits over.

Why a kernel of our own: Inductor cannot fuse the iterations. Each row or column statistic is a buffer of another
shape than the matrix, so every pass of every iteration is its own parallel loop (an ``omp for`` with its barrier,
about 100 in one forward kernel), and the forward is recomputed in backward. At 1024 tokens, n = 4, the compiled
forward and backward of :func:`hc_rewrite.ops.fusible.tiled_sinkhorn` took 1.3-2.1 ms on the 2-core CPU, these
kernels 0.11 ms (``docs/kernels.md``, item 6).

The source is built with Inductor's own C++ toolchain (``CppPythonBindingsCodeCache``: the compiler, flags and vector
ISA Inductor uses for its CPU kernels, cached on disk), once per ``(n, iters)``. :func:`available` says whether that
worked; :func:`hc_rewrite.ops.fusible.sinkhorn` uses the kernel only then (and only for fp32 CPU logits), else the
tiled form, with a warning that says why. The ops have CPU kernels only; on other dtypes they run the reference.
"""
from __future__ import annotations

import functools
import warnings

import torch

from ..passes.tag_stream_recompute import saved_for_backward
from . import reference as ref

_SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <algorithm>
#include <cstring>
#include <limits>

namespace {
using Vec = at::vec::Vectorized<float>;
constexpr int N = @N@;
constexpr int NN = N * N;
constexpr int K = @ITERS@;
constexpr int64_t L = Vec::size();
constexpr float LINEAR_RANGE = 30.f;  // e^-30: far from fp32's underflow, whatever the scalings reach

inline int entry(bool col, int a, int b) { return col ? b * N + a : a * N + b; }

// torch.logsumexp: a max of +-inf counts as 0
inline Vec finite_or_zero(Vec m) {
    return Vec::blendv(m, Vec(0.f), m.abs() == Vec(std::numeric_limits<float>::infinity()));
}

// one half-step z <- z - logsumexp(z) along every row (COL false) or column (COL true); KEEP: s <- exp(result)
template <bool COL, bool KEEP>
inline void half_step(Vec* z, Vec* s) {
    for (int a = 0; a < N; ++a) {
        Vec m = z[entry(COL, a, 0)];
        for (int b = 1; b < N; ++b) m = at::vec::maximum(m, z[entry(COL, a, b)]);
        m = finite_or_zero(m);
        Vec e[N];
        Vec sum(0.f);
        for (int b = 0; b < N; ++b) { e[b] = (z[entry(COL, a, b)] - m).exp(); sum = sum + e[b]; }
        const Vec lse = m + sum.log();
        for (int b = 0; b < N; ++b) z[entry(COL, a, b)] = z[entry(COL, a, b)] - lse;
        if (KEEP) {
            const Vec r = Vec(1.f) / sum;
            for (int b = 0; b < N; ++b) s[entry(COL, a, b)] = e[b] * r;
        }
    }
}

// tokens [t0, t0 + count) into NN vectors, one lane per token (zeros past count); entry e of token t is at
// src[t * ts + e * es]: tokens adjacent (ts == 1, the layout the projection hands over) load as vectors
inline void load_tile(const float* src, int64_t ts, int64_t es, int64_t t0, int64_t count, Vec* v) {
    if (ts == 1) {
        for (int e = 0; e < NN; ++e)
            v[e] = count == L ? Vec::loadu(src + e * es + t0) : Vec::loadu(src + e * es + t0, count);
        return;
    }
    alignas(64) float buf[NN][L];
    for (int64_t k = 0; k < L; ++k)
        for (int e = 0; e < NN; ++e) buf[e][k] = k < count ? src[(t0 + k) * ts + e * es] : 0.f;
    for (int e = 0; e < NN; ++e) v[e] = Vec::loadu(buf[e]);
}

// into dst [NN, tokens] (entries major: every store a vector)
inline void store_tile(const Vec* v, int64_t t0, int64_t count, int64_t tokens, float* dst) {
    for (int e = 0; e < NN; ++e) {
        if (count == L) v[e].store(dst + e * tokens + t0);
        else v[e].store(dst + e * tokens + t0, count);
    }
}

// exp(z - rowmax) of every entry; true when every lane's entries lie within LINEAR_RANGE of their row's max
// (then the iterations run as scalings of this matrix without underflow; NaN and -inf fail the test)
inline bool scaled_exp(const Vec* z, Vec* kmat) {
    Vec ok(0.f);
    bool first = true;
    for (int i = 0; i < N; ++i) {
        Vec m = z[i * N];
        for (int j = 1; j < N; ++j) m = at::vec::maximum(m, z[i * N + j]);
        for (int j = 0; j < N; ++j) {
            const Vec d = z[i * N + j] - m;
            const Vec in = d >= Vec(-LINEAR_RANGE);
            ok = first ? in : (ok & in);
            first = false;
            kmat[i * N + j] = d.exp();
        }
    }
    alignas(64) int32_t bits[L];
    std::memcpy(bits, &ok, sizeof(bits));
    for (int64_t k = 0; k < L; ++k)
        if (bits[k] == 0) return false;
    return true;
}

// Linear form of the iterations: P = diag(r) K diag(c), K = exp(z - rowmax). A row step is r <- 1 / (K c), a
// column step c <- 1 / (K^T r): the same matrices as the log form (exactly, up to rounding) while nothing
// underflows. r[t], c[t]: the scalings after iteration t's row and column steps.
inline void linear_iterations(const Vec* kmat, Vec (*r)[N], Vec (*c)[N]) {
    for (int t = 0; t < K; ++t) {
        for (int i = 0; i < N; ++i) {
            Vec sum(0.f);
            for (int j = 0; j < N; ++j)
                sum = t ? at::vec::fmadd(kmat[i * N + j], c[t - 1][j], sum) : sum + kmat[i * N + j];
            r[t][i] = Vec(1.f) / sum;
        }
        for (int j = 0; j < N; ++j) {
            Vec sum(0.f);
            for (int i = 0; i < N; ++i) sum = at::vec::fmadd(kmat[i * N + j], r[t][i], sum);
            c[t][j] = Vec(1.f) / sum;
        }
    }
}

// backward through the column step (COL) or row step of one iteration: g <- g - s * (sum of g along it)
template <bool COL>
inline void step_back(Vec* g, const Vec* s) {
    for (int a = 0; a < N; ++a) {
        Vec total(0.f);
        for (int b = 0; b < N; ++b) total = total + g[entry(COL, a, b)];
        for (int b = 0; b < N; ++b) g[entry(COL, a, b)] = g[entry(COL, a, b)] - s[entry(COL, a, b)] * total;
    }
}

inline void forward_tile(Vec* z) {
    Vec kmat[NN];
    if (scaled_exp(z, kmat)) {
        Vec r[K][N], c[K][N];
        linear_iterations(kmat, r, c);
        for (int i = 0; i < N; ++i)
            for (int j = 0; j < N; ++j) z[i * N + j] = kmat[i * N + j] * r[K - 1][i] * c[K - 1][j];
        return;
    }
    for (int k = 0; k < K; ++k) { half_step<false, false>(z, nullptr); half_step<true, false>(z, nullptr); }
    for (int e = 0; e < NN; ++e) z[e] = z[e].exp();
}

// z: the logits, g: the output's gradient, in place the logits' gradient
inline void backward_tile(Vec* z, Vec* g) {
    Vec kmat[NN], s[NN];
    if (scaled_exp(z, kmat)) {
        Vec r[K][N], c[K][N];
        linear_iterations(kmat, r, c);
        for (int t = K - 1; t >= 0; --t) {
            for (int i = 0; i < N; ++i)  // the matrix after iteration t's column step
                for (int j = 0; j < N; ++j) s[i * N + j] = kmat[i * N + j] * r[t][i] * c[t][j];
            if (t == K - 1)
                for (int e = 0; e < NN; ++e) g[e] = g[e] * s[e];  // through the output (the same matrix)
            step_back<true>(g, s);
            for (int i = 0; i < N; ++i)  // after its row step
                for (int j = 0; j < N; ++j)
                    s[i * N + j] = t ? kmat[i * N + j] * r[t][i] * c[t - 1][j] : kmat[i * N + j] * r[t][i];
            step_back<false>(g, s);
        }
        return;
    }
    Vec (*keep)[NN] = new Vec[2 * K][NN];
    for (int k = 0; k < K; ++k) { half_step<false, true>(z, keep[2 * k]); half_step<true, true>(z, keep[2 * k + 1]); }
    for (int e = 0; e < NN; ++e) g[e] = g[e] * z[e].exp();  // through the final exp
    for (int k = K - 1; k >= 0; --k) { step_back<true>(g, keep[2 * k + 1]); step_back<false>(g, keep[2 * k]); }
    delete[] keep;
}
}  // namespace

// backward == 0: out = sinkhorn(logits); else out = the gradient of the logits given grad, the output's.
// logits, grad: [tokens, NN] with strides (lt, le), (gt, ge); out: [NN, tokens] contiguous
extern "C" void kernel(const float* logits, int64_t lt, int64_t le, const float* grad, int64_t gt, int64_t ge,
                       float* out, int64_t tokens, int64_t backward) {
    const int64_t tiles = (tokens + L - 1) / L;
    #pragma omp parallel for
    for (int64_t t = 0; t < tiles; ++t) {
        const int64_t t0 = t * L, count = std::min<int64_t>(L, tokens - t0);
        Vec z[NN];
        load_tile(logits, lt, le, t0, count, z);
        if (!backward) {
            forward_tile(z);
            store_tile(z, t0, count, tokens, out);
        } else {
            Vec g[NN];
            load_tile(grad, gt, ge, t0, count, g);
            backward_tile(z, g);
            store_tile(g, t0, count, tokens, out);
        }
    }
}
"""

_ARGTYPES = ["const float*", "int64_t", "int64_t", "const float*", "int64_t", "int64_t", "float*", "int64_t", "int64_t"]


@functools.lru_cache(maxsize=None)
def _kernel(n: int, iters: int):
    """The built kernel for ``[.., n, n]`` logits and ``iters`` iterations (Inductor's C++ code cache)."""
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    source = _SOURCE.replace("@N@", str(n)).replace("@ITERS@", str(iters))
    return CppPythonBindingsCodeCache.load_pybinding(_ARGTYPES, source)


@functools.lru_cache(maxsize=None)
def available(n: int = 4, iters: int = ref.SINKHORN_ITERS) -> bool:
    """Whether the kernel for ``n`` and ``iters`` builds here (once per process; on failure a warning says why, and
    the compiled mHC coefficients keep Inductor's tiled Sinkhorn: the same values, slower)."""
    try:
        _kernel(n, iters)
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the tiled form
        warnings.warn(f"hc_rewrite: the CPU Sinkhorn kernel could not be built ({type(exc).__name__}: {exc}); "
                      "compiled mHC runs Inductor's tiled Sinkhorn instead (same values, slower)", stacklevel=2)
        return False
    return True


def _uses_kernel(*tensors) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def applies(logits: torch.Tensor, iters) -> bool:
    """Whether :func:`sinkhorn` runs the kernel on these logits: fp32 on the CPU, and the kernel builds (the one for
    this ``n`` and ``iters``; the default one where a trace holds them as symbols, which it must not specialise)."""
    n = logits.shape[-1]
    key = (n, iters) if type(n) is int and type(iters) is int else ()
    return _uses_kernel(logits) and available(*key)


def _output_strides(shape) -> tuple:
    """Strides of an output ``[..., n, n]`` laid out ``[n * n, tokens]`` (entries major: the layout the kernel
    writes with vector stores, and the one the projection hands over, so Inductor's next kernels read it as well)."""
    n = shape[-1]
    tokens = 1
    lead = []
    for size in reversed(shape[:-2]):
        lead.append(tokens)
        tokens *= size
    return (*reversed(lead), n * tokens, tokens)


def _new_output(like: torch.Tensor) -> torch.Tensor:
    """An uninitialised output of ``like``'s shape, dtype and device, laid out by :func:`_output_strides`."""
    return like.new_empty_strided(like.shape, _output_strides(like.shape))


def _token_strides(t: torch.Tensor) -> tuple | None:
    """``(token stride, entry stride)`` when ``t [..., n, n]`` is a ``[tokens, n * n]`` matrix with two strides
    (the leading dims collapse into one, the ``n x n`` into another), else ``None``."""
    shape, stride = t.shape, t.stride()
    n = shape[-1]
    if n > 1 and stride[-2] != n * stride[-1]:
        return None
    token = None
    for size, st in zip(reversed(shape[:-2]), reversed(stride[:-2])):
        if size == 1:
            continue
        if token is not None and st != token[0] * token[1]:
            return None
        token = (st, size) if token is None else (token[0], token[1] * size)
    return (token[0] if token else 0, stride[-1])


def _as_matrix(t: torch.Tensor) -> tuple:
    """``t`` and its :func:`_token_strides`; a contiguous copy where its layout has no such two strides."""
    strides = _token_strides(t)
    if strides is None:
        t = t.contiguous()
        strides = _token_strides(t)
    return t, strides


def _run(logits: torch.Tensor, grad: torch.Tensor | None, iters: int) -> torch.Tensor:
    """The kernel, on as few torch calls as can be (each costs tens of microseconds when the caches are cold, as
    they are between a training step's big matmuls)."""
    n = logits.shape[-1]
    backward = grad is not None
    logits, ls = _as_matrix(logits)
    grad, gs = _as_matrix(grad) if backward else (logits, ls)
    out = _new_output(logits)
    tokens = logits.numel() // (n * n)
    if tokens:
        _kernel(n, iters)(logits, *ls, grad, *gs, out, tokens, int(backward))
    return out


lib = torch.library.Library("hc_cpu", "DEF")
lib.define("sinkhorn(Tensor logits, int iters) -> Tensor")
lib.define("sinkhorn_backward(Tensor logits, Tensor grad, int iters) -> Tensor")


def _sinkhorn_cpu(logits: torch.Tensor, iters: int) -> torch.Tensor:
    if _uses_kernel(logits):
        return _run(logits, None, iters)
    return _new_output(logits).copy_(ref.sinkhorn_log(logits, iters))


def _sinkhorn_backward_cpu(logits: torch.Tensor, grad: torch.Tensor, iters: int) -> torch.Tensor:
    if _uses_kernel(logits, grad):
        return _run(logits, grad, iters)
    with torch.enable_grad():
        z = logits.detach().requires_grad_(True)
        got = torch.autograd.grad(ref.sinkhorn_log(z, iters), z, grad)[0]
    return _new_output(logits).copy_(got)


lib.impl("sinkhorn", _sinkhorn_cpu, "CPU")
lib.impl("sinkhorn_backward", _sinkhorn_backward_cpu, "CPU")


@torch.library.register_fake("hc_cpu::sinkhorn", lib=lib)
def _fake_sinkhorn(logits, iters):
    return _new_output(logits)


@torch.library.register_fake("hc_cpu::sinkhorn_backward", lib=lib)
def _fake_sinkhorn_backward(logits, grad, iters):
    return _new_output(logits)


class _Sinkhorn(torch.autograd.Function):
    """Autograd of the two ops, as a function: AOTAutograd traces it into the joint graph as the forward and the
    backward op (the ops themselves carry no autograd kernel: nothing of Python between them at run time)."""

    @staticmethod
    def forward(ctx, logits, iters):
        ctx.save_for_backward(logits)
        ctx.iters = iters
        with saved_for_backward():
            return torch.ops.hc_cpu.sinkhorn(logits, iters)

    @staticmethod
    def backward(ctx, grad):
        (logits,) = ctx.saved_tensors
        return torch.ops.hc_cpu.sinkhorn_backward(logits, grad, ctx.iters), None


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """:func:`~hc_rewrite.ops.reference.sinkhorn_log` of ``[..., n, n]`` CPU logits (the kernel on fp32, the
    reference on other dtypes), differentiable."""
    return _Sinkhorn.apply(logits, iters)


__all__ = ["applies", "available", "sinkhorn"]
