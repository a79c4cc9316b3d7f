"""HC: Hyper-Connections (arXiv 2409.19606).

``n`` copies of the stream; static width / depth connections ``A_m`` (branch input weights), ``A_r``
(residual mixing), ``B`` (branch output weights) plus ``s * tanh(norm(W) @ W_*)`` per token when dynamic
(:func:`hc_rewrite.ops.reference.hc_coeffs`).

Function-preserving init: the paper's, ``A_m = e_(k mod n)`` for the site at position ``k``, ``A_r = I``,
``B = 1``, dynamic weights 0, identical copies: every copy stays the original stream at init, and the
one-hot ``A_m`` breaks the symmetry as training starts. The tanh scale is fixed at 0.01.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops import reference as ref
from .base import ConnectionParams, OpDef, Variant


class HCParams(ConnectionParams):
    """``a_m [n]``, ``a_r [n, n]``, ``b [n]``; dynamic: ``w_m [C]``, ``w_r [C, n]``, ``w_b [C]``."""

    variant = "hc"
    coeff_inputs = ("a_m", "a_r", "b", "w_m", "w_r", "w_b")

    def __init__(self, n, width, dynamic, index=0, dtype=None, device=None):
        super().__init__(n, width, dynamic)
        self.index = index
        kw = {"dtype": dtype, "device": device}
        self.a_m = nn.Parameter(torch.empty(n, **kw))
        self.a_r = nn.Parameter(torch.empty(n, n, **kw))
        self.b = nn.Parameter(torch.empty(n, **kw))
        if dynamic:
            self.w_m = nn.Parameter(torch.empty(width, **kw))
            self.w_r = nn.Parameter(torch.empty(width, n, **kw))
            self.w_b = nn.Parameter(torch.empty(width, **kw))
        else:
            for name in ("w_m", "w_r", "w_b"):
                self.register_parameter(name, None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator=None) -> None:
        """The function-preserving init, in place (any device): the branch reads copy ``index % n``."""
        self.a_m.zero_()
        self.a_m[self.index % self.n] = 1.0
        self.a_r.copy_(torch.eye(self.n))
        self.b.fill_(1.0)
        for p in (self.w_m, self.w_r, self.w_b):
            if p is not None:
                p.zero_()


class HC(Variant):
    name = "hc"
    summary = "Hyper-Connections (arXiv 2409.19606)"
    params = HCParams
    coeff_name, pre_name = "hc_coeffs", "stream_pre"
    own_ops = {
        "hc_coeffs": OpDef(
            "hc_coeffs(Tensor w, Tensor a_m, Tensor a_r, Tensor b, Tensor? w_m, Tensor? w_r, Tensor? w_b) "
            "-> (Tensor, Tensor, Tensor)", ref.hc_coeffs),
    }
    fused_ops = ("hc_coeffs", "stream_pre", "stream_post")
    kernel_modules = ("post", "pre", "hc_frac")
    fused_pre = "hc_pre"

    def new_params(self, spec, row_width, index, is_last, generator, **kw):
        return HCParams(spec.n, row_width, spec.dynamic, index=index, **kw)


VARIANT = HC()
