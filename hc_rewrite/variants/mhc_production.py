"""mHC as the production models compute it: ``rewrite(..., variant="mhc", flavour="deepseek-v4" | "glm5-next")``.

The per-site math is DeepSeek-V4's (GLM-5-Next's is the same code), :func:`hc_rewrite.production.mhc_eps_coeffs`:
``H_pre = sigmoid(.) + hc_eps``, ``H_post = 2 sigmoid(.)``, ``H_res = comb^T`` with ``comb`` their eps-Sinkhorn of
``softmax(.) + hc_eps``, the RMS normalisation with the model's own eps, every site with ``H_res`` (their last layer
mixes too), the connection math in fp32 whatever the model's dtype. Where a stream ends (the value its readers
after the last site read), ``"deepseek-v4"`` collapses the copies with a learned head (their ``HyperHead``:
:func:`hc_rewrite.production.hyper_head`, parameters ``hc_fn``, ``hc_base``, ``hc_scale`` on the last site's module),
``"glm5-next"`` with the mean, as the paper's form. Every value read before the last site is read as the mean.

Function-preserving init (their copies start identical, as theirs do): ``expand`` makes ``n`` identical copies;
the gates ``alpha`` (their ``scale``) and the head's ``hc_scale`` start at 0, so every coefficient is its bias;
``H_pre = sigmoid(b_pre) + hc_eps = 1 / n`` (``b_pre = logit(1/n - hc_eps)``), ``H_post = 1``, ``b_res`` diagonal
(any doubly stochastic mixing keeps identical copies identical), the head ``sigmoid(hc_base) + hc_eps = 1 / n``.
So every branch reads the original stream, and the stream's value is the original's, up to their Sinkhorn's eps:
the columns of ``comb`` sum to ``1 - O(hc_eps)``, so each site scales the skip by about ``1 - hc_eps`` (``1e-6``
by default; the rewrite's self-check measures it). The symmetric start breaks once the gates move (their ``fn``
projections are random): ``alpha`` has a gradient at the first step.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import production
from ..errors import SpecError
from ..ops.reference import logit
from .base import ConnectionParams, OpDef, Variant, stream_op
from .mhc import MHC, MHC_RES_DIAGONAL, MHCParams

#: flavours and whether the stream ends in a learned head
FLAVOURS = {"deepseek-v4": True, "glm5-next": False}


class MHCProductionParams(MHCParams):
    """:class:`~hc_rewrite.variants.mhc.MHCParams` (every site with ``b_res``), plus on the last site of a stream with
    a head: ``hc_fn [n, n*C]`` (dynamic), ``hc_base [n]``, ``hc_scale [1]`` (dynamic), DeepSeek-V4's layout."""

    head_inputs = ("hc_fn", "hc_base", "hc_scale")

    def __init__(self, n, width, dynamic, head=False, hc_eps=production.HC_EPS, generator=None, dtype=None,
                 device=None):
        ConnectionParams.__init__(self, n, width, dynamic)
        self.hc_eps, self.head = hc_eps, head
        self._make_parameters(True, dtype, device)
        kw = {"dtype": dtype, "device": device}
        for name, shape in (("hc_fn", (n, n * width)), ("hc_base", (n,)), ("hc_scale", (1,))):
            wanted = head and (dynamic or name == "hc_base")
            self.register_parameter(name, nn.Parameter(torch.empty(shape, **kw)) if wanted else None)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator=None) -> None:
        """The function-preserving init (module docstring), in place; the same draws, in the same order, as at
        construction."""
        n, width = self.n, self.width
        self.b_pre.fill_(logit(1.0 / n - self.hc_eps))
        self.b_post.zero_()
        off = math.log(MHC_RES_DIAGONAL * (n - 1) / (1.0 - MHC_RES_DIAGONAL))
        self.b_res.copy_(off * torch.eye(n))
        if self.phi is not None:
            self.phi.copy_(torch.randn(self.phi.shape, generator=generator) / math.sqrt(n * width))
            self.alpha.zero_()
        if self.head:
            self._reset_head(generator)

    @torch.no_grad()
    def _reset_head(self, generator) -> None:
        n, width = self.n, self.width
        self.hc_base.fill_(logit(1.0 / n - self.hc_eps))
        if self.hc_fn is not None:
            self.hc_fn.copy_(torch.randn(self.hc_fn.shape, generator=generator) / math.sqrt(n * width))
            self.hc_scale.zero_()

    def head_args(self) -> list:
        return [getattr(self, name) for name in self.head_inputs] if self.head else []

    def extra_repr(self) -> str:
        return super().extra_repr() + (", head" if self.head else "")


def _coeffs_op(w, phi, alpha, b_pre, b_post, b_res, rms_eps, hc_eps, iters):
    return production.mhc_eps_coeffs(w, phi, alpha, b_pre, b_post, b_res, rms_eps, hc_eps, iters)


def _head_op(w, hc_fn, hc_base, hc_scale, rms_eps, hc_eps):
    return production.hyper_head(w, hc_fn, hc_base, hc_scale, rms_eps=rms_eps, hc_eps=hc_eps)


def key(flavour: str, rms_eps: float, hc_eps: float) -> str:
    """The registry name of a flavoured mHC (its constants are part of it: they are literals of the site math)."""
    return f"mhc[{flavour},rms_eps={float(rms_eps)!r},hc_eps={float(hc_eps)!r}]"


def parse(name: str):
    """``(flavour, rms_eps, hc_eps)`` of a :func:`key`, or ``None`` for another name."""
    if not (name.startswith("mhc[") and name.endswith("]")):
        return None
    flavour, *rest = name[4:-1].split(",")
    values = dict(item.split("=", 1) for item in rest)
    try:
        return flavour, float(values["rms_eps"]), float(values["hc_eps"])
    except (KeyError, ValueError):
        return None


class MHCProduction(Variant):
    """One flavour of production mHC with its constants (module docstring)."""

    summary = "mHC as DeepSeek-V4 / GLM-5-Next compute it"
    params = MHCProductionParams
    coeff_name, pre_name = "mhc_eps_coeffs", "mhc_collapse"
    own_ops = {
        "mhc_eps_coeffs": OpDef(
            "mhc_eps_coeffs(Tensor w, Tensor? phi, Tensor? alpha, Tensor b_pre, Tensor b_post, Tensor b_res, "
            "float rms_eps, float hc_eps, int iters) -> (Tensor, Tensor, Tensor)", _coeffs_op),
        "mhc_collapse": OpDef("mhc_collapse(Tensor w, Tensor h_pre) -> Tensor", production.collapse),
        "hyper_head": OpDef(
            "hyper_head(Tensor w, Tensor? hc_fn, Tensor hc_base, Tensor? hc_scale, float rms_eps, float hc_eps) "
            "-> Tensor", _head_op),
    }

    def __init__(self, flavour: str, rms_eps: float, hc_eps: float):
        if flavour not in FLAVOURS:
            raise SpecError(f"unknown mHC flavour {flavour!r}: expected one of paper, {', '.join(FLAVOURS)}")
        self.flavour, self.rms_eps, self.hc_eps = flavour, float(rms_eps), float(hc_eps)
        self.name = key(flavour, rms_eps, hc_eps)
        self.head = FLAVOURS[flavour]
        super().__init__()
        self.head_op = stream_op("hyper_head")

    check_n = MHC.check_n  # the same reason: H_pre alone cannot give back the stream with one copy

    def expand_args(self, n):
        return (n, 0.0)  # identical copies, as theirs

    def coeff_extra(self, sinkhorn_iters):
        return (self.rms_eps, self.hc_eps, sinkhorn_iters)

    def new_params(self, spec, row_width, index, is_last, generator, **kw):
        return MHCProductionParams(spec.n, row_width, spec.dynamic, head=self.head and is_last, hc_eps=self.hc_eps,
                                   generator=generator, **kw)

    def end(self, emit, w, head_args):
        if not head_args:
            return self.reduce(emit, w)
        return emit(self.head_op, w, *head_args, self.rms_eps, self.hc_eps)


_MADE: dict = {}


def variant(flavour: str, rms_eps: float, hc_eps: float) -> MHCProduction:
    """The flavoured mHC variant with these constants (made once)."""
    name = key(flavour, rms_eps, hc_eps)
    if name not in _MADE:
        _MADE[name] = MHCProduction(flavour, rms_eps, hc_eps)
    return _MADE[name]


__all__ = ["FLAVOURS", "MHCProduction", "MHCProductionParams", "variant", "key", "parse"]
