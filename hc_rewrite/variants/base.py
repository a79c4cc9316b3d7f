"""What a connection variant declares, and the site math written once in terms of those declarations.

A variant (:mod:`.mhc`, :mod:`.hc`, :mod:`.frac`) is a :class:`Variant` subclass that names

* its parameter module (:class:`ConnectionParams`, one per residual site, ``hc.s<stream>_<position>``) and its
  function-preserving initialisation;
* how a stream is widened and reduced (the expand / reduce ops and their extra arguments) and its layout:
  ``n`` copies of the stream (mHC, HC) or ``n`` fractions of it (``split``, Frac);
* its coefficient op with the extra arguments after the parameters, and its pre op;
* the operators only it uses (:class:`OpDef`: schema and reference implementation), registered in
  ``torch.ops.hc_rewrite`` when the variant is created;
* its fused kernels: the reference ops that ``torch.ops.hc_fused`` has same-schema kernels for, the modules of
  :mod:`hc_rewrite.kernels` that register them, and its fusion patterns (coefficients + pre of one site; the
  post of a site + the coefficients and pre of the next);
* its checks of ``n`` and of the stream width.

The site math (expand, coefficients + pre, post, reduce) is written once below, over an ``emit(op, *args)``
function: the graph pass emits FX nodes with it (:mod:`hc_rewrite.passes.insert_hyper_connections`), the
structure-preserving form calls the ops with :func:`eager` (:mod:`hc_rewrite.stream_value`). The math of the
ops themselves is :mod:`hc_rewrite.ops.reference`.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..ops.library import define_op


def eager(op, *args):
    """The ``emit`` of eager code: call the op."""
    return op(*args)


def stream_op(name: str):
    """``torch.ops.hc_rewrite.<name>.default``."""
    return getattr(torch.ops.hc_rewrite, name).default


@dataclass(frozen=True)
class OpDef:
    """An operator of ``torch.ops.hc_rewrite``: its schema and its reference implementation."""

    schema: str
    impl: Callable


class ConnectionParams(nn.Module):
    """The parameters of one site's connection (the module holds parameters only; the math is in the ops).

    ``coeff_inputs``: the parameter names, in the argument order of the variant's coefficient op.
    """

    variant = ""
    coeff_inputs: tuple = ()
    #: parameters of a learned collapse where the stream ends (``head_args()``; none: the variant's reduce)
    head_inputs: tuple = ()

    def __init__(self, n: int, width: int, dynamic: bool):
        super().__init__()
        self.n, self.width, self.dynamic = n, width, dynamic

    def coeff_args(self) -> list:
        """The coefficient op's parameter arguments (``None`` for an absent parameter)."""
        return [getattr(self, name) for name in self.coeff_inputs]

    def head_args(self) -> list:
        """The arguments of the variant's :meth:`Variant.end` where the stream ends after this site (``[]``: none)."""
        return []

    def extra_repr(self) -> str:
        return f"n={self.n}, width={self.width}, dynamic={self.dynamic}"


class Connections(nn.Module):
    """``model.hc``: the connection parameters of a rewritten model, one :class:`ConnectionParams` per site. It
    computes nothing; a root ``nn.Sequential`` calls every child in turn, this one last, so it hands its input back
    unchanged."""

    def forward(self, x):
        return x


class Variant:
    """One connection variant (see module docstring). Subclasses set the class attributes; the instance, made
    once in the variant's module, registers the variant's own operators and resolves every op it names."""

    name = ""
    summary = ""
    params: type = ConnectionParams
    #: ``False``: the widened stream is ``n`` copies whose mean is the reduced stream (mHC, HC); ``True``: ``n``
    #: fractions whose concatenation is the whole stream (Frac), so the narrow value needs no widened twin.
    split = False
    expand_name, reduce_name = "expand_stream", "reduce_stream"
    coeff_name = pre_name = ""
    post_name = "stream_post"
    #: operators only this variant uses, ``{name: OpDef}``
    own_ops: dict = {}
    #: reference ops this variant uses that ``torch.ops.hc_fused`` has a same-schema kernel of
    fused_ops: tuple = ()
    #: modules of :mod:`hc_rewrite.kernels` that register those kernels (imported on first use)
    kernel_modules: tuple = ()
    #: ``hc_fused`` op computing coefficients + pre of one site from the coefficient op's arguments, or None
    fused_pre: str | None = None
    #: ``hc_fused`` op computing the post of a site + :attr:`fused_pre` of the next one, or None
    fused_post_pre: str | None = None

    def __init__(self):
        for op_name, op in self.own_ops.items():
            define_op(op_name, op.schema, op.impl)
        names = (self.expand_name, self.reduce_name, self.coeff_name, self.pre_name, self.post_name)
        self.expand_op, self.reduce_op, self.coeff_op, self.pre_op, self.post_op = (stream_op(n) for n in names)

    def __repr__(self) -> str:
        return f"<variant {self.name}>"

    # ------------------------------------------------------------------------- checks
    def check_n(self, n: int) -> None:
        """Raise :class:`~hc_rewrite.errors.SpecError` when ``n`` (already >= 1) does not suit the variant."""

    def check_width(self, n: int, width: int, where: str) -> None:
        """Raise :class:`~hc_rewrite.errors.SpecError` when a stream of feature width ``width`` does not fit."""

    # ------------------------------------------------------------------------- parameters
    def row_width(self, n: int, width: int) -> int:
        """Width of one row of the widened stream ``[..., n, row]`` of a ``width``-wide stream."""
        return width // n if self.split else width

    def make_params(self, spec, width: int, index: int, is_last: bool, generator=None, dtype=None,
                    device=None) -> ConnectionParams:
        """The parameter module of the site at ``index`` of a ``width``-wide stream (``is_last``: its last site).
        Coefficients stay in fp32 or more whatever the model's dtype."""
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return self.new_params(spec, self.row_width(spec.n, width), index, is_last, generator,
                               dtype=dtype, device=device)

    def new_params(self, spec, row_width: int, index: int, is_last: bool, generator, **kw) -> ConnectionParams:
        raise NotImplementedError

    # ------------------------------------------------------------------------- the site math, over emit
    def expand_args(self, n: int) -> tuple:
        """Arguments of the expand op after the stream."""
        return (n,)

    def coeff_extra(self, sinkhorn_iters: int) -> tuple:
        """Arguments of the coefficient op after the parameters."""
        return ()

    def mixes(self, coeff_args) -> bool:
        """Whether the site has residual mixing (else ``h_res`` is ``None``: the identity)."""
        return True

    def expand(self, emit, x, n: int):
        """``[..., C] -> [..., n, row]``: the widened stream."""
        return emit(self.expand_op, x, *self.expand_args(n))

    def reduce(self, emit, w):
        """``[..., n, row] -> [..., C]``: what every reader of the stream outside the sites sees."""
        return emit(self.reduce_op, w)

    def end(self, emit, w, head_args):
        """What the readers of the stream after its last site read: :meth:`reduce`, or a learned collapse with the
        last site's ``head_args()`` (production mHC's head)."""
        return self.reduce(emit, w)

    def coefficients(self, emit, w, coeff_args, sinkhorn_iters: int):
        """``(h_pre, h_post, h_res)`` of one site (``h_res`` is ``None`` without residual mixing)."""
        coeffs = emit(self.coeff_op, w, *coeff_args, *self.coeff_extra(sinkhorn_iters))
        h_pre, h_post, h_res = [emit(operator.getitem, coeffs, i) for i in range(3)]
        return h_pre, h_post, (h_res if self.mixes(coeff_args) else None)

    def site_pre(self, emit, w, coeff_args, sinkhorn_iters: int):
        """Coefficients and branch input of one site: ``(branch_in, h_post, h_res)``."""
        h_pre, h_post, h_res = self.coefficients(emit, w, coeff_args, sinkhorn_iters)
        return emit(self.pre_op, w, h_pre), h_post, h_res

    def site_post(self, emit, w, y, h_post, h_res):
        """The widened stream after a site whose branch returned ``y``."""
        return emit(self.post_op, w, y, h_post, h_res)
