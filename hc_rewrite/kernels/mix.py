"""The stream mixing kernel shared by the post and pre ops: one per-token mixing of the ``NIN`` rows of the
stream ``w [T, NIN, C]``::

    out[t, i, :] = sum_j M[t, i, j] * w[t, j, :]  (+ hp[t, i] * y[t, (i), :])     i < NOUT

Its users: :mod:`.post` (``stream_post``: ``M = h_res``, ``hp = h_post``, ``y`` the branch output) and
:mod:`.pre` (``stream_pre``: ``NOUT = 1``, ``M = h_pre[None]``; ``frac_pre``: ``M = Y^T``), and the
backward passes of :mod:`.mhc` and :mod:`.hc_frac`.

Coefficients are rounded to the stream dtype first, as the reference does, and everything accumulates in
fp32 (fp64 for fp64 streams). The backward is one pass too: it reads ``g``, ``w`` (and ``y``) and writes
``dw = M^T g`` (and ``dy``), with the per-token coefficient gradients ``dM = g w^T``, ``dhp = <g, y>``
reduced on chip; static (broadcast) coefficients get their per-token gradients summed over tokens (by the
caller, :func:`._common.reduce_static`).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import empty, pow2, wrap_triton

# Tile sizes (untuned heuristics: BT tokens x BC features per program).
_FWD_BT, _FWD_BC, _FWD_WARPS = 4, 256, 4
_BWD_BT, _BWD_BC, _BWD_WARPS = 4, 128, 8


@triton.jit
def _mix_fwd_kernel(w_ptr, m_ptr, hp_ptr, y_ptr, out_ptr, T, C,
                    m_st, m_si, m_sj, hp_st, hp_si,
                    NIN: tl.constexpr, NOUT: tl.constexpr, NOP: tl.constexpr,
                    HAS_M: tl.constexpr, HAS_Y: tl.constexpr, Y_SPLIT: tl.constexpr, F64: tl.constexpr,
                    BT: tl.constexpr, BC: tl.constexpr):
    t = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    o = tl.arange(0, NOP)
    tm, cm, om = t < T, c < C, o < NOUT
    m2 = tm[:, None] & cm[None, :]
    to_m = tm[:, None] & om[None, :]
    t3, o3, c3 = t[:, None, None], o[None, :, None], c[None, None, :]
    m3 = tm[:, None, None] & om[None, :, None] & cm[None, None, :]
    wdt = w_ptr.dtype.element_ty
    if F64:  # fp64 streams (interpreter tests): accumulate in fp64, else fp32
        acc = tl.zeros([BT, NOP, BC], dtype=tl.float64)
    else:
        acc = tl.zeros([BT, NOP, BC], dtype=tl.float32)
    ACC = acc.dtype
    for j in tl.static_range(NIN):
        x = tl.load(w_ptr + t[:, None] * (NIN * C) + j * C + c[None, :], mask=m2, other=0.0).to(ACC)
        if HAS_M:
            mj = tl.load(m_ptr + t[:, None] * m_st + o[None, :] * m_si + j * m_sj, mask=to_m, other=0.0)
            acc += mj.to(wdt).to(ACC)[:, :, None] * x[:, None, :]
        else:
            acc += tl.where(o3 == j, x[:, None, :], 0.0)
    if HAS_Y:
        hp = tl.load(hp_ptr + t[:, None] * hp_st + o[None, :] * hp_si, mask=to_m, other=0.0)
        hp = hp.to(wdt).to(ACC)
        if Y_SPLIT:
            yv = tl.load(y_ptr + t3 * (NOUT * C) + o3 * C + c3, mask=m3, other=0.0).to(ACC)
            acc += hp[:, :, None] * yv
        else:
            yv = tl.load(y_ptr + t[:, None] * C + c[None, :], mask=m2, other=0.0).to(ACC)
            acc += hp[:, :, None] * yv[:, None, :]
    tl.store(out_ptr + t3 * (NOUT * C) + o3 * C + c3, acc.to(out_ptr.dtype.element_ty), mask=m3)


@triton.jit
def _mix_bwd_kernel(g_ptr, w_ptr, m_ptr, hp_ptr, y_ptr, dw_ptr, dm_ptr, dhp_ptr, dy_ptr, T, C,
                    m_st, m_si, m_sj, hp_st, hp_si,
                    NIN: tl.constexpr, NOUT: tl.constexpr, NIP: tl.constexpr, NOP: tl.constexpr,
                    HAS_M: tl.constexpr, HAS_Y: tl.constexpr, Y_SPLIT: tl.constexpr, NEED_DW: tl.constexpr,
                    F64: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    t = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    o = tl.arange(0, NOP)
    jj = tl.arange(0, NIP)
    tm, om, jm = t < T, o < NOUT, jj < NIN
    to_m = tm[:, None] & om[None, :]
    t3, o3 = t[:, None, None], o[None, :, None]
    wdt = w_ptr.dtype.element_ty
    if F64:
        dm = tl.zeros([BT, NOP, NIP], dtype=tl.float64)
        dhp = tl.zeros([BT, NOP], dtype=tl.float64)
    else:
        dm = tl.zeros([BT, NOP, NIP], dtype=tl.float32)
        dhp = tl.zeros([BT, NOP], dtype=tl.float32)
    ACC = dm.dtype
    if HAS_Y:
        hp = tl.load(hp_ptr + t[:, None] * hp_st + o[None, :] * hp_si, mask=to_m, other=0.0)
        hp = hp.to(wdt).to(ACC)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        cm = c < C
        m2 = tm[:, None] & cm[None, :]
        c3 = c[None, None, :]
        m3 = tm[:, None, None] & om[None, :, None] & cm[None, None, :]
        g = tl.load(g_ptr + t3 * (NOUT * C) + o3 * C + c3, mask=m3, other=0.0).to(ACC)
        for j in tl.static_range(NIN):
            if HAS_M:
                x = tl.load(w_ptr + t[:, None] * (NIN * C) + j * C + c[None, :], mask=m2, other=0.0).to(ACC)
                part = tl.sum(g * x[:, None, :], axis=2)
                dm += tl.where(jj[None, None, :] == j, part[:, :, None], 0.0)
                if NEED_DW:
                    mj = tl.load(m_ptr + t[:, None] * m_st + o[None, :] * m_si + j * m_sj, mask=to_m, other=0.0)
                    dwj = tl.sum(mj.to(wdt).to(ACC)[:, :, None] * g, axis=1)
                    tl.store(dw_ptr + t[:, None] * (NIN * C) + j * C + c[None, :],
                             dwj.to(dw_ptr.dtype.element_ty), mask=m2)
        if HAS_Y:
            if Y_SPLIT:
                yv = tl.load(y_ptr + t3 * (NOUT * C) + o3 * C + c3, mask=m3, other=0.0).to(ACC)
                dhp += tl.sum(g * yv, axis=2)
                tl.store(dy_ptr + t3 * (NOUT * C) + o3 * C + c3,
                         (hp[:, :, None] * g).to(dy_ptr.dtype.element_ty), mask=m3)
            else:
                yv = tl.load(y_ptr + t[:, None] * C + c[None, :], mask=m2, other=0.0).to(ACC)
                dhp += tl.sum(g * yv[:, None, :], axis=2)
                tl.store(dy_ptr + t[:, None] * C + c[None, :],
                         tl.sum(hp[:, :, None] * g, axis=1).to(dy_ptr.dtype.element_ty), mask=m2)
    if HAS_M:
        # dm is stored in the layout of m: [T, NOUT, NIN], or [T, NIN, NOUT] when m was given transposed
        tl.store(dm_ptr + t3 * (NOUT * NIN) + o3 * m_si + jj[None, None, :] * m_sj,
                 dm.to(dm_ptr.dtype.element_ty), mask=to_m[:, :, None] & jm[None, None, :])
    if HAS_Y:
        tl.store(dhp_ptr + t[:, None] * NOUT + o[None, :], dhp.to(dhp_ptr.dtype.element_ty), mask=to_m)


def _m_strides(m: Optional[torch.Tensor], m_t: bool, nin: int, nout: int):
    """Element strides (token, out row i, in row j) of ``M[t, i, j]`` for a contiguous ``m``."""
    if m is None:
        return 0, 0, 0
    st = 0 if m.dim() == 2 else nin * nout
    return (st, 1, nout) if m_t else (st, nin, 1)


# ----------------------------------------------------------------------------- kernel-level ops
@torch.library.triton_op("hc_fused::mix_fwd", mutates_args=())
def mix_fwd(w: torch.Tensor, m: Optional[torch.Tensor], m_t: bool, hp: Optional[torch.Tensor],
            y: Optional[torch.Tensor], nout: int) -> torch.Tensor:
    """``out[t, i] = sum_j M[t, i, j] w[t, j] + hp[t, i] y[t, (i)]`` for ``w [T, NIN, C]`` (see module doc).

    ``m``: ``[T, NOUT, NIN]`` or static ``[NOUT, NIN]`` (``[.., NIN, NOUT]`` storage when ``m_t``), or
    ``None`` for the identity (``nout == NIN``). ``hp``: ``[T, NOUT]`` or static ``[NOUT]``; ``y``:
    ``[T, C]`` (broadcast) or ``[T, NOUT * C]`` (split). All contiguous.
    """
    T, nin, C = w.shape
    out = empty((T, nout, C), w.dtype, w.device)
    m_st, m_si, m_sj = _m_strides(m, m_t, nin, nout)
    has_y = y is not None
    hp_st = 0 if (hp is None or hp.dim() == 1) else nout
    grid = (triton.cdiv(T, _FWD_BT), triton.cdiv(C, _FWD_BC))
    wrap_triton(_mix_fwd_kernel)[grid](
        w, w if m is None else m, w if hp is None else hp, w if y is None else y, out, T, C,
        m_st, m_si, m_sj, hp_st, 1,
        NIN=nin, NOUT=nout, NOP=pow2(nout), HAS_M=m is not None, HAS_Y=has_y,
        Y_SPLIT=has_y and y.shape[-1] != C, F64=w.dtype == torch.float64, BT=_FWD_BT, BC=_FWD_BC,
        num_warps=_FWD_WARPS,
    )
    return out


@torch.library.triton_op("hc_fused::mix_bwd", mutates_args=())
def mix_bwd(g: torch.Tensor, w: torch.Tensor, m: Optional[torch.Tensor], m_t: bool,
            hp: Optional[torch.Tensor], y: Optional[torch.Tensor], need_dw: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`mix_fwd` for ``g = d out [T, NOUT, C]``: ``(dw, dm, dhp, dy)``.

    ``dm`` / ``dhp`` are per token (``[T, *m.shape[-2:]]``, ``[T, NOUT]``) in fp32 (fp64 for fp64), even for
    static coefficients: the caller sums them. ``dw`` is empty unless ``need_dw`` and ``m`` is given (for
    the identity ``dw = g``); ``dm`` / ``dhp`` / ``dy`` are empty when ``m`` / ``y`` is ``None``.
    """
    T, nout, C = g.shape
    nin = w.shape[1]
    cdt = torch.float64 if w.dtype == torch.float64 else torch.float32
    has_m, has_y = m is not None, y is not None
    dw = empty((T, nin, C) if (need_dw and has_m) else (0,), w.dtype, w.device)
    dm = empty((T,) + tuple(m.shape[-2:]) if has_m else (0,), cdt, w.device)
    dhp = empty((T, nout) if has_y else (0,), cdt, w.device)
    dy = empty(tuple(y.shape) if has_y else (0,), y.dtype if has_y else w.dtype, w.device)
    m_st, m_si, m_sj = _m_strides(m, m_t, nin, nout)
    hp_st = 0 if (hp is None or hp.dim() == 1) else nout
    grid = (triton.cdiv(T, _BWD_BT),)
    wrap_triton(_mix_bwd_kernel)[grid](
        g, w, w if m is None else m, w if hp is None else hp, w if y is None else y,
        dw, dm, dhp, dy, T, C, m_st, m_si, m_sj, hp_st, 1,
        NIN=nin, NOUT=nout, NIP=pow2(nin), NOP=pow2(nout), HAS_M=has_m, HAS_Y=has_y,
        Y_SPLIT=has_y and y.shape[-1] != C, NEED_DW=need_dw and has_m, F64=w.dtype == torch.float64,
        BT=_BWD_BT, BC=_BWD_BC, num_warps=_BWD_WARPS,
    )
    return dw, dm, dhp, dy
