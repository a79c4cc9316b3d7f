"""mHC kernels: coefficients (RMS norm, ``x @ phi``, gates, Sinkhorn) fused with the pre, and with the
post of the previous site.

One program handles ``BT`` tokens and loops over the ``n*C`` features of their stream once, accumulating
the sum of squares and ``x @ phi`` (tensor cores, ``tf32x3`` so the result has fp32 accuracy). The
``2n + n*n`` logits then stay in registers: sigmoid / ``2 sigmoid`` gates and all Sinkhorn iterations in
log space (rows then columns, ending on columns, as :func:`hc_rewrite.ops.reference.sinkhorn_log`).
With ``PRE`` the program loops over the stream a second time (in reverse, so the most recently read part
is still in L2) and writes the branch input ``sum_i h_pre[i] W[i]``. With ``POST`` the stream itself is
first computed from the previous site (``W = h_res' @ W' + h_post' * y``) and written out.

Column layout inside the kernels: ``phi`` and the logits are re-laid out to ``PW = max(16, 2 NP^2)``
columns (``NP`` = n rounded up to a power of two): ``[res NPxNP | pre NP | post NP | 0 ...]``, so no
gather is needed in the kernel (:func:`_pad_cols` / :func:`_unpad_cols`).

Backward (recomputation, nothing of size ``n*C`` is stored): the logits and the RMS scale are recomputed
by the same kernel (``STATS``; the fused ops save them instead, ``2n + n^2 + 1`` floats per token), the
gates and Sinkhorn are differentiated on ``[T, n, n]`` tensors in torch (explicit formulas, inlined by
Inductor), and :mod:`.proj` writes ``dW`` and ``dphi`` in one more pass over the stream.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..ops import reference as ref
from ._common import (coeff_view, empty, flat_tokens, interpreting, pow2, reduce_static, reference_grads,
                      use_triton, wrap_triton)
from .mix import mix_bwd
from .proj import proj_bwd, split_for

_BT, _BC, _WARPS = 64, 16, 8


@triton.jit
def _mhc_kernel(w_ptr, phi_ptr, alpha_ptr, bpre_ptr, bpost_ptr, bres_ptr,
                y_ptr, hpp_ptr, hrp_ptr,
                hpre_ptr, hpost_ptr, hres_ptr, logit_ptr, rstd_ptr, branch_ptr, wout_ptr,
                T, C, eps, iters, hpp_st, hrp_st,
                N: tl.constexpr, NP: tl.constexpr, PW: tl.constexpr, HAS_RES: tl.constexpr,
                POST: tl.constexpr, POST_RES: tl.constexpr, Y_SPLIT: tl.constexpr,
                COEFFS: tl.constexpr, STATS: tl.constexpr, PRE: tl.constexpr, SPLIT16: tl.constexpr,
                EMU16: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    t = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    tm = t < T
    i = tl.arange(0, NP)
    im = i < N
    p = tl.arange(0, PW)
    K = N * C
    wdt = w_ptr.dtype.element_ty
    sumsq = tl.zeros([BT], dtype=tl.float32)
    u = tl.zeros([BT, PW], dtype=tl.float32)
    if POST:
        # the new stream W[t, i, c] = sum_j h_res'[t, i, j] W'[t, j, c] + h_post'[t, i] y[t, (i), c], written
        # out chunk by chunk while its statistics accumulate; chunks are [BT, NP, BC] (all copies of BC features)
        tmi = tm[:, None] & im[None, :]
        hp3 = tl.load(hpp_ptr + t[:, None] * hpp_st + i[None, :], mask=tmi, other=0.0).to(wdt).to(tl.float32)
        if POST_RES:
            hr3 = tl.load(hrp_ptr + t[:, None, None] * hrp_st + (i[:, None] * N + i[None, :])[None, :, :],
                          mask=tmi[:, :, None] & im[None, None, :], other=0.0).to(wdt).to(tl.float32)
        cc = tl.arange(0, BC)
        kk = tl.arange(0, NP * BC)
        for c0 in range(0, C, BC):
            c = c0 + cc
            cm = c < C
            m2 = tm[:, None] & cm[None, :]
            m3 = tmi[:, :, None] & cm[None, None, :]
            acc = tl.zeros([BT, NP, BC], dtype=tl.float32)
            for j in tl.static_range(N):
                xj = tl.load(w_ptr + t[:, None] * K + j * C + c[None, :], mask=m2, other=0.0).to(tl.float32)
                if POST_RES:
                    mj = tl.sum(tl.where(i[None, None, :] == j, hr3, 0.0), axis=2)
                    acc += mj[:, :, None] * xj[:, None, :]
                else:
                    acc += tl.where(i[None, :, None] == j, xj[:, None, :], 0.0)
            if Y_SPLIT:
                yv = tl.load(y_ptr + t[:, None, None] * K + (i[:, None] * C + c[None, :])[None, :, :], mask=m3,
                             other=0.0).to(tl.float32)
                acc += hp3[:, :, None] * yv
            else:
                yv = tl.load(y_ptr + t[:, None] * C + c[None, :], mask=m2, other=0.0).to(tl.float32)
                acc += hp3[:, :, None] * yv[:, None, :]
            xw3 = acc.to(wdt)
            tl.store(wout_ptr + t[:, None, None] * K + (i[:, None] * C + c[None, :])[None, :, :], xw3, mask=m3)
            xw = tl.reshape(xw3, [BT, NP * BC])
            krow = (kk // BC) * C + c0 + kk % BC
            km = (kk // BC < N) & (c0 + kk % BC < C)
            xf = xw.to(tl.float32)
            sumsq += tl.sum(xf * xf, axis=1)
            ph_off = krow[:, None] * PW + p[None, :]
            if SPLIT16:
                ph_hi = tl.load(phi_ptr + ph_off, mask=km[:, None], other=0.0)
                ph_lo = tl.load(phi_ptr + K * PW + ph_off, mask=km[:, None], other=0.0)
                if EMU16:  # triton's interpreter multiplies bf16 bit patterns in tl.dot: same products in fp32
                    xw, ph_hi, ph_lo = xf, ph_hi.to(tl.float32), ph_lo.to(tl.float32)
                u = tl.dot(xw, ph_hi, u)
                u = tl.dot(xw, ph_lo, u)
            else:
                u = tl.dot(xf, tl.load(phi_ptr + ph_off, mask=km[:, None], other=0.0), u, input_precision="tf32x3")
    else:
        # contiguous chunks of the flattened n*C features
        kk = tl.arange(0, NP * BC)
        for k0 in range(0, K, NP * BC):
            krow = k0 + kk
            km = krow < K
            xw = tl.load(w_ptr + t[:, None] * K + krow[None, :], mask=tm[:, None] & km[None, :], other=0.0,
                         eviction_policy="evict_last")
            xf = xw.to(tl.float32)
            sumsq += tl.sum(xf * xf, axis=1)
            ph_off = krow[:, None] * PW + p[None, :]
            if SPLIT16:
                # bf16 stream: x is exact in bf16; phi comes as bf16 hi + lo parts (two tensor-core dots
                # with fp32 accumulation, ~16 mantissa bits of phi)
                ph_hi = tl.load(phi_ptr + ph_off, mask=km[:, None], other=0.0)
                ph_lo = tl.load(phi_ptr + K * PW + ph_off, mask=km[:, None], other=0.0)
                if EMU16:
                    xw, ph_hi, ph_lo = xf, ph_hi.to(tl.float32), ph_lo.to(tl.float32)
                u = tl.dot(xw, ph_hi, u)
                u = tl.dot(xw, ph_lo, u)
            else:
                u = tl.dot(xf, tl.load(phi_ptr + ph_off, mask=km[:, None], other=0.0), u, input_precision="tf32x3")
    rstd = 1.0 / tl.sqrt(sumsq / K + eps)
    z = u * rstd[:, None]
    if STATS:
        tl.store(logit_ptr + t[:, None] * PW + p[None, :], z, mask=tm[:, None])
        tl.store(rstd_ptr + t, rstd, mask=tm)
    if COEFFS or PRE:
        # pick the pre / post / res logits out of the padded columns (one-time 3-D / 4-D selections)
        a0 = tl.load(alpha_ptr).to(tl.float32)
        a1 = tl.load(alpha_ptr + 1).to(tl.float32)
        # z [BT, PW] -> groups of NP*NP columns: group 0 = res (NP x NP), group 1 = rows (pre, post, 0..)
        z3 = tl.reshape(z, [BT, PW // (NP * NP), NP * NP])
        grp = tl.arange(0, PW // (NP * NP))[None, :, None]
        pp = tl.reshape(tl.sum(tl.where(grp == 1, z3, 0.0), axis=1), [BT, NP, NP])
        z_pre = tl.sum(tl.where(i[None, :, None] == 0, pp, 0.0), axis=1)
        z_post = tl.sum(tl.where(i[None, :, None] == 1, pp, 0.0), axis=1)
        b_pre = tl.load(bpre_ptr + i, mask=im, other=0.0).to(tl.float32)
        b_post = tl.load(bpost_ptr + i, mask=im, other=0.0).to(tl.float32)
        h_pre = tl.sigmoid(a0 * z_pre + b_pre[None, :])
        h_post = 2.0 * tl.sigmoid(a1 * z_post + b_post[None, :])
        tmi = tm[:, None] & im[None, :]
        if COEFFS:
            tl.store(hpre_ptr + t[:, None] * N + i[None, :], h_pre, mask=tmi)
            tl.store(hpost_ptr + t[:, None] * N + i[None, :], h_post, mask=tmi)
            if HAS_RES:
                a2 = tl.load(alpha_ptr + 2).to(tl.float32)
                z_res = tl.reshape(tl.sum(tl.where(grp == 0, z3, 0.0), axis=1), [BT, NP, NP])
                valid = im[:, None] & im[None, :]
                b_res = tl.load(bres_ptr + i[:, None] * N + i[None, :], mask=valid, other=0.0).to(tl.float32)
                s = a2 * z_res + b_res[None, :, :]
                s = tl.where(valid[None, :, :], s, -1.0e30)  # padding rows / columns: exp() = 0
                for _ in range(iters):
                    mx = tl.max(s, axis=2)
                    s = s - (mx + tl.log(tl.sum(tl.exp(s - mx[:, :, None]), axis=2)))[:, :, None]
                    s = tl.where(valid[None, :, :], s, -1.0e30)
                    mx = tl.max(s, axis=1)
                    s = s - (mx + tl.log(tl.sum(tl.exp(s - mx[:, None, :]), axis=1)))[:, None, :]
                    s = tl.where(valid[None, :, :], s, -1.0e30)
                h_res = tl.where(valid[None, :, :], tl.exp(s), 0.0)
                tl.store(hres_ptr + t[:, None, None] * (N * N) + (i[:, None] * N + i[None, :])[None, :, :],
                         h_res, mask=tm[:, None, None] & valid[None, :, :])
        if PRE:
            if POST:
                tl.debug_barrier()  # the stream written above is read back (by other threads, maybe)
            src = wout_ptr if POST else w_ptr
            hq = h_pre.to(wdt).to(tl.float32)
            cc = tl.arange(0, BC)
            nchunks = tl.cdiv(C, BC)
            for q in range(0, nchunks):
                c = (nchunks - 1 - q) * BC + cc
                cm = c < C
                m3 = tm[:, None, None] & im[None, :, None] & cm[None, None, :]
                x = tl.load(src + t[:, None, None] * K + (i[:, None] * C + c[None, :])[None, :, :],
                            mask=m3, other=0.0, eviction_policy="evict_first").to(tl.float32)
                b = tl.sum(hq[:, :, None] * x, axis=1)
                tl.store(branch_ptr + t[:, None] * C + c[None, :], b.to(branch_ptr.dtype.element_ty),
                         mask=tm[:, None] & cm[None, :])


def _layout(n: int):
    np_ = pow2(n, 2)
    return np_, max(16, 2 * np_ * np_)


def _pad_cols(x: torch.Tensor, n: int, has_res: bool) -> torch.Tensor:
    """``[..., 2n (+ n*n)]`` in reference column order -> ``[..., PW]`` kernel layout."""
    np_, pw = _layout(n)
    lead = tuple(x.shape[:-1])
    if has_res:
        res = F.pad(x[..., 2 * n:].unflatten(-1, (n, n)), (0, np_ - n, 0, np_ - n)).flatten(-2)
    else:
        res = x.new_zeros(lead + (np_ * np_,))
    pre = F.pad(x[..., :n], (0, np_ - n))
    post = F.pad(x[..., n:2 * n], (0, np_ - n))
    rest = x.new_zeros(lead + (pw - np_ * np_ - 2 * np_,))
    return torch.cat([res, pre, post, rest], dim=-1)


def _phi_arg(phi: torch.Tensor, n: int, has_res: bool, stream_dtype: torch.dtype) -> torch.Tensor:
    """``phi`` for the kernel: fp32 ``[K, PW]``, or for a bf16 stream its bf16 hi and lo parts ``[2, K, PW]``
    (``hi + lo`` carries ~16 mantissa bits; the products with the exact bf16 stream run on tensor cores)."""
    pad = _pad_cols(phi.float(), n, has_res)
    if stream_dtype != torch.bfloat16:
        return pad.contiguous()
    hi = pad.to(torch.bfloat16)
    return torch.stack([hi, (pad - hi.float()).to(torch.bfloat16)]).contiguous()


def _unpad_cols(xp: torch.Tensor, n: int, has_res: bool) -> torch.Tensor:
    """Inverse of :func:`_pad_cols`."""
    np_, _ = _layout(n)
    parts = [xp[..., np_ * np_:np_ * np_ + n], xp[..., np_ * np_ + np_:np_ * np_ + np_ + n]]
    if has_res:
        parts.append(xp[..., :np_ * np_].unflatten(-1, (np_, np_))[..., :n, :n].flatten(-2))
    return torch.cat(parts, dim=-1)


# ----------------------------------------------------------------------------- kernel-level op
@torch.library.triton_op("hc_fused::mhc_fwd", mutates_args=())
def mhc_fwd(w: torch.Tensor, phi_pad: torch.Tensor, alpha: torch.Tensor, b_pre: torch.Tensor,
            b_post: torch.Tensor, b_res: Optional[torch.Tensor], eps: float, iters: int, n: int,
            coeffs: bool, stats: bool, pre: bool, y: Optional[torch.Tensor], hp_prev: Optional[torch.Tensor],
            hr_prev: Optional[torch.Tensor]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                       torch.Tensor]:
    """One launch of the mHC kernel on ``w [T, n*C]`` (or, when ``y`` is given, on the stream
    ``h_res' @ w + h_post' * y`` of the previous site, which it writes out).

    Returns ``(h_pre, h_post, h_res, logits [T, PW], rstd [T], branch [T, C], w_out [T, n*C])``; what was
    not asked for is empty. ``hp_prev [T, n]`` / ``[n]``, ``hr_prev [T, n, n]`` / ``[n, n]`` / None.
    """
    T, K = w.shape
    C = K // n
    np_, pw = _layout(n)
    dev = w.device
    has_res = b_res is not None
    post = y is not None
    h_pre = empty((T, n) if coeffs else (0,), torch.float32, dev)
    h_post = empty((T, n) if coeffs else (0,), torch.float32, dev)
    h_res = empty((T, n, n) if (coeffs and has_res) else (0,), torch.float32, dev)
    logits = empty((T, pw) if stats else (0,), torch.float32, dev)
    rstd = empty((T,) if stats else (0,), torch.float32, dev)
    branch = empty((T, C) if pre else (0,), w.dtype, dev)
    w_out = empty((T, K) if post else (0,), w.dtype, dev)
    hpp_st = 0 if (hp_prev is None or hp_prev.dim() == 1) else n
    hrp_st = 0 if (hr_prev is None or hr_prev.dim() == 2) else n * n
    grid = (triton.cdiv(T, _BT),)
    wrap_triton(_mhc_kernel)[grid](
        w, phi_pad, alpha, b_pre, b_post, b_pre if b_res is None else b_res,
        w if y is None else y, w if hp_prev is None else hp_prev, w if hr_prev is None else hr_prev,
        h_pre, h_post, h_res, logits, rstd, branch, w_out,
        T, C, eps, iters, hpp_st, hrp_st,
        N=n, NP=np_, PW=pw, HAS_RES=has_res, POST=post, POST_RES=hr_prev is not None,
        Y_SPLIT=post and y.shape[-1] != C, COEFFS=coeffs, STATS=stats, PRE=pre,
        SPLIT16=phi_pad.dtype == torch.bfloat16, EMU16=interpreting(), BT=_BT, BC=_BC, num_warps=_WARPS,
    )
    return h_pre, h_post, h_res, logits, rstd, branch, w_out


# ----------------------------------------------------------------------------- host-side pieces
def _sinkhorn_backward(s0: torch.Tensor, grad: torch.Tensor, iters: int) -> torch.Tensor:
    """Gradient of :func:`hc_rewrite.ops.reference.sinkhorn_log` w.r.t. its logits ``s0`` (fp32).

    Each half step ``z' = z - logsumexp(z, dim)`` has the vector-Jacobian product
    ``dz = dz' - exp(z') * sum(dz', dim)``; the iterates are recomputed (``2 * iters`` tiny tensors).
    """
    z, outs = s0, []
    for _ in range(iters):
        for dim in (-1, -2):
            z = z - torch.logsumexp(z, dim=dim, keepdim=True)
            outs.append((z, dim))
    dz = grad * z.exp()
    for z_out, dim in reversed(outs):
        dz = dz - z_out.exp() * dz.sum(dim=dim, keepdim=True)
    return dz


def _gates_backward(logits, alpha, b_pre, b_post, b_res, g_pre, g_post, g_res, n, iters):
    """Backward of the gates and Sinkhorn of :func:`hc_rewrite.ops.reference.mhc_coeffs` after the logits.

    ``logits [T, 2n (+ n*n)]`` (fp32, reference column order) or ``None`` for the static form. Returns
    ``(d_logits or None, d_alpha or None, d_b_pre, d_b_post, d_b_res or None)``.
    """
    has_res = b_res is not None
    zero = b_pre.new_zeros(())
    if logits is None:
        lp = lq = lr = zero
        a = torch.zeros(3, dtype=torch.float32, device=b_pre.device)
    else:
        lp, lq = logits[:, :n], logits[:, n:2 * n]
        lr = logits[:, 2 * n:].unflatten(-1, (n, n)) if has_res else None
        a = alpha.float()
    s_pre = torch.sigmoid(a[0] * lp + b_pre.float())
    s_post = torch.sigmoid(a[1] * lq + b_post.float())
    d_pre = (g_pre if g_pre is not None else 0.0) * s_pre * (1.0 - s_pre)
    d_post = (g_post if g_post is not None else 0.0) * 2.0 * s_post * (1.0 - s_post)
    d_pre, d_post = d_pre.expand_as(s_pre), d_post.expand_as(s_post)
    d_res = None
    if has_res:
        s0 = (a[2] * lr + b_res.float()) if logits is not None else b_res.float()
        d_res = torch.zeros_like(s0) if g_res is None else _sinkhorn_backward(s0, g_res.float(), iters)
    if logits is None:
        return (None, None, d_pre.to(b_pre.dtype), d_post.to(b_post.dtype),
                None if d_res is None else d_res.to(b_res.dtype))
    parts = [a[0] * d_pre, a[1] * d_post]
    d_alpha = [(d_pre * lp).sum(), (d_post * lq).sum()]
    if has_res:
        parts.append((a[2] * d_res).flatten(1))
        d_alpha.append((d_res * lr).sum())
    return (torch.cat(parts, dim=-1), torch.stack(d_alpha).to(alpha.dtype), d_pre.sum(0).to(b_pre.dtype),
            d_post.sum(0).to(b_post.dtype), None if d_res is None else d_res.sum(0).to(b_res.dtype))


def _stream_backward(w2, phi, logits_pad, rstd, g_logits, n, has_res, hp=None, db=None, add=None):
    """``(dW [T, n*C], dphi)`` from ``d logits`` through the RMS norm and ``x @ phi`` (one pass)."""
    K = w2.shape[1]
    gp = _pad_cols(g_logits, n, has_res).contiguous()
    # dx = rstd * G @ phi^T - rstd^2 <G, logits> / K * x ;  dphi = sum_t x_t^T (rstd_t G_t)
    b = -(rstd * rstd) * (gp * logits_pad).sum(-1) / K
    coef = torch.stack([rstd, torch.zeros_like(rstd), b], dim=-1).contiguous()
    dx, dphi = proj_bwd(w2, gp, _pad_cols(phi.float(), n, has_res).contiguous(), coef,
                        hp, db, K // n, 1, add, split_for(w2.shape[0], K))
    return dx, _unpad_cols(dphi.sum(0), n, has_res).to(phi.dtype)


def _kernel_ok(w, phi, *rest) -> bool:
    return phi is not None and w.dim() >= 2 and use_triton(w, phi, *rest)


def _flat(w):
    T = flat_tokens(w.shape, 2)
    return w.reshape(T, w.shape[-2] * w.shape[-1]).contiguous()


def _static_coeffs(b_pre, b_post, b_res, iters):
    """Static mHC coefficients (fresh tensors: op outputs may not alias inputs)."""
    h_pre = torch.sigmoid(b_pre.float())
    h_post = 2.0 * torch.sigmoid(b_post.float())
    h_res = ref.sinkhorn_log(b_res, iters) if b_res is not None else h_post.new_empty(0)
    return h_pre, h_post, h_res


# ----------------------------------------------------------------------------- mhc_coeffs
@torch.library.triton_op("hc_fused::mhc_coeffs", mutates_args=())
def mhc_coeffs(w: torch.Tensor, phi: Optional[torch.Tensor], alpha: Optional[torch.Tensor], b_pre: torch.Tensor,
               b_post: torch.Tensor, b_res: Optional[torch.Tensor], eps: float, iters: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused ``hc_rewrite::mhc_coeffs`` (same schema; an empty ``h_res`` when ``b_res`` is None)."""
    if phi is None:
        return _static_coeffs(b_pre, b_post, b_res, iters)
    if not _kernel_ok(w, phi, alpha, b_pre, b_post, b_res):
        h_pre, h_post, h_res = ref.mhc_coeffs(w, phi, alpha, b_pre, b_post, b_res, eps, iters)
        return h_pre, h_post, h_res if h_res is not None else h_post.new_empty(0)
    n = w.shape[-2]
    lead = tuple(w.shape[:-2])
    phi_pad = _phi_arg(phi, n, b_res is not None, w.dtype)
    h_pre, h_post, h_res, *_ = mhc_fwd(_flat(w), phi_pad, alpha, b_pre, b_post, b_res, eps, iters, n,
                                       True, False, False, None, None, None)
    h_res = h_res.reshape(lead + (n, n)) if b_res is not None else h_res
    return h_pre.reshape(lead + (n,)), h_post.reshape(lead + (n,)), h_res


def _save_inputs(ctx, inputs, output, keep=()):
    """Save the tensor inputs (and the outputs at indices ``keep``); scalars go on ``ctx.scalars``."""
    tensors = [x if isinstance(x, torch.Tensor) else None for x in inputs]
    ctx.save_for_backward(*tensors, *[output[k] for k in keep])
    ctx.n_inputs = len(inputs)
    ctx.scalars = [None if isinstance(x, torch.Tensor) else x for x in inputs]


def _saved(ctx):
    """``(inputs, kept outputs)`` saved by :func:`_save_inputs`."""
    saved = ctx.saved_tensors
    return saved[:ctx.n_inputs], saved[ctx.n_inputs:]


def _coeff_grads_from_logits(w, phi, alpha, b_pre, b_post, b_res, eps, iters, g_pre, g_post, g_res,
                             logits_pad=None, rstd=None, hp=None, db=None, add=None):
    """All input gradients of the dynamic mHC coefficients (+ optional fused pre / extra stream grads)."""
    n = w.shape[-2]
    has_res = b_res is not None
    w2 = _flat(w)
    T = w2.shape[0]
    if logits_pad is None:
        phi_pad = _phi_arg(phi, n, has_res, w.dtype)
        _, _, _, logits_pad, rstd, _, _ = mhc_fwd(w2, phi_pad, alpha, b_pre, b_post, b_res, eps, iters, n,
                                                  False, True, False, None, None, None)
    flat = lambda g, core: None if g is None else g.reshape((T,) + core).float()  # noqa: E731
    g_log, d_alpha, d_bpre, d_bpost, d_bres = _gates_backward(
        _unpad_cols(logits_pad, n, has_res), alpha, b_pre, b_post, b_res,
        flat(g_pre, (n,)), flat(g_post, (n,)), flat(g_res, (n, n)) if has_res else None, n, iters)
    dw, dphi = _stream_backward(w2, phi, logits_pad, rstd, g_log, n, has_res, hp, db, add)
    return dw.reshape(w.shape), dphi, d_alpha, d_bpre, d_bpost, d_bres


def _mhc_coeffs_backward(ctx, g_pre, g_post, g_res):
    (w, phi, alpha, b_pre, b_post, b_res, _, _), _ = _saved(ctx)
    eps, iters = ctx.scalars[6], ctx.scalars[7]
    if b_res is None:
        g_res = None
    if phi is None:
        _, _, d_bpre, d_bpost, d_bres = _gates_backward(None, None, b_pre, b_post, b_res, g_pre, g_post, g_res,
                                                        b_pre.shape[0], iters)
        return None, None, None, d_bpre, d_bpost, d_bres, None, None
    if not _kernel_ok(w, phi, alpha, b_pre, b_post, b_res):
        fn = lambda *a: ref.mhc_coeffs(*a, eps, iters)  # noqa: E731
        return reference_grads(fn, (w, phi, alpha, b_pre, b_post, b_res), g_pre, g_post, g_res) + (None, None)
    grads = _coeff_grads_from_logits(w, phi, alpha, b_pre, b_post, b_res, eps, iters, g_pre, g_post, g_res)
    return grads + (None, None)


mhc_coeffs.register_autograd(_mhc_coeffs_backward, setup_context=_save_inputs)


# ----------------------------------------------------------------------------- mhc_pre (coeffs + pre)
@torch.library.triton_op("hc_fused::mhc_pre", mutates_args=())
def mhc_pre(w: torch.Tensor, phi: Optional[torch.Tensor], alpha: Optional[torch.Tensor], b_pre: torch.Tensor,
            b_post: torch.Tensor, b_res: Optional[torch.Tensor], eps: float, iters: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``mhc_coeffs`` and ``stream_pre`` of one site in one kernel.

    Returns ``(branch_in, h_pre, h_post, h_res, logits, rstd)``; the last two are the saved statistics
    for the backward (kernel layout, not differentiable; empty for the static form / fallback).
    """
    n = w.shape[-2]
    lead = tuple(w.shape[:-2])
    if not _kernel_ok(w, phi, alpha, b_pre, b_post, b_res):
        if phi is None:
            h_pre, h_post, h_res = _static_coeffs(b_pre, b_post, b_res, iters)
        else:
            h_pre, h_post, h_res = ref.mhc_coeffs(w, phi, alpha, b_pre, b_post, b_res, eps, iters)
            h_res = h_res if h_res is not None else h_post.new_empty(0)
        from .pre import stream_pre as fused_pre
        empty0 = h_post.new_empty(0)
        return fused_pre(w, h_pre), h_pre, h_post, h_res, empty0, empty0.clone()
    C = w.shape[-1]
    phi_pad = _phi_arg(phi, n, b_res is not None, w.dtype)
    h_pre, h_post, h_res, logits, rstd, branch, _ = mhc_fwd(
        _flat(w), phi_pad, alpha, b_pre, b_post, b_res, eps, iters, n, True, True, True, None, None, None)
    h_res = h_res.reshape(lead + (n, n)) if b_res is not None else h_res
    return (branch.reshape(lead + (C,)), h_pre.reshape(lead + (n,)), h_post.reshape(lead + (n,)), h_res,
            logits, rstd)


def _mhc_pre_setup(ctx, inputs, output):
    _save_inputs(ctx, inputs, output, keep=(1, 4, 5))  # h_pre, logits, rstd
    ctx.mark_non_differentiable(output[4], output[5])


def _pre_grads(w, h_pre, g_branch):
    """``<g_branch, W[i]>`` per token: the gradient of ``h_pre`` through the branch input."""
    n, C = w.shape[-2], w.shape[-1]
    T = flat_tokens(w.shape, 2)
    _, dm, _, _ = mix_bwd(g_branch.reshape(T, 1, C).contiguous(), w.reshape(T, n, C).contiguous(),
                          h_pre.reshape(T, 1, n).contiguous(), False, None, None, False)
    return dm.reshape(h_pre.shape)


def _mhc_pre_backward(ctx, g_branch, g_pre, g_post, g_res, _g_logits, _g_rstd):
    (w, phi, alpha, b_pre, b_post, b_res, _, _), (h_pre, logits, rstd) = _saved(ctx)
    eps, iters = ctx.scalars[6], ctx.scalars[7]
    if b_res is None:
        g_res = None
    if not _kernel_ok(w, phi, alpha, b_pre, b_post, b_res):
        def fn(w_, phi_, alpha_, b_pre_, b_post_, b_res_):
            if phi_ is None:
                hp, hq, hr = _static_coeffs(b_pre_, b_post_, b_res_, iters)
            else:
                hp, hq, hr = ref.mhc_coeffs(w_, phi_, alpha_, b_pre_, b_post_, b_res_, eps, iters)
            return ref.stream_pre(w_, hp), hp, hq, hr
        return reference_grads(fn, (w, phi, alpha, b_pre, b_post, b_res), g_branch, g_pre, g_post,
                                g_res) + (None, None)
    n, C = w.shape[-2], w.shape[-1]
    T = flat_tokens(w.shape, 2)
    g_branch = None if g_branch is None else g_branch.reshape(T, C).contiguous()
    if g_branch is not None:
        extra = _pre_grads(w, h_pre, g_branch)
        g_pre = extra if g_pre is None else g_pre + extra
    hp = None if g_branch is None else h_pre.reshape(T, n).contiguous()
    grads = _coeff_grads_from_logits(w, phi, alpha, b_pre, b_post, b_res, eps, iters, g_pre, g_post, g_res,
                                     logits, rstd, hp, g_branch)
    return grads + (None, None)


mhc_pre.register_autograd(_mhc_pre_backward, setup_context=_mhc_pre_setup)


# ----------------------------------------------------------------------------- post + next pre
def _post_pre_args(w, y, h_post, h_res, phi, alpha, b_pre, b_post, b_res):
    """``(h_post [T, n] | [n], h_res [T, n, n] | [n, n] | None)`` for the kernel, or ``None``: reference."""
    if not _kernel_ok(w, phi, y, h_post, h_res, alpha, b_pre, b_post, b_res):
        return None
    n, C = w.shape[-2], w.shape[-1]
    lead = tuple(w.shape[:-2])
    hp = coeff_view(h_post, lead, (n,))
    hr = coeff_view(h_res, lead, (n, n)) if h_res is not None else None
    if hp is None or (h_res is not None and hr is None):
        return None
    if tuple(y.shape[:-1]) != lead or y.shape[-1] not in (C, n * C):
        return None
    return hp, hr


@torch.library.triton_op("hc_fused::mhc_post_pre", mutates_args=())
def mhc_post_pre(w: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: Optional[torch.Tensor],
                 phi: torch.Tensor, alpha: torch.Tensor, b_pre: torch.Tensor, b_post: torch.Tensor,
                 b_res: Optional[torch.Tensor], eps: float, iters: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                            torch.Tensor]:
    """``stream_post`` of one site fused with ``mhc_coeffs`` + ``stream_pre`` of the next (dynamic mHC).

    ``W1 = stream_post(w, y, h_post, h_res)``; returns ``(W1, branch_in, h_pre, h_post, h_res, logits,
    rstd)`` of the next site, whose parameters are ``phi, alpha, b_pre, b_post, b_res``.
    """
    n, C = w.shape[-2], w.shape[-1]
    lead = tuple(w.shape[:-2])
    args = _post_pre_args(w, y, h_post, h_res, phi, alpha, b_pre, b_post, b_res)
    if args is None:
        from .post import stream_post as fused_post
        w1 = fused_post(w, y, h_post, h_res)
        return (w1,) + tuple(mhc_pre(w1, phi, alpha, b_pre, b_post, b_res, eps, iters))
    hp, hr = args
    T = flat_tokens(w.shape, 2)
    phi_pad = _phi_arg(phi, n, b_res is not None, w.dtype)
    h_pre1, h_post1, h_res1, logits, rstd, branch, w1 = mhc_fwd(
        _flat(w), phi_pad, alpha, b_pre, b_post, b_res, eps, iters, n, True, True, True,
        y.reshape(T, y.shape[-1]).contiguous(), hp, hr)
    h_res1 = h_res1.reshape(lead + (n, n)) if b_res is not None else h_res1
    return (w1.reshape(w.shape), branch.reshape(lead + (C,)), h_pre1.reshape(lead + (n,)),
            h_post1.reshape(lead + (n,)), h_res1, logits, rstd)


def _post_pre_setup(ctx, inputs, output):
    _save_inputs(ctx, inputs, output, keep=(0, 2, 5, 6))  # W1, h_pre, logits, rstd
    ctx.mark_non_differentiable(output[5], output[6])


def _post_pre_backward(ctx, g_w1, g_branch, g_pre, g_post, g_res, _g_logits, _g_rstd):
    (w, y, h_post, h_res, phi, alpha, b_pre, b_post, b_res, _, _), (w1, h_pre1, logits, rstd) = _saved(ctx)
    eps, iters = ctx.scalars[9], ctx.scalars[10]
    if b_res is None:
        g_res = None
    n, C = w.shape[-2], w.shape[-1]
    T = flat_tokens(w.shape, 2)
    if _post_pre_args(w, y, h_post, h_res, phi, alpha, b_pre, b_post, b_res) is None:
        # the forward ran the reference: differentiate the reference composition
        def fn(w_, y_, hp_, hr_, phi_, alpha_, b_pre_, b_post_, b_res_):
            w1_ = ref.stream_post(w_, y_, hp_, hr_)
            hp1, hq1, hr1 = ref.mhc_coeffs(w1_, phi_, alpha_, b_pre_, b_post_, b_res_, eps, iters)
            return w1_, ref.stream_pre(w1_, hp1), hp1, hq1, hr1
        return reference_grads(fn, (w, y, h_post, h_res, phi, alpha, b_pre, b_post, b_res), g_w1, g_branch,
                                g_pre, g_post, g_res) + (None, None)
    # 1. the next site's coefficients and pre, as in mhc_pre; the incoming d W1 is added in the same pass
    g_b = None if g_branch is None else g_branch.reshape(T, C).contiguous()
    if g_b is not None:
        extra = _pre_grads(w1, h_pre1, g_b)
        g_pre = extra if g_pre is None else g_pre + extra
    hp1 = None if g_b is None else h_pre1.reshape(T, n).contiguous()
    add = None if g_w1 is None else g_w1.reshape(T, n * C).contiguous()
    dw1, dphi, d_alpha, d_bpre, d_bpost, d_bres = _coeff_grads_from_logits(
        w1, phi, alpha, b_pre, b_post, b_res, eps, iters, g_pre, g_post, g_res, logits, rstd, hp1, g_b, add)
    # 2. the post of the previous site
    hp, hr = _post_pre_args(w, y, h_post, h_res, phi, alpha, b_pre, b_post, b_res)
    y2 = y.reshape(T, y.shape[-1]).contiguous()
    dw, dm, dhp, dy = mix_bwd(dw1.reshape(T, n, C).contiguous(), w.reshape(T, n, C).contiguous(), hr, False,
                              hp, y2, True)
    dw = dw1 if hr is None else dw.reshape(w.shape)
    dres = None if h_res is None else reduce_static(dm, h_res)
    return (dw.reshape(w.shape), dy.reshape(y.shape), reduce_static(dhp, h_post), dres, dphi, d_alpha,
            d_bpre, d_bpost, d_bres, None, None)


mhc_post_pre.register_autograd(_post_pre_backward, setup_context=_post_pre_setup)
