"""The math of every connection variant, once, in plain PyTorch.

Shapes: a widened stream ``W`` is ``[..., n, C]``: ``n`` copies of a ``C``-wide residual stream for
mHC and HC, or ``m`` fractions of width ``C = d / m`` for Frac-connections. Coefficients are per token
(leading dims ``...``) when dynamic, or plain parameters broadcast over tokens when static.

Convention for every variant: a site computes coefficients ``(h_pre, h_post, h_res)`` from its input
stream, then

    branch_in = pre(W, h_pre)                                   # what the block F reads
    W_next[i] = sum_j h_res[i, j] * W[j] + h_post[i] * y[i]     # y = F(branch_in), split for Frac

Everything else in the package (graph passes, fused kernels, ONNX export) calls these functions or is
checked against them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Sinkhorn-Knopp iterations for the mHC residual mixing matrix (DeepSeek mHC, arXiv 2512.24880).
SINKHORN_ITERS = 20
#: Fixed scale of the tanh-gated dynamic terms of HC (arXiv 2409.19606) and Frac (arXiv 2503.14125).
DYNAMIC_SCALE = 0.01


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Accumulation precision: at least fp32 (bf16 / fp16 promoted), fp64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ----------------------------------------------------------------------------- stream ends
def pair_pattern(n: int) -> list[float]:
    """``[+1, -1, +1, -1, ..., (0)]``: copies ``2k`` and ``2k+1`` form a pair of opposite signs (a lone
    last copy, for odd ``n``, gets 0). Zero sum. Used for the deviations between copies that an mHC
    init creates (expansion spread, ``H_post`` biases): every deviation lies in the span of the pair
    differences ``e_2k - e_2k+1``."""
    v = [0.0] * n
    for k in range(n // 2):
        v[2 * k], v[2 * k + 1] = 1.0, -1.0
    return v


def pair_contrast(n: int) -> list[float]:
    """A zero-sum vector that is constant on every pair of :func:`pair_pattern` (so orthogonal to every
    pair difference), normalised to max 1; all zeros for ``n <= 2``, where no such vector exists.
    Pairs alternate in sign, the lone copy of odd ``n`` starts at 0, then the mean is removed."""
    v = [(1.0 if (i // 2) % 2 == 0 else -1.0) if i < 2 * (n // 2) else 0.0 for i in range(n)]
    mean = sum(v) / n
    v = [x - mean for x in v]
    top = max(abs(x) for x in v)
    return [0.0] * n if top < 1e-12 else [x / top for x in v]


def expand_stream(x: torch.Tensor, n: int, spread: float = 0.0) -> torch.Tensor:
    """``[..., C] -> [..., n, C]``: ``n`` copies of ``x`` (mHC / HC), copy ``i`` scaled by
    ``1 + spread * pair_pattern(n)[i]``. ``spread = 0``: identical copies. Any spread keeps the mean of
    the copies equal to ``x``."""
    if spread == 0.0:
        return x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1]).contiguous()
    return torch.stack([x * (1.0 + spread * v) for v in pair_pattern(n)], dim=-2)


def reduce_stream(w: torch.Tensor) -> torch.Tensor:
    """``[..., n, C] -> [..., C]``: mean over the copies, the inverse of :func:`expand_stream`."""
    return w.mean(dim=-2)


def split_fractions(x: torch.Tensor, m: int) -> torch.Tensor:
    """``[..., d] -> [..., m, d/m]`` (Frac-connections): no copy, no memory growth."""
    return x.unflatten(-1, (m, x.shape[-1] // m))


def merge_fractions(w: torch.Tensor) -> torch.Tensor:
    """``[..., m, d/m] -> [..., d]``: concatenate the fractions back."""
    return w.flatten(-2)


# ----------------------------------------------------------------------------- shared pieces
def sinkhorn_log(logits: torch.Tensor, iters: int = SINKHORN_ITERS, dims: tuple = (-1, -2)) -> torch.Tensor:
    """Sinkhorn-Knopp projection of ``exp(logits)`` onto doubly stochastic matrices, in log space.

    Computed in fp32 (fp64 for fp64 input) whatever the input dtype, so no logit can overflow ``exp``. Each iteration
    normalises rows then columns; the last step is a column normalisation, so every column sums to 1
    to rounding (rows to the convergence of ``iters`` iterations). Column sums of 1 are what keep the
    mean over copies, and so the function of the original model, unchanged. ``dims``: the dims a row and a
    column run along (``(-1, -2)``: the matrices are the last two dims).
    """
    z = _acc(logits)
    row, col = dims
    for _ in range(iters):
        z = z - torch.logsumexp(z, dim=row, keepdim=True)
        z = z - torch.logsumexp(z, dim=col, keepdim=True)
    return z.exp()


def rms_project(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, matmul=torch.matmul) -> torch.Tensor:
    """``RMSNorm(x) @ weight`` (RMSNorm without a weight over the last dim: a weight would be redundant with the
    projection), with the per-row scale applied after the product: the same math, but the normalised copy of ``x``
    is never made (eager or compiled, the product reads ``x`` itself). ``matmul``: how the product is computed
    (:mod:`hc_rewrite.ops.fusible` passes the orientations a CPU BLAS is fastest at for a handful of columns)."""
    x = _acc(x)
    return matmul(x, _acc(weight)) * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def ln_project(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``layer_norm(x) @ weight`` (no affine; over the last dim)."""
    return F.layer_norm(_acc(x), (x.shape[-1],)) @ _acc(weight)


def small_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` where the contracted dim is the stream's ``n`` (a handful): the coefficient matrices of the
    sites. Eager: one (batched) matmul. :mod:`hc_rewrite.ops.fusible` swaps in a form Inductor fuses."""
    return torch.matmul(a, b)


# ----------------------------------------------------------------------------- mHC
def mhc_coeffs(w, phi, alpha, b_pre, b_post, b_res, eps: float = 1e-6, iters: int = SINKHORN_ITERS, *,
               project=rms_project, sinkhorn=sinkhorn_log):
    """mHC coefficients (DeepSeek arXiv 2512.24880, eqs. 5-8), in fp32.

    ``w``: ``[..., n, C]``. Dynamic form when ``phi`` is given: ``r = RMSNorm(vec(w))`` over all
    ``n*C`` features, ``logits = r @ phi`` with ``phi: [n*C, 2n (+ n*n)]``, gated by ``alpha``
    (``[2]`` or ``[3]``: pre, post, res) and shifted by the biases. Static form (``phi is None``): the
    biases alone. ``b_res is None`` means the site has no residual mixing (used for the last site of a
    stream, where a column-stochastic ``H_res`` cancels under the mean reduction and would be dead).

    Returns ``h_pre [..., n]`` (sigmoid), ``h_post [..., n]`` (2 * sigmoid), ``h_res [..., n, n]``
    (Sinkhorn) or ``None``. ``project``: how ``RMSNorm(x) @ phi`` is computed (:func:`rms_project`);
    ``sinkhorn``: how the ``[..., n, n]`` logits are projected (:func:`sinkhorn_log`).
    """
    n = w.shape[-2]
    if phi is None:
        pre_l, post_l = _acc(b_pre), _acc(b_post)
        res_l = None if b_res is None else _acc(b_res)
    else:
        logits = project(w.flatten(-2), phi, eps)
        a = _acc(alpha)
        pre_l = a[0] * logits[..., :n] + _acc(b_pre)
        post_l = a[1] * logits[..., n:2 * n] + _acc(b_post)
        res_l = None
        if b_res is not None:
            res_l = a[2] * logits[..., 2 * n:].unflatten(-1, (n, n)) + _acc(b_res)
    h_pre = torch.sigmoid(pre_l)
    h_post = 2.0 * torch.sigmoid(post_l)
    h_res = None if res_l is None else sinkhorn(res_l, iters)
    return h_pre, h_post, h_res


# ----------------------------------------------------------------------------- HC and Frac
def _dynamic_terms(w: torch.Tensor, weights, project) -> list:
    """``s * tanh(norm(w) @ W)`` for each ``W`` of ``weights`` (each ``[C, k]``): the input-dependent parts of HC /
    Frac (norm per copy or fraction), from one product with the weights side by side."""
    sizes = [wt.shape[-1] for wt in weights]
    out = DYNAMIC_SCALE * torch.tanh(project(w, torch.cat([_acc(wt) for wt in weights], dim=-1)))
    return list(out.split(sizes, dim=-1))


def hc_coeffs(w, a_m, a_r, b, w_m=None, w_r=None, w_b=None, *, project=ln_project):
    """Hyper-connection coefficients (arXiv 2409.19606, eqs. 10-13), in fp32.

    ``w``: ``[..., n, C]``; static parameters ``a_m [n]`` (width connection, the branch input
    weights), ``a_r [n, n]`` (residual mixing, ``x'_i = sum_j a_r[j, i] x_j``), ``b [n]`` (depth
    connection, the branch output weights). Dynamic weights ``w_m [C]``, ``w_r [C, n]``, ``w_b [C]``
    add ``s * tanh(norm(w) @ W)`` per token (``project``: how ``norm(w) @ W`` is computed, :func:`ln_project`).

    Returns ``h_pre [..., n]``, ``h_post [..., n]``, ``h_res [..., n, n]`` with ``h_res[i, j] = A_r[j, i]``.
    """
    h_pre, h_res_t, h_post = _acc(a_m), _acc(a_r), _acc(b)
    if w_m is not None:
        d_m, d_r, d_b = _dynamic_terms(w, (w_m.unsqueeze(-1), w_r, w_b.unsqueeze(-1)), project)
        h_pre = h_pre + d_m.squeeze(-1)
        h_res_t = h_res_t + d_r
        h_post = h_post + d_b.squeeze(-1)
    return h_pre, h_post, h_res_t.transpose(-1, -2)


def frac_coeffs(w, y, a, b, w_y=None, w_a=None, w_b=None, *, project=ln_project):
    """Frac-connection coefficients (arXiv 2503.14125), in fp32.

    ``w``: ``[..., m, d/m]`` fractions. Connection matrix ``[[0, B], [Y, A]]``: ``y [m, m]`` mixes the
    fractions into the branch input, ``a [m, m]`` is the residual mixing, ``b [m]`` weights each fraction
    of the branch output. Dynamic weights ``w_y [d/m, m]``, ``w_a [d/m, m]``, ``w_b [d/m]`` add
    ``s * tanh(norm(w) @ W)`` per token (norm per fraction; ``project`` as in :func:`hc_coeffs`).

    Returns ``h_pre [..., m, m]`` (``Y``), ``h_post [..., m]`` (``B``), ``h_res [..., m, m]`` (``A^T``).
    """
    h_pre, h_res_t, h_post = _acc(y), _acc(a), _acc(b)
    if w_y is not None:
        d_y, d_a, d_b = _dynamic_terms(w, (w_y, w_a, w_b.unsqueeze(-1)), project)
        h_pre = h_pre + d_y
        h_res_t = h_res_t + d_a
        h_post = h_post + d_b.squeeze(-1)
    return h_pre, h_post, h_res_t.transpose(-1, -2)


# ----------------------------------------------------------------------------- pre / post
def stream_pre(w: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """Branch input of mHC / HC: ``sum_i h_pre[i] * w[i]``, ``[..., n, C] -> [..., C]``."""
    return (h_pre.to(w.dtype).unsqueeze(-1) * w).sum(dim=-2)


def frac_pre(w: torch.Tensor, y: torch.Tensor, *, matmul=small_matmul) -> torch.Tensor:
    """Branch input of Frac: ``concat_i sum_j Y[j, i] * w[j]``, ``[..., m, d/m] -> [..., d]``."""
    mixed = matmul(y.to(w.dtype).transpose(-1, -2), w)
    return mixed.flatten(-2)


def stream_post(w: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res, *, matmul=small_matmul) -> torch.Tensor:
    """Site output: ``W'[i] = sum_j h_res[i, j] W[j] + h_post[i] * y[i]``.

    ``y`` is the branch output: ``[..., C]`` broadcast to every copy (mHC / HC) or ``[..., d]`` split
    into the fractions (Frac). ``h_res is None``: no mixing (identity), see :func:`mhc_coeffs`.
    """
    if y.shape[-1] == w.shape[-1]:
        y = y.unsqueeze(-2)
    else:
        y = split_fractions(y, w.shape[-2])
    out = h_post.to(w.dtype).unsqueeze(-1) * y
    if h_res is None:
        return w + out
    return matmul(h_res.to(w.dtype), w) + out


# ----------------------------------------------------------------------------- stream-wise ops
def stream_layer_norm(w, weight, bias, eps: float, frac: bool):
    """LayerNorm over the stream's feature dim, lifted to the widened stream (post-norm models).

    Frac: the norm sees the full width (fractions concatenated), exactly as in the original model.
    mHC / HC: every copy is normalised with the statistics of the copies' mean. The mean of the result
    is ``LayerNorm(mean(W))`` exactly, so the model's function is kept even when the copies differ; for
    identical copies it is the per-copy LayerNorm.
    """
    if frac:
        c = w.shape[-1] * w.shape[-2]
        return split_fractions(F.layer_norm(merge_fractions(w), (c,), weight, bias, eps), w.shape[-2])
    mean_stream = _acc(w.mean(dim=-2, keepdim=True))
    mu = mean_stream.mean(dim=-1, keepdim=True)
    var = mean_stream.var(dim=-1, unbiased=False, keepdim=True)
    out = ((_acc(w) - mu) * torch.rsqrt(var + eps)).to(w.dtype)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def stream_relu(w, frac: bool):
    """ReLU lifted to the widened stream (conv nets: ``relu(x + F(x))``).

    Frac: elementwise on the fractions, exactly the original. mHC / HC: every copy is gated by the sign
    of the copies' mean, ``W[i] * (mean(W) > 0)``, whose mean is ``relu(mean(W))`` exactly; for
    identical copies it is the per-copy ReLU.
    """
    if frac:
        return torch.relu(w)
    return w * (w.mean(dim=-2, keepdim=True) > 0).to(w.dtype)


def logit(p: float) -> float:
    """Inverse sigmoid, for initial biases."""
    return math.log(p / (1.0 - p))
