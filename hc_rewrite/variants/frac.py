"""Frac: Frac-connections (arXiv 2503.14125).

The stream is split into ``m = n`` fractions of width ``d / m`` (no copy, no memory growth); the connection
matrix ``[[0, B], [Y, A]]`` mixes the fractions into the branch input (``Y``), mixes the stream (``A``) and
weights each fraction of the branch output (``B``), plus ``s * tanh(norm(W) @ W_*)`` per token when dynamic
(:func:`hc_rewrite.ops.reference.frac_coeffs`).

Function-preserving init: ``Y = I``, ``A = I``, ``B = 1``, dynamic weights 0: the branch input is the
concatenation of the fractions, which is the original stream, and the site output is ``x + y`` exactly.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SpecError
from ..ops import reference as ref
from .base import ConnectionParams, OpDef, Variant


class FracParams(ConnectionParams):
    """``n`` is the number of fractions m; ``width`` the fraction width d/m. ``y [m, m]``, ``a [m, m]``,
    ``b [m]``; dynamic: ``w_y [d/m, m]``, ``w_a [d/m, m]``, ``w_b [d/m]``."""

    variant = "frac"
    coeff_inputs = ("y", "a", "b", "w_y", "w_a", "w_b")

    def __init__(self, n, width, dynamic, dtype=None, device=None):
        super().__init__(n, width, dynamic)
        kw = {"dtype": dtype, "device": device}
        self.y = nn.Parameter(torch.empty(n, n, **kw))
        self.a = nn.Parameter(torch.empty(n, n, **kw))
        self.b = nn.Parameter(torch.empty(n, **kw))
        if dynamic:
            self.w_y = nn.Parameter(torch.empty(width, n, **kw))
            self.w_a = nn.Parameter(torch.empty(width, n, **kw))
            self.w_b = nn.Parameter(torch.empty(width, **kw))
        else:
            for name in ("w_y", "w_a", "w_b"):
                self.register_parameter(name, None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator=None) -> None:
        """The function-preserving init, in place (any device)."""
        self.y.copy_(torch.eye(self.n))
        self.a.copy_(torch.eye(self.n))
        self.b.fill_(1.0)
        for p in (self.w_y, self.w_a, self.w_b):
            if p is not None:
                p.zero_()


class Frac(Variant):
    name = "frac"
    summary = "Frac-connections (arXiv 2503.14125)"
    params = FracParams
    split = True
    expand_name, reduce_name = "split_fractions", "merge_fractions"
    coeff_name, pre_name = "frac_coeffs", "frac_pre"
    own_ops = {
        "split_fractions": OpDef("split_fractions(Tensor x, int m) -> Tensor",
                                 lambda x, m: ref.split_fractions(x, m).clone()),
        "merge_fractions": OpDef("merge_fractions(Tensor w) -> Tensor", lambda w: ref.merge_fractions(w).clone()),
        "frac_coeffs": OpDef(
            "frac_coeffs(Tensor w, Tensor y, Tensor a, Tensor b, Tensor? w_y, Tensor? w_a, Tensor? w_b) "
            "-> (Tensor, Tensor, Tensor)", ref.frac_coeffs),
        "frac_pre": OpDef("frac_pre(Tensor w, Tensor y) -> Tensor", ref.frac_pre),
    }
    fused_ops = ("frac_coeffs", "frac_pre", "stream_post")
    kernel_modules = ("post", "pre", "hc_frac")
    fused_pre = "frac_pre_coeffs"

    def check_width(self, n, width, where):
        if width % n != 0:
            raise SpecError(
                f"variant='frac' with n={n} fractions does not fit {where}: its width d={width} "
                f"is not divisible by {n} (d % n = {width % n})"
            )

    def new_params(self, spec, row_width, index, is_last, generator, **kw):
        return FracParams(spec.n, row_width, spec.dynamic, **kw)


VARIANT = Frac()
