"""mHC as the production models compute it (DeepSeek-V4, GLM-5-Next, Hunyuan V4 in ``transformers``), and the
mapping between their connection parameters and ours.

Their per-site formula (``DeepseekV4HyperConnection``; GLM-5-Next's is the same code) from the parameters
``fn [(2 + n) n, n D]``, ``base [(2 + n) n]``, ``scale [3]``, in fp32 whatever the model dtype::

    r     = RMSNorm(vec(W))  (no weight, eps = the model's rms_norm_eps)      W: [..., n, D]
    pre_w, post_w, comb_w = split(r @ fn^T, [n, n, n*n])
    pre   = sigmoid(pre_w * scale[0] + base_pre) + hc_eps                    (sums to 1 + n hc_eps)
    post  = 2 sigmoid(post_w * scale[1] + base_post)
    comb  = softmax(comb_w * scale[2] + base_comb, -1) + hc_eps, then Sinkhorn with hc_eps in every denominator,
            columns first and last (comb[in, out]: each column's sum over the inputs is 1 - O(hc_eps))
    branch input = sum_i pre_i W_i;   W'_k = post_k y + sum_j comb[j, k] W_j

So in our terms (:mod:`hc_rewrite.ops.reference`, ``H_res[out, in]``): ``H_pre = pre``, ``H_post = post``,
``H_res = comb^T``, and the site is :func:`~hc_rewrite.ops.reference.stream_pre` /
:func:`~hc_rewrite.ops.reference.stream_post`. Ours (the paper's): log-domain Sinkhorn without eps, rows first,
columns last (our column sums, over the outputs, are exact: the mean over the copies is kept exactly); no eps on
``H_pre``; a fixed RMS eps of 1e-6. Hunyuan V4 (``HYV4HyperConnection``) drops ``comb`` (``H_res = I``) and scales
``post`` by ``hc_magnitude`` (plus ``hc_eps``). The stream's end: DeepSeek-V4 and Hunyuan V4 collapse with a learned
head (:func:`hyper_head`), GLM-5-Next and ours with the mean.

:func:`to_deepseek_v4` / :func:`from_deepseek_v4` map an mHC site's parameters (:class:`~hc_rewrite.variants.mhc.
MHCParams`) to their layout and back: the same numbers in their places (``fn = phi^T`` with the ``H_res`` block
transposed, ``base = [b_pre, b_post, b_res^T]``, ``scale = alpha``). Under the two formulas the same numbers give
nearly the same coefficients (they differ by the eps terms and the Sinkhorn's last normalisation), not the same.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops.reference import _acc

#: DeepSeek-V4's defaults (``DeepseekV4Config``): ``hc_eps``, ``rms_norm_eps``, ``hc_sinkhorn_iters``.
HC_EPS, RMS_EPS, SINKHORN_ITERS = 1e-6, 1e-6, 20


def _rms_normed(w: torch.Tensor, rms_eps: float) -> torch.Tensor:
    """``vec(W)`` in fp32, RMS-normalised without weight, as their ``UnweightedRMSNorm``."""
    flat = w.flatten(-2).float()
    return flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + rms_eps)


def sinkhorn_eps(comb_logits: torch.Tensor, iters: int = SINKHORN_ITERS, hc_eps: float = HC_EPS) -> torch.Tensor:
    """Their Sinkhorn of ``comb [..., in, out]``: ``softmax`` over the last dim ``+ eps``, a column normalisation,
    then ``iters - 1`` row-then-column normalisations, ``+ eps`` in every denominator."""
    comb = torch.softmax(comb_logits, dim=-1) + hc_eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    return comb


def mhc_eps_coeffs(w: torch.Tensor, phi, alpha, b_pre: torch.Tensor, b_post: torch.Tensor, b_res: torch.Tensor,
                   rms_eps: float = RMS_EPS, hc_eps: float = HC_EPS, iters: int = SINKHORN_ITERS):
    """DeepSeek-V4's (and GLM-5-Next's) coefficients of the stream ``w [..., n, D]`` from *our* parameter layout
    (:class:`~hc_rewrite.variants.mhc.MHCParams`: ``phi [nD, (2+n)n]`` or ``None`` (static), ``alpha [3]``, ``b_pre``,
    ``b_post``, ``b_res [out, in]``), in fp32 (or more): ``(h_pre, h_post, h_res)`` with ``h_res = comb^T``. The one
    place of their math: :func:`deepseek_v4_coeffs` maps their layout here, the flavoured mHC variant
    (``rewrite(..., flavour="deepseek-v4")``) calls it as its coefficient op."""
    n = w.shape[-2]
    b_pre, b_post, b_res = _acc(b_pre), _acc(b_post), _acc(b_res)
    if phi is None:
        pre_l, post_l, res_l = b_pre, b_post, b_res
    else:
        mixes = _rms_normed(w, rms_eps) @ _acc(phi)  # normalised, then projected: their order of rounding
        a = _acc(alpha)
        pre_l = mixes[..., :n] * a[0] + b_pre
        post_l = mixes[..., n:2 * n] * a[1] + b_post
        res_l = mixes[..., 2 * n:].unflatten(-1, (n, n)) * a[2] + b_res
    h_pre = torch.sigmoid(pre_l) + hc_eps
    h_post = 2 * torch.sigmoid(post_l)
    comb = sinkhorn_eps(res_l.transpose(-1, -2), iters, hc_eps)  # theirs is comb[in, out]
    return h_pre, h_post, comb.transpose(-1, -2)


def collapse(w: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """Their branch input ``sum_i pre_i W_i``, products and sum in the coefficients' fp32 (a bf16 stream promoted),
    cast back to the stream's dtype (ours, :func:`~hc_rewrite.ops.reference.stream_pre`, works in the stream's)."""
    return (h_pre.unsqueeze(-1) * w).sum(dim=-2).to(w.dtype)


def deepseek_v4_coeffs(w: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, *,
                       rms_eps: float = RMS_EPS, hc_eps: float = HC_EPS, iters: int = SINKHORN_ITERS):
    """DeepSeek-V4's (and GLM-5-Next's) coefficients of the stream ``w [..., n, D]`` from *their* parameters
    (``fn``, ``base``, ``scale``), in fp32, in our orientation: ``(h_pre [..., n], h_post [..., n], h_res [..., n, n])``
    with ``h_res = comb^T`` (``h_res[out, in]``)."""
    n = w.shape[-2]
    phi, b_pre, b_post, b_res = _ours_of(fn, base, n)
    return mhc_eps_coeffs(w, phi, scale, b_pre, b_post, b_res, rms_eps, hc_eps, iters)


def hy_v4_coeffs(w: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, *,
                 magnitude: float = 2.0, rms_eps: float = RMS_EPS, hc_eps: float = HC_EPS):
    """Hunyuan V4's coefficients (``HYV4HyperConnection``: no ``H_res``): ``(h_pre, h_post)``, fp32."""
    n = w.shape[-2]
    flat = w.flatten(-2).float()
    mixes = F.linear(flat, _acc(fn)) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + rms_eps)
    pre_b, post_b = _acc(base).split(n, dim=-1)
    pre_w, post_w = mixes.split(n, dim=-1)
    scale = _acc(scale)
    h_pre = torch.sigmoid(pre_w * scale[0] + pre_b) + hc_eps
    h_post = magnitude * torch.sigmoid(post_w * scale[1] + post_b) + hc_eps
    return h_pre, h_post


def hyper_head(w: torch.Tensor, hc_fn: torch.Tensor, hc_base: torch.Tensor, hc_scale: torch.Tensor, *,
               rms_eps: float = RMS_EPS, hc_eps: float = HC_EPS, norm_first: bool = True) -> torch.Tensor:
    """The learned collapse at the stream's end, ``[..., n, D] -> [..., D]``: DeepSeek-V4's ``HyperHead``
    (``norm_first``: RMSNorm, then the projection) or Hunyuan V4's (projection times the RMS factor)."""
    flat = w.flatten(-2).float()
    if hc_fn is None:  # a static head (hc_rewrite's flavour with dynamic=False): the biases alone
        mixes = flat.new_zeros(())
    elif norm_first:
        mixes = F.linear(_rms_normed(w, rms_eps), _acc(hc_fn))
    else:
        mixes = F.linear(flat, _acc(hc_fn)) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + rms_eps)
    scale = _acc(hc_scale) if hc_scale is not None else 0.0
    pre = torch.sigmoid(mixes * scale + _acc(hc_base)) + hc_eps
    return (pre.unsqueeze(-1) * w).sum(dim=-2).to(w.dtype)


# ----------------------------------------------------------------------------- parameter layouts
def _res_block_permutation(n: int) -> torch.Tensor:
    """Index ``p`` with ``ours[..., p] = theirs`` for the ``n*n`` residual entries: ours flatten ``H_res[out, in]``,
    theirs ``comb[in, out]``."""
    return torch.arange(n * n).view(n, n).t().reshape(-1)


def _column_order(n: int) -> torch.Tensor:
    """Index of the ``(2+n)n`` coefficient columns between the layouts (an involution: the same both ways): pre and
    post in place, the residual block transposed (:func:`_res_block_permutation`)."""
    return torch.cat([torch.arange(2 * n), 2 * n + _res_block_permutation(n)])


def _ours_of(fn: torch.Tensor, base: torch.Tensor, n: int):
    """Their ``fn [(2+n)n, nD]``, ``base [(2+n)n]`` as our ``(phi [nD, (2+n)n], b_pre, b_post, b_res [out, in])``."""
    return fn[_column_order(n).to(fn.device)].t(), base[:n], base[n:2 * n], base[2 * n:].view(n, n).t()


def to_deepseek_v4(params) -> dict:
    """An mHC site's parameters (:class:`~hc_rewrite.variants.mhc.MHCParams`, e.g. ``model.hc.s0_3``) in
    DeepSeek-V4's layout: ``{"fn": [(2+n)n, nD], "base": [(2+n)n], "scale": [3]}`` (see module docstring; a static
    site has ``fn = 0``, ``scale = 0``; the last site of a stream, which has no ``H_res``, gets the identity
    logits' place filled with zeros)."""
    n, width = params.n, params.width
    k = (2 + n) * n
    device, dtype = params.b_pre.device, torch.float32
    fn = torch.zeros(k, n * width, device=device, dtype=dtype)
    scale = torch.zeros(3, device=device, dtype=dtype)
    res = params.b_res.detach().float().t().reshape(-1) if params.b_res is not None else \
        torch.zeros(n * n, device=device, dtype=dtype)
    base = torch.cat([params.b_pre.detach().float(), params.b_post.detach().float(), res])
    if params.phi is not None:
        phi = params.phi.detach().float()
        cols = _column_order(n) if params.b_res is not None else torch.arange(2 * n)
        fn[: cols.numel()] = phi[:, cols].t()
        scale[: params.alpha.numel()] = params.alpha.detach().float()
    return {"fn": fn, "base": base, "scale": scale}


def from_deepseek_v4(fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, width: int, *, dynamic: bool = True):
    """DeepSeek-V4 connection parameters (a ``DeepseekV4HyperConnection``'s ``fn``, ``base``, ``scale``) as an mHC
    site's :class:`~hc_rewrite.variants.mhc.MHCParams` (the inverse of :func:`to_deepseek_v4`)."""
    from .variants.mhc import MHCParams

    k = base.numel()
    n = int(round((-2 + (4 + 4 * k) ** 0.5) / 2))
    if (2 + n) * n != k or tuple(fn.shape) != (k, n * width):
        raise ValueError(f"not a DeepSeek-V4 connection of width {width}: fn {tuple(fn.shape)}, base {k}")
    params = MHCParams(n, width, dynamic, has_res=True, dtype=torch.float32, device=fn.device)
    phi, b_pre, b_post, b_res = _ours_of(fn.float(), base, n)
    with torch.no_grad():
        params.b_pre.copy_(b_pre)
        params.b_post.copy_(b_post)
        params.b_res.copy_(b_res)
        if dynamic:
            params.phi.copy_(phi)
            params.alpha.copy_(scale.float())
    return params
