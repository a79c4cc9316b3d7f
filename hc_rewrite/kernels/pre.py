"""Fused pre ops, the branch input of a site, in one read of the stream (the mixing kernel of :mod:`.mix`).

* ``stream_pre`` (mHC / HC): ``sum_i h_pre[i] W[i]``, ``[.., n, C] -> [.., C]``. Reads ``n*C``, writes ``C``.
* ``frac_pre`` (Frac): ``concat_i sum_j Y[j, i] W[j]``, ``[.., m, C] -> [.., m*C]`` (``M = Y^T``, passed
  untransposed with swapped strides). Reads and writes ``m*C``.
"""
from __future__ import annotations

import torch

from ..ops import reference as ref
from ._common import coeff_view, flat_tokens, reduce_static, reference_grads, use_triton
from .mix import mix_bwd, mix_fwd


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


# ----------------------------------------------------------------------------- stream_pre
def _pre_args(w, h_pre):
    n, C = w.shape[-2], w.shape[-1]
    hp = coeff_view(h_pre, tuple(w.shape[:-2]), (n,))
    if hp is None:
        return None
    T = flat_tokens(w.shape, 2)
    return w.reshape(T, n, C).contiguous(), hp.unsqueeze(-2)  # M = h_pre as one output row


@torch.library.triton_op("hc_fused::stream_pre", mutates_args=())
def stream_pre(w: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """Fused :func:`hc_rewrite.ops.reference.stream_pre`: ``sum_i h_pre[i] W[i]``, one read of the stream."""
    args = _pre_args(w, h_pre) if use_triton(w, h_pre) else None
    if args is None:
        return ref.stream_pre(w, h_pre)
    w2, m = args
    return mix_fwd(w2, m.contiguous(), False, None, None, 1).reshape(w.shape[:-2] + w.shape[-1:])


def _pre_backward(ctx, grad):
    w, h_pre = ctx.saved_tensors
    args = _pre_args(w, h_pre) if use_triton(w, h_pre, grad) else None
    if args is None:
        return reference_grads(ref.stream_pre, (w, h_pre), grad)
    w2, m = args
    T, n, C = w2.shape
    dw, dm, _, _ = mix_bwd(grad.reshape(T, 1, C).contiguous(), w2, m.contiguous(), False, None, None, True)
    return dw.reshape(w.shape), reduce_static(dm, h_pre)


stream_pre.register_autograd(_pre_backward, setup_context=_save_inputs)


# ----------------------------------------------------------------------------- frac_pre
def _frac_pre_args(w, y):
    m_, C = w.shape[-2], w.shape[-1]
    ym = coeff_view(y, tuple(w.shape[:-2]), (m_, m_))
    if ym is None:
        return None
    T = flat_tokens(w.shape, 2)
    return w.reshape(T, m_, C).contiguous(), ym


@torch.library.triton_op("hc_fused::frac_pre", mutates_args=())
def frac_pre(w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fused :func:`hc_rewrite.ops.reference.frac_pre`: ``concat_i sum_j Y[j, i] W[j]``, one pass."""
    args = _frac_pre_args(w, y) if use_triton(w, y) else None
    if args is None:
        return ref.frac_pre(w, y)
    w2, ym = args
    out = mix_fwd(w2, ym, True, None, None, w.shape[-2])
    return out.reshape(w.shape[:-2] + (w.shape[-2] * w.shape[-1],))


def _frac_pre_backward(ctx, grad):
    w, y = ctx.saved_tensors
    args = _frac_pre_args(w, y) if use_triton(w, y, grad) else None
    if args is None:
        return reference_grads(ref.frac_pre, (w, y), grad)
    w2, ym = args
    T, m_, C = w2.shape
    dw, dm, _, _ = mix_bwd(grad.reshape(T, m_, C).contiguous(), w2, ym, True, None, None, True)
    return dw.reshape(w.shape), reduce_static(dm, y)


frac_pre.register_autograd(_frac_pre_backward, setup_context=_save_inputs)
