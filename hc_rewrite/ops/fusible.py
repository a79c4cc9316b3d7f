"""The stream ops as the compiler should see them: the reference math (:mod:`hc_rewrite.ops.reference`) with its
contractions written so that Inductor fuses them instead of calling out to a library.

The reference is written for eager PyTorch: the products with the small ``[n, n]`` coefficient matrices are
batched matmuls, the dynamic coefficients of HC and Frac normalise the stream and then project it. Eager, that
is the fastest way. Under ``torch.compile`` both cost whole passes over the ``[T, n, C]`` stream: Inductor hands a
batched matmul to an external kernel it cannot fuse with its neighbours (and on the CPU it calls one for every
token's ``4 x 4`` by ``4 x C`` product), and the normalised copy is written out only for the product to read it.
Here, with the same functions of the reference and other contractions passed in:

* :func:`unrolled_matmul`: the product over ``n`` as a broadcast multiply and a sum over a dim of size ``n``.
  Inductor unrolls a reduction of at most ``unroll_reductions_threshold`` (8) elements into pointwise code, so the
  mixing of the stream fuses with the post's ``+ h_post * y`` into one pass (and its backward into one more);
* :func:`centered_ln_project`: ``layer_norm(x) @ W = rstd * (x @ W - mean * sum_rows(W))``: the product reads the
  stream itself and the two statistics come from a reduction Inductor fuses with whatever wrote the stream; the
  product's three matmuls (forward and backward) in the orientation the CPU BLAS is fastest at for a handful of
  output columns (:func:`narrow_matmul`); for HC's ``n + 2`` columns the forward product as one reduction per
  column (:func:`column_sums`), computed in the loop that computes the statistics;
* :func:`tiled_sinkhorn`: Sinkhorn-Knopp on the ``[T, n, n]`` logits laid out ``[T / 16, n, n, 16]``. Inductor
  puts the innermost dim of a buffer in its vector lanes; with ``n x n`` innermost (16 floats, each row 4) the 20
  iterations' ``exp`` and ``log`` ran one float at a time, with the tokens innermost they run 16 at a time and
  the sums over a row or column are unrolled. Tiles of 16 tokens rather than one ``[n, n, T]`` copy: Inductor
  parallelises each pass over the tiles instead of over the ``n`` rows, and the mHC training step was 3 % faster
  (``benchmarks/RESULTS.md``). On fp32 CPU logits :func:`sinkhorn` runs the C++ kernel of
  :mod:`hc_rewrite.ops.cpu_sinkhorn` instead (all iterations in registers; Inductor cannot fuse them), the tiled
  form elsewhere (fp64; GPUs, where the ``hc_fused`` kernels cover mHC's coefficients).

mHC's ``RMSNorm(vec(W)) @ phi`` applies the scale after the product already in the reference
(:func:`~hc_rewrite.ops.reference.rms_project`, also the fastest eager form); its fusible form
(:func:`narrow_rms_project`) computes the product's three matmuls in the narrow orientations too.

:data:`FUSIBLE` maps each op name of ``torch.ops.hc_rewrite`` to its fusible form, where it has one; the pass
:mod:`hc_rewrite.passes.decompose_stream_ops` puts them into the graphs the ``hc_rewrite`` backend hands to
Inductor. Every form is checked against the reference (values and gradients) on fresh random inputs in
``tests/test_fusible.py``; the number of kernels and library calls Inductor makes of them in
``tests/passes/test_decompose_stream_ops.py``.
"""
from __future__ import annotations

import torch

from ..passes.tag_stream_recompute import saved_for_backward
from ..variants.mhc import mhc_coeffs_op
from . import cpu_sinkhorn
from . import reference as ref


def unrolled_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for ``a [..., k, n]``, ``b [..., n, C]`` with a small ``n``: ``sum_j a[..., i, j] * b[..., j, :]``
    as a broadcast product summed over a size-``n`` dim (never materialised by Inductor: the sum is unrolled)."""
    return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(dim=-2)


class _NarrowProduct(torch.autograd.Function):
    """``x @ w`` for ``x [R, K]`` with many rows and ``w [K, N]`` with a handful of columns, each of the three
    products in the orientation the CPU BLAS runs fastest at such shapes: ``(w^T x^T)^T`` forward, ``dx = g w^T``
    and ``dw = (g^T x)^T`` backward (at ``[4096, 64] x [64, 9]`` the forward and ``dw`` take a third of the time of
    ``x @ w`` and ``x^T g``; written as a function, so AOTAutograd keeps these orientations in the joint graph)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        with saved_for_backward():  # a handful of floats a row: kept, never recomputed from the stream
            return (w.t() @ x.t()).t()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g = g.to(x.dtype)  # under autocast the forward product (and so g) is bf16 / fp16, the saved inputs are not
        return g @ w.t(), (g.t() @ x).t()


def narrow_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w`` (``x [..., K]``, ``w [K, N]``, ``N`` small) through :class:`_NarrowProduct`."""
    return _NarrowProduct.apply(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1])


def column_sums(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w`` as one reduction over ``K`` per column of ``w``: ``stack_j sum_k x[..., k] * w[k, j]``. Each is
    a reduction of the same shape as the row statistics of ``x``, so Inductor computes them in the loop that
    computes the statistics (and writes ``x``), instead of a library call that reads ``x`` again."""
    return torch.stack([(x * w[:, j]).sum(-1) for j in range(w.shape[1])], -1)


class _ColumnProduct(_NarrowProduct):
    """:class:`_NarrowProduct` with the forward product as :func:`column_sums` (the backward's two products stay
    library calls in the narrow orientations: as reductions over the rows Inductor made them slower)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        with saved_for_backward():
            return column_sums(x, w)


def column_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w`` (``x [..., K]``, ``w [K, N]``, ``N`` small) through :class:`_ColumnProduct`."""
    return _ColumnProduct.apply(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1])


def centered_ln_project(x: torch.Tensor, weight: torch.Tensor, matmul=narrow_matmul) -> torch.Tensor:
    """:func:`~hc_rewrite.ops.reference.ln_project` without the normalised copy of ``x``:
    ``rstd * (x @ W - mean * sum_rows(W))``, statistics over the last dim in fp32 (or more). The mean is cancelled
    after the product: the fp32 error grows with ``|mean| / std`` of a row (``tests/test_fusible.py`` bounds it)."""
    x = ref._acc(x)
    weight = ref._acc(weight)
    var, mean = torch.var_mean(x, dim=-1, unbiased=False, keepdim=True)
    return (matmul(x, weight) - mean * weight.sum(dim=0)) * torch.rsqrt(var + 1e-5)


def column_ln_project(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`centered_ln_project` with the forward product as :func:`column_sums` (HC's projection)."""
    return centered_ln_project(x, weight, matmul=column_matmul)


#: tokens per tile of :func:`tiled_sinkhorn`: one AVX-512 vector of fp32 (two AVX2 vectors)
SINKHORN_TILE = 16


def tiled_sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """:func:`~hc_rewrite.ops.reference.sinkhorn_log` of ``[..., n, n]`` logits, computed on a
    ``[tiles, n, n, SINKHORN_TILE]`` copy (the tokens innermost in tiles: Inductor's vector lanes) and handed back
    ``[..., n, n]``. The last tile is padded with zero logits (their uniform matrices are dropped), and there are
    at least two tiles: a symbolic tile count that may be 1 makes dynamo specialise on it (one more recompile)."""
    n = logits.shape[-1]
    z = logits.reshape(-1, n, n)
    tokens = z.shape[0]
    tiles = torch.sym_max((tokens + SINKHORN_TILE - 1) // SINKHORN_TILE, 2)  # never 1: no size-1 guard
    z = torch.cat([z, z.new_zeros(tiles * SINKHORN_TILE - tokens, n, n)])  # no branch: a symbolic size may be 0
    z = z.reshape(tiles, SINKHORN_TILE, n, n).permute(0, 2, 3, 1).contiguous()
    h = ref.sinkhorn_log(z, iters, dims=(2, 1)).permute(0, 3, 1, 2).reshape(tiles * SINKHORN_TILE, n, n)
    return h[:tokens].reshape(logits.shape)


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """mHC's Sinkhorn in its fastest compiled form: on fp32 CPU logits the C++ kernel
    (:mod:`hc_rewrite.ops.cpu_sinkhorn`, one pass, all iterations in registers) where it builds, else
    :func:`tiled_sinkhorn`."""
    if cpu_sinkhorn.applies(logits, iters):
        return cpu_sinkhorn.sinkhorn(logits, iters)
    return tiled_sinkhorn(logits, iters)


def narrow_rms_project(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`~hc_rewrite.ops.reference.rms_project` with its product through :func:`narrow_matmul` (mHC's
    ``[tokens, n*C] x [n*C, 2n + n*n]``: 24 columns at n=4)."""
    return ref.rms_project(x, weight, eps, matmul=narrow_matmul)


def mhc_coeffs(w, phi, alpha, b_pre, b_post, b_res, eps, iters):
    """The ``mhc_coeffs`` operator, Sinkhorn by :func:`sinkhorn`, the projection in the narrow orientations."""
    return mhc_coeffs_op(w, phi, alpha, b_pre, b_post, b_res, eps, iters, sinkhorn=sinkhorn,
                         project=narrow_rms_project)


def stream_post(w, y, h_post, h_res):
    """:func:`~hc_rewrite.ops.reference.stream_post`, the mixing unrolled."""
    return ref.stream_post(w, y, h_post, h_res, matmul=unrolled_matmul)


def frac_pre(w, y):
    """:func:`~hc_rewrite.ops.reference.frac_pre`, the mixing unrolled."""
    return ref.frac_pre(w, y, matmul=unrolled_matmul)


def hc_coeffs(w, a_m, a_r, b, w_m=None, w_r=None, w_b=None):
    """:func:`~hc_rewrite.ops.reference.hc_coeffs`, projected without the normalised copy, the forward product as
    column sums (HC's ``n + 2`` columns over ``C``: in the compiled CPU step 3 % faster than the library call;
    Frac's and mHC's projections stay library calls, the column sums were no faster there or slower)."""
    return ref.hc_coeffs(w, a_m, a_r, b, w_m, w_r, w_b, project=column_ln_project)


def frac_coeffs(w, y, a, b, w_y=None, w_a=None, w_b=None):
    """:func:`~hc_rewrite.ops.reference.frac_coeffs`, projected without the normalised copy."""
    return ref.frac_coeffs(w, y, a, b, w_y, w_a, w_b, project=centered_ln_project)


#: ``{op name: fusible implementation}`` (same arguments as the op's schema). The fraction ops return a copy as
#: operators (an operator may not alias its input); in a graph the view is enough, and a copy would be a pass.
FUSIBLE = {
    "mhc_coeffs": mhc_coeffs,
    "stream_post": stream_post,
    "frac_pre": frac_pre,
    "hc_coeffs": hc_coeffs,
    "frac_coeffs": frac_coeffs,
    "split_fractions": ref.split_fractions,
    "merge_fractions": ref.merge_fractions,
}

__all__ = ["FUSIBLE", "unrolled_matmul", "narrow_matmul", "column_sums", "column_matmul", "centered_ln_project",
           "column_ln_project", "narrow_rms_project",
           "tiled_sinkhorn", "sinkhorn"]
