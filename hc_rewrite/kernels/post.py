"""Fused ``stream_post`` (mHC / HC / Frac): ``W' = h_res @ W + h_post * y`` in one pass over the stream.

``y`` is the branch output, broadcast to every copy (mHC / HC, ``y [T, C]``) or split into the fractions
(Frac, ``y [T, n*C]``); ``h_res`` may be ``None`` (identity). Reads ``n*C + C``, writes ``n*C`` elements per
token. The kernel is the shared mixing kernel of :mod:`.mix`.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..ops import reference as ref
from ._common import coeff_view, flat_tokens, reduce_static, reference_grads, use_triton
from .mix import mix_bwd, mix_fwd


# ----------------------------------------------------------------------------- stream_post
def _post_args(w, y, h_post, h_res):
    """Flattened kernel arguments of ``stream_post``, or ``None`` when the shapes need the reference."""
    n, C = w.shape[-2], w.shape[-1]
    lead = tuple(w.shape[:-2])
    if tuple(y.shape[:-1]) != lead or y.shape[-1] not in (C, n * C):
        return None
    hp = coeff_view(h_post, lead, (n,))
    hr = coeff_view(h_res, lead, (n, n)) if h_res is not None else None
    if hp is None or (h_res is not None and hr is None):
        return None
    T = flat_tokens(w.shape, 2)
    return w.reshape(T, n, C).contiguous(), y.reshape(T, y.shape[-1]).contiguous(), hp, hr


@torch.library.triton_op("hc_fused::stream_post", mutates_args=())
def stream_post(w: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor,
                h_res: Optional[torch.Tensor]) -> torch.Tensor:
    """Fused :func:`hc_rewrite.ops.reference.stream_post`: ``W' = h_res @ W + h_post * y`` in one pass."""
    args = _post_args(w, y, h_post, h_res) if use_triton(w, y, h_post, h_res) else None
    if args is None:
        return ref.stream_post(w, y, h_post, h_res).clone()
    w2, y2, hp, hr = args
    return mix_fwd(w2, hr, False, hp, y2, w.shape[-2]).reshape(w.shape)


def _post_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _post_backward(ctx, grad):
    w, y, h_post, h_res = ctx.saved_tensors
    args = _post_args(w, y, h_post, h_res) if use_triton(w, y, h_post, h_res, grad) else None
    if args is None:
        return reference_grads(ref.stream_post, (w, y, h_post, h_res), grad)
    w2, y2, hp, hr = args
    T, n, C = w2.shape
    dw, dm, dhp, dy = mix_bwd(grad.reshape(T, n, C).contiguous(), w2, hr, False, hp, y2, True)
    dw = grad if hr is None else dw.reshape(w.shape)
    dres = None if h_res is None else reduce_static(dm, h_res)
    return dw, dy.reshape(y.shape), reduce_static(dhp, h_post), dres


stream_post.register_autograd(_post_backward, setup_context=_post_setup)
