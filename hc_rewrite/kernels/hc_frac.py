"""Hyper-Connection and Frac-connection kernels: coefficients (static + tanh-gated dynamic terms) fused with
the pre.

Both variants compute, per token and copy / fraction ``i``, ``z = LayerNorm(W[i]) @ Wd`` (no affine,
``eps = 1e-5`` as ``F.layer_norm``) and add ``0.01 * tanh(z)`` to static coefficients. One program holds
``BT`` tokens x ``NP`` rows and loops once over the ``C`` features, accumulating the row sums, sums of
squares and ``W @ Wd`` (tensor cores, ``tf32x3``); the LayerNorm is applied afterwards,
``z = rstd * (W @ Wd - mean * colsum(Wd))``. ``Wd`` packs the dynamic weights in ``KP`` columns, groups of
``NP``: ``[Frac w_y | HC w_r, Frac w_a | HC w_m, w_b, 0 ...]``.

HC: ``h_pre[i] = a_m[i] + t[i, w_m]``, ``h_post[i] = b[i] + t[i, w_b]``, ``h_res[j, i] = a_r[i, j] + t[i, w_r_j]``.
Frac: ``h_pre[i, j] = y[i, j] + t[i, w_y_j]``, ``h_res[j, i] = a[i, j] + t[i, w_a_j]``, ``h_post[i] = b[i] + t[i, w_b]``.

With ``PRE`` a second loop writes the branch input: ``sum_i h_pre[i] W[i]`` (HC) or
``concat_i sum_j Y[j, i] W[j]`` (Frac). The backward recomputes (or, for the fused ops, reads the saved)
``z`` and row statistics, differentiates the tanh on ``[T, n, KP]`` in torch and writes ``dW`` and
``dWd`` in one pass (:mod:`.proj`, LayerNorm form).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..ops import reference as ref
from ._common import empty, flat_tokens, pow2, reference_grads, use_triton, wrap_triton
from .mix import mix_bwd
from .pre import frac_pre as fused_frac_pre, stream_pre as fused_stream_pre
from .proj import proj_bwd, split_for

_BT, _BC, _WARPS = 16, 32, 8
_LN_EPS = 1e-5


@triton.jit
def _hcfrac_kernel(w_ptr, wd_ptr, s1_ptr, s2_ptr, s3_ptr,
                   hpre_ptr, hpost_ptr, hres_ptr, z_ptr, stat_ptr, branch_ptr,
                   T, C, scale, eps,
                   N: tl.constexpr, NP: tl.constexpr, KP: tl.constexpr, FRAC: tl.constexpr,
                   COEFFS: tl.constexpr, STATS: tl.constexpr, PRE: tl.constexpr,
                   BT: tl.constexpr, BC: tl.constexpr):
    rr = tl.arange(0, BT * NP)                              # rows: (token, copy) pairs
    t = (tl.program_id(0) * BT + rr // NP).to(tl.int64)     # token of each row
    i = rr % NP                                            # copy / fraction of each row
    rm = (t < T) & (i < N)
    k = tl.arange(0, KP)
    s1 = tl.zeros([BT * NP], dtype=tl.float32)
    s2 = tl.zeros([BT * NP], dtype=tl.float32)
    cs = tl.zeros([KP], dtype=tl.float32)
    u = tl.zeros([BT * NP, KP], dtype=tl.float32)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        cm = c < C
        x = tl.load(w_ptr + (t * N + i)[:, None] * C + c[None, :], mask=rm[:, None] & cm[None, :], other=0.0,
                    eviction_policy="evict_last").to(tl.float32)
        s1 += tl.sum(x, axis=1)
        s2 += tl.sum(x * x, axis=1)
        wd = tl.load(wd_ptr + c[:, None] * KP + k[None, :], mask=cm[:, None], other=0.0)
        cs += tl.sum(wd, axis=0)
        u = tl.dot(x, wd, u, input_precision="tf32x3")
    mean = s1 / C
    var = tl.maximum(s2 / C - mean * mean, 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    z = rstd[:, None] * (u - mean[:, None] * cs[None, :])
    if STATS:
        tl.store(z_ptr + (t * N + i)[:, None] * KP + k[None, :], z, mask=rm[:, None])
        tl.store(stat_ptr + (t * N + i) * 2, mean, mask=rm)
        tl.store(stat_ptr + (t * N + i) * 2 + 1, rstd, mask=rm)
    if COEFFS or PRE:
        # scale * tanh(z), overflow-free
        e = tl.exp(-2.0 * tl.abs(z))
        th = (1.0 - e) / (1.0 + e)
        th = scale * tl.where(z < 0, -th, th)
        j = tl.arange(0, NP)
        jm = j < N
        rj = rm[:, None] & jm[None, :]
        # one column per row: w_m (HC pre, col 2NP) and w_b (post, col 2NP + 1)
        d_post = tl.sum(tl.where(k[None, :] == 2 * NP + 1, th, 0.0), axis=1)
        h_post = tl.load(s3_ptr + i, mask=rm, other=0.0).to(tl.float32) + d_post
        # NP columns per row: w_r / w_a (group 1) and, for Frac, w_y (group 0)
        d_res = tl.sum(tl.where(k[None, None, :] == (NP + j)[None, :, None], th[:, None, :], 0.0), axis=2)
        h_res_t = tl.load(s2_ptr + i[:, None] * N + j[None, :], mask=rj, other=0.0).to(tl.float32) + d_res
        if FRAC:
            d_pre = tl.sum(tl.where(k[None, None, :] == j[None, :, None], th[:, None, :], 0.0), axis=2)
            h_pre = tl.load(s1_ptr + i[:, None] * N + j[None, :], mask=rj, other=0.0).to(tl.float32) + d_pre
        else:
            d_pre = tl.sum(tl.where(k[None, :] == 2 * NP, th, 0.0), axis=1)
            h_pre = tl.load(s1_ptr + i, mask=rm, other=0.0).to(tl.float32) + d_pre
        if COEFFS:
            tl.store(hpost_ptr + t * N + i, h_post, mask=rm)
            # h_res[t, j, i] = h_res_t[t, i, j]
            tl.store(hres_ptr + t[:, None] * (N * N) + j[None, :] * N + i[:, None], h_res_t, mask=rj)
            if FRAC:
                tl.store(hpre_ptr + t[:, None] * (N * N) + i[:, None] * N + j[None, :], h_pre, mask=rj)
            else:
                tl.store(hpre_ptr + t * N + i, h_pre, mask=rm)
        if PRE:
            wdt = w_ptr.dtype.element_ty
            tb = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
            tbm = tb < T
            ib = tl.arange(0, NP)
            ibm = ib < N
            if FRAC:
                y3 = tl.reshape(h_pre.to(wdt).to(tl.float32), [BT, NP, NP])    # [t, j, i]
            else:
                hq = tl.reshape(h_pre.to(wdt).to(tl.float32), [BT, NP])        # [t, i]
            cc = tl.arange(0, BC)
            nchunks = tl.cdiv(C, BC)
            for q in range(0, nchunks):
                c = (nchunks - 1 - q) * BC + cc
                cm = c < C
                m3 = tbm[:, None, None] & ibm[None, :, None] & cm[None, None, :]
                x = tl.load(w_ptr + (tb[:, None] * N + ib[None, :])[:, :, None] * C + c[None, None, :],
                            mask=m3, other=0.0, eviction_policy="evict_first").to(tl.float32)
                if FRAC:
                    out = tl.sum(y3[:, :, :, None] * x[:, :, None, :], axis=1)      # [t, i, c]
                    tl.store(branch_ptr + (tb[:, None] * N + ib[None, :])[:, :, None] * C + c[None, None, :],
                             out.to(branch_ptr.dtype.element_ty), mask=m3)
                else:
                    out = tl.sum(hq[:, :, None] * x, axis=1)
                    tl.store(branch_ptr + tb[:, None] * C + c[None, :], out.to(branch_ptr.dtype.element_ty),
                             mask=tbm[:, None] & cm[None, :])


def _kp(n: int):
    np_ = pow2(n, 2)
    return np_, max(16, pow2(3 * np_))


def _pack(n: int, frac: bool, mat1, mat2, vec_pre, vec_post) -> torch.Tensor:
    """Dynamic weights ``[C, ...]`` -> ``[C, KP]`` kernel layout (fp32)."""
    np_, kp = _kp(n)
    ref_t = mat2
    C = ref_t.shape[0]
    g0 = F.pad(mat1.float(), (0, np_ - n)) if frac else ref_t.new_zeros((C, np_), dtype=torch.float32)
    g1 = F.pad(mat2.float(), (0, np_ - n))
    pre = vec_pre.float()[:, None] if not frac else ref_t.new_zeros((C, 1), dtype=torch.float32)
    g2 = torch.cat([pre, vec_post.float()[:, None], ref_t.new_zeros((C, kp - 2 * np_ - 2), dtype=torch.float32)], -1)
    return torch.cat([g0, g1, g2], dim=-1).contiguous()


def _unpack(d: torch.Tensor, n: int, frac: bool):
    """Inverse of :func:`_pack` for gradients: ``(mat1 or None, mat2, vec_pre or None, vec_post)``."""
    np_, _ = _kp(n)
    return (d[:, :n] if frac else None, d[:, np_:np_ + n], None if frac else d[:, 2 * np_], d[:, 2 * np_ + 1])


# ----------------------------------------------------------------------------- kernel-level op
@torch.library.triton_op("hc_fused::hcfrac_fwd", mutates_args=())
def hcfrac_fwd(w: torch.Tensor, wd: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, s3: torch.Tensor,
               frac: bool, coeffs: bool, stats: bool, pre: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch on ``w [T, n, C]``: ``(h_pre, h_post, h_res, z [T, n, KP], stats [T, n, 2], branch)``,
    what was not asked for empty. ``s1, s2, s3``: the static ``a_m, a_r, b`` (HC) or ``y, a, b`` (Frac)."""
    T, n, C = w.shape
    np_, kp = _kp(n)
    dev = w.device
    f32 = torch.float32
    h_pre = empty(((T, n, n) if frac else (T, n)) if coeffs else (0,), f32, dev)
    h_post = empty((T, n) if coeffs else (0,), f32, dev)
    h_res = empty((T, n, n) if coeffs else (0,), f32, dev)
    z = empty((T, n, kp) if stats else (0,), f32, dev)
    st = empty((T, n, 2) if stats else (0,), f32, dev)
    branch = empty(((T, n * C) if frac else (T, C)) if pre else (0,), w.dtype, dev)
    grid = (triton.cdiv(T, _BT),)
    wrap_triton(_hcfrac_kernel)[grid](
        w, wd, s1, s2, s3, h_pre, h_post, h_res, z, st, branch, T, C, ref.DYNAMIC_SCALE, _LN_EPS,
        N=n, NP=np_, KP=kp, FRAC=frac, COEFFS=coeffs, STATS=stats, PRE=pre, BT=_BT, BC=_BC, num_warps=_WARPS,
    )
    return h_pre, h_post, h_res, z, st, branch


# ----------------------------------------------------------------------------- shared host pieces
def _dynamic(w, s1, s2, s3, d1, d2, d3) -> bool:
    return d1 is not None and d2 is not None and d3 is not None and use_triton(w, s1, s2, s3, d1, d2, d3)


def _wd(frac, n, d1, d2, d3):
    # HC: d1 = w_m [C], d2 = w_r [C, n], d3 = w_b [C];  Frac: d1 = w_y [C, m], d2 = w_a [C, m], d3 = w_b [C]
    return _pack(n, frac, d1 if frac else None, d2, None if frac else d1, d3)


def _reference(frac):
    return ref.frac_coeffs if frac else ref.hc_coeffs


def _static_outputs(frac, w, s1, s2, s3, d1, d2, d3):
    """Reference coefficients as fresh tensors (the reference returns the parameters themselves)."""
    return tuple(o.clone() for o in _reference(frac)(w, s1, s2, s3, d1, d2, d3))


def _run(frac, w, s1, s2, s3, d1, d2, d3, coeffs, stats, pre):
    n, C = w.shape[-2], w.shape[-1]
    T = flat_tokens(w.shape, 2)
    out = hcfrac_fwd(w.reshape(T, n, C).contiguous(), _wd(frac, n, d1, d2, d3), s1.contiguous(),
                     s2.contiguous(), s3.contiguous(), frac, coeffs, stats, pre)
    lead = tuple(w.shape[:-2])
    h_pre, h_post, h_res, z, st, branch = out
    if coeffs:
        h_pre = h_pre.reshape(lead + ((n, n) if frac else (n,)))
        h_post, h_res = h_post.reshape(lead + (n,)), h_res.reshape(lead + (n, n))
    if pre:
        branch = branch.reshape(lead + ((n * C,) if frac else (C,)))
    return h_pre, h_post, h_res, z, st, branch


def _grads(frac, w, s1, s2, s3, d1, d2, d3, g_pre, g_post, g_res, z=None, st=None, hp=None, db=None,
           add=None):
    """Gradients of all inputs of ``hc_coeffs`` / ``frac_coeffs`` (dynamic form), plus the optional fused
    pre term ``hp * db`` (HC) or extra stream gradient ``add`` (Frac)."""
    n, C = w.shape[-2], w.shape[-1]
    np_, kp = _kp(n)
    T = flat_tokens(w.shape, 2)
    R = T * n
    w3 = w.reshape(T, n, C).contiguous()
    wd = _wd(frac, n, d1, d2, d3)
    if z is None:
        _, _, _, z, st, _ = hcfrac_fwd(w3, wd, s1.contiguous(), s2.contiguous(), s3.contiguous(), frac,
                                        False, True, False)
    zero_n = w3.new_zeros((T, n), dtype=torch.float32)
    g_pre = (w3.new_zeros((T, n, n) if frac else (T, n), dtype=torch.float32) if g_pre is None
             else g_pre.reshape((T, n, n) if frac else (T, n)).float())
    g_post = zero_n if g_post is None else g_post.reshape(T, n).float()
    g_res_t = (w3.new_zeros((T, n, n), dtype=torch.float32) if g_res is None
               else g_res.reshape(T, n, n).float().transpose(-1, -2))
    # d(scale * tanh(z)) in the packed column layout
    g0 = F.pad(g_pre, (0, np_ - n)) if frac else w3.new_zeros((T, n, np_), dtype=torch.float32)
    g1 = F.pad(g_res_t, (0, np_ - n))
    vec_pre = zero_n if frac else g_pre
    g2 = torch.cat([vec_pre[..., None], g_post[..., None],
                    w3.new_zeros((T, n, kp - 2 * np_ - 2), dtype=torch.float32)], -1)
    gt = torch.cat([g0, g1, g2], dim=-1)
    th = torch.tanh(z)
    dz = (gt * ref.DYNAMIC_SCALE * (1.0 - th * th)).reshape(R, kp)
    zr = z.reshape(R, kp)
    mean, rstd = st.reshape(R, 2).unbind(-1)
    # LayerNorm backward: dx = rstd * dz @ Wd^T + a + b * x
    b = -(rstd * rstd) * (dz * zr).sum(-1) / C
    a = -rstd * (dz * wd.sum(0)).sum(-1) / C - b * mean
    coef = torch.stack([rstd, a, b], dim=-1).contiguous()
    dx, dwd = proj_bwd(w3.reshape(R, C), dz.contiguous(), wd, coef, hp, db, C, n, add, split_for(R, C))
    dwd = dwd.sum(0) - ((mean * rstd)[:, None] * dz).sum(0)[None, :]
    m1, m2, v_pre, v_post = _unpack(dwd, n, frac)
    if frac:  # (y, a, b, w_y, w_a, w_b)
        dd = (m1.to(d1.dtype), m2.to(d2.dtype), v_post.to(d3.dtype))
    else:     # (a_m, a_r, b, w_m, w_r, w_b)
        dd = (v_pre.to(d1.dtype), m2.to(d2.dtype), v_post.to(d3.dtype))
    ds = (g_pre.sum(0).to(s1.dtype), g_res_t.sum(0).to(s2.dtype), g_post.sum(0).to(s3.dtype))
    return (dx.reshape(w.shape),) + ds + dd


def _setup(ctx, inputs, output, keep=()):
    ctx.save_for_backward(*inputs, *[output[k] for k in keep])
    ctx.n_inputs = len(inputs)


def _coeffs_impl(frac, w, s1, s2, s3, d1, d2, d3):
    if not _dynamic(w, s1, s2, s3, d1, d2, d3):
        return _static_outputs(frac, w, s1, s2, s3, d1, d2, d3)
    h_pre, h_post, h_res, _, _, _ = _run(frac, w, s1, s2, s3, d1, d2, d3, True, False, False)
    return h_pre, h_post, h_res


def _coeffs_backward(frac):
    def backward(ctx, g_pre, g_post, g_res):
        inputs = ctx.saved_tensors
        if not _dynamic(*inputs):
            return reference_grads(_reference(frac), inputs, g_pre, g_post, g_res)
        return _grads(frac, *inputs, g_pre, g_post, g_res)
    return backward


def _pre_impl(frac, w, s1, s2, s3, d1, d2, d3):
    if not _dynamic(w, s1, s2, s3, d1, d2, d3):
        h_pre, h_post, h_res = _static_outputs(frac, w, s1, s2, s3, d1, d2, d3)
        e = h_post.new_empty(0)
        return (fused_frac_pre if frac else fused_stream_pre)(w, h_pre), h_pre, h_post, h_res, e, e.clone()
    h_pre, h_post, h_res, z, st, branch = _run(frac, w, s1, s2, s3, d1, d2, d3, True, True, True)
    return branch, h_pre, h_post, h_res, z, st


def _pre_setup(ctx, inputs, output):
    _setup(ctx, inputs, output, keep=(1, 4, 5))  # h_pre, z, stats
    ctx.mark_non_differentiable(output[4], output[5])


def _pre_backward(frac):
    pre_ref = ref.frac_pre if frac else ref.stream_pre

    def backward(ctx, g_branch, g_pre, g_post, g_res, _gz, _gst):
        saved = ctx.saved_tensors
        inputs, (h_pre, z, st) = saved[:ctx.n_inputs], saved[ctx.n_inputs:]
        w = inputs[0]
        if not _dynamic(*inputs):
            def fn(*a):
                h = _reference(frac)(*a)
                return (pre_ref(a[0], h[0]),) + tuple(h)
            return reference_grads(fn, inputs, g_branch, g_pre, g_post, g_res)
        n, C = w.shape[-2], w.shape[-1]
        T = flat_tokens(w.shape, 2)
        hp = db = add = None
        if g_branch is not None:
            w3 = w.reshape(T, n, C).contiguous()
            if frac:  # d W through the mixing goes in as `add`; d Y adds to the gradient of h_pre
                dw_pre, dm, _, _ = mix_bwd(g_branch.reshape(T, n, C).contiguous(), w3,
                                           h_pre.reshape(T, n, n).contiguous(), True, None, None, True)
                add = dw_pre.reshape(T * n, C)
            else:     # d W = h_pre[i] * g_branch is added inside the stream backward pass
                _, dm, _, _ = mix_bwd(g_branch.reshape(T, 1, C).contiguous(), w3,
                                      h_pre.reshape(T, 1, n).contiguous(), False, None, None, False)
                hp, db = h_pre.reshape(T * n, 1).contiguous(), g_branch.reshape(T, C).contiguous()
            extra = dm.reshape(h_pre.shape)
            g_pre = extra if g_pre is None else g_pre + extra
        return _grads(frac, *inputs, g_pre, g_post, g_res, z, st, hp, db, add)
    return backward


_T = torch.Tensor
_OT = Optional[torch.Tensor]


@torch.library.triton_op("hc_fused::hc_coeffs", mutates_args=())
def hc_coeffs(w: _T, a_m: _T, a_r: _T, b: _T, w_m: _OT, w_r: _OT, w_b: _OT) -> tuple[_T, _T, _T]:
    """Fused ``hc_rewrite::hc_coeffs`` (same schema)."""
    return _coeffs_impl(False, w, a_m, a_r, b, w_m, w_r, w_b)


@torch.library.triton_op("hc_fused::frac_coeffs", mutates_args=())
def frac_coeffs(w: _T, y: _T, a: _T, b: _T, w_y: _OT, w_a: _OT, w_b: _OT) -> tuple[_T, _T, _T]:
    """Fused ``hc_rewrite::frac_coeffs`` (same schema)."""
    return _coeffs_impl(True, w, y, a, b, w_y, w_a, w_b)


@torch.library.triton_op("hc_fused::hc_pre", mutates_args=())
def hc_pre(w: _T, a_m: _T, a_r: _T, b: _T, w_m: _OT, w_r: _OT, w_b: _OT) -> tuple[_T, _T, _T, _T, _T, _T]:
    """``hc_coeffs`` + ``stream_pre`` in one kernel: ``(branch_in, h_pre, h_post, h_res, z, stats)``, the
    last two saved for the backward (not differentiable; empty for the static form)."""
    return _pre_impl(False, w, a_m, a_r, b, w_m, w_r, w_b)


@torch.library.triton_op("hc_fused::frac_pre_coeffs", mutates_args=())
def frac_pre_coeffs(w: _T, y: _T, a: _T, b: _T, w_y: _OT, w_a: _OT, w_b: _OT) -> tuple[_T, _T, _T, _T, _T, _T]:
    """``frac_coeffs`` + ``frac_pre`` in one kernel: ``(branch_in, h_pre, h_post, h_res, z, stats)``."""
    return _pre_impl(True, w, y, a, b, w_y, w_a, w_b)


hc_coeffs.register_autograd(_coeffs_backward(False), setup_context=_setup)
frac_coeffs.register_autograd(_coeffs_backward(True), setup_context=_setup)
hc_pre.register_autograd(_pre_backward(False), setup_context=_pre_setup)
frac_pre_coeffs.register_autograd(_pre_backward(True), setup_context=_pre_setup)
