"""mHC: manifold-constrained hyper-connections (DeepSeek, arXiv 2512.24880).

``n`` copies of the stream; coefficients ``H_pre = sigmoid(.)``, ``H_post = 2 sigmoid(.)``,
``H_res = SinkhornKnopp(exp(.))`` from an RMS-normalised projection of the whole widened stream
(:func:`hc_rewrite.ops.reference.mhc_coeffs`).

Function-preserving init. The reduction takes the mean over copies, so the model is unchanged as long as
every site keeps ``mean_i W[i]`` equal to the original residual value and its branch reads exactly that
value. mHC also needs every connection parameter to learn from the first backward pass (docs/design.md
has the argument): the copies start *different*, ``W = 1 x + D`` with every deviation ``D`` in the span
``U`` of the pair differences ``e_2k - e_2k+1`` (:func:`~hc_rewrite.ops.reference.pair_pattern`): the
expansion scales the copies by ``1 +- MHC_EXPAND_SPREAD``, and ``H_post = 2 sigmoid(.)`` has biases and
``phi`` columns in ``(+v, -v)`` pairs, so ``H_post - 1`` lies in ``U`` for every token.
``H_pre = sigmoid(b_pre)`` sums to 1 and is tilted along a vector orthogonal to ``U`` (gate
``alpha_pre = 0``), so the branch reads ``x`` exactly while ``H_pre`` is not uniform.
``H_res = Sinkhorn(exp(b_res))`` with ``b_res`` diagonal is ``a I + b J``, which maps ``U`` to itself (its
dynamic gate ``alpha_res`` starts at 0). A perturbation of ``H_res`` moves ``D`` out of ``U``, which the
next site's tilted ``H_pre`` reads: ``b_res`` has a real gradient at the first backward pass. The last
site of a stream has no ``H_res`` at all: only the mean of its output is ever read. ``n = 2`` is the
exception: ``U`` is then the whole zero-sum space, ``H_pre`` must stay uniform, and ``b_res`` learns only
once ``H_pre`` moves (the first step does that).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import SpecError
from ..ops import reference as ref
from ..ops.reference import logit, pair_contrast, pair_pattern
from .base import ConnectionParams, OpDef, Variant

#: Diagonal weight of the initial mHC residual mixing matrix (off-diagonals share the rest).
MHC_RES_DIAGONAL = 0.9
#: Initial mHC post-bias magnitude of each (+, -) pair: H_post = 2 sigmoid(+-0.5) = 1.245 / 0.755.
MHC_POST_SPREAD = 0.5
#: Initial mHC pre-weight tilt: H_pre = (1 + MHC_PRE_TILT * pair_contrast(n)) / n (0.35 / 0.15 at n=4).
MHC_PRE_TILT = 0.4
#: mHC expansion: copy i = (1 + MHC_EXPAND_SPREAD * pair_pattern(n)[i]) * x (1.5 x / 0.5 x pairs).
MHC_EXPAND_SPREAD = 0.5
#: Initial gates (alpha_pre, alpha_post, alpha_res) of the dynamic mHC terms. The pre and res gates
#: start closed (their dynamic terms would break exactness) and learn from the first step on.
MHC_ALPHA = (0.0, 0.01, 0.0)


class MHCParams(ConnectionParams):
    """``b_pre [n]``, ``b_post [n]``, ``b_res [n, n]`` (absent on the last site of a stream); dynamic:
    ``phi [n*C, 2n (+ n*n)]`` and the gates ``alpha [2 or 3]``."""

    variant = "mhc"
    coeff_inputs = ("phi", "alpha", "b_pre", "b_post", "b_res")

    def __init__(self, n, width, dynamic, has_res=True, generator=None, dtype=None, device=None):
        super().__init__(n, width, dynamic)
        self._make_parameters(has_res, dtype, device)
        self.reset_parameters(generator)

    def _make_parameters(self, has_res, dtype, device) -> None:
        """The parameters, uninitialised (:meth:`reset_parameters` fills them)."""
        n, width, dynamic = self.n, self.width, self.dynamic
        self.has_res = has_res
        kw = {"dtype": dtype, "device": device}
        k = 2 * n + (n * n if has_res else 0)
        self.b_pre = nn.Parameter(torch.empty(n, **kw))
        self.b_post = nn.Parameter(torch.empty(n, **kw))
        if has_res:
            self.b_res = nn.Parameter(torch.empty(n, n, **kw))
        else:
            self.register_parameter("b_res", None)
        if dynamic:
            self.phi = nn.Parameter(torch.empty(n * width, k, **kw))
            self.alpha = nn.Parameter(torch.empty(3 if has_res else 2, **kw))
        else:
            self.register_parameter("phi", None)
            self.register_parameter("alpha", None)

    @torch.no_grad()
    def reset_parameters(self, generator=None) -> None:
        """The function-preserving init, in place (any device; ``phi`` drawn from ``generator`` or torch's RNG)."""
        n, width = self.n, self.width
        pre = [(1.0 + MHC_PRE_TILT * c) / n for c in pair_contrast(n)]
        self.b_pre.copy_(torch.tensor([logit(p) for p in pre], dtype=self.b_pre.dtype))
        self.b_post.copy_(MHC_POST_SPREAD * torch.tensor(pair_pattern(n)))
        if self.b_res is not None:
            off = math.log(MHC_RES_DIAGONAL * (n - 1) / (1.0 - MHC_RES_DIAGONAL))
            self.b_res.copy_(off * torch.eye(n))
        if self.phi is not None:
            phi = torch.randn(self.phi.shape, generator=generator) / math.sqrt(n * width)
            # post columns in (+v, -v) pairs (a lone middle column is zero): mean(H_post) stays 1.
            post = phi[:, n:2 * n]
            post[:, 1:2 * (n // 2):2] = -post[:, 0:2 * (n // 2):2]
            if n % 2:
                post[:, n - 1] = 0.0
            self.phi.copy_(phi)
            self.alpha.copy_(torch.tensor(MHC_ALPHA[: self.alpha.numel()], dtype=self.alpha.dtype))


def mhc_coeffs_op(w, phi, alpha, b_pre, b_post, b_res, eps, iters, **options):
    """The ``mhc_coeffs`` operator: :func:`~hc_rewrite.ops.reference.mhc_coeffs` (``options``: its keywords)."""
    h_pre, h_post, h_res = ref.mhc_coeffs(w, phi, alpha, b_pre, b_post, b_res, eps, iters, **options)
    if h_res is None:  # schema outputs are tensors; an empty one stands for "no mixing"
        h_res = h_post.new_empty(0)
    return h_pre, h_post, h_res


class MHC(Variant):
    name = "mhc"
    summary = "mHC, manifold-constrained hyper-connections (DeepSeek, arXiv 2512.24880)"
    params = MHCParams
    coeff_name, pre_name = "mhc_coeffs", "stream_pre"
    own_ops = {
        "mhc_coeffs": OpDef(
            "mhc_coeffs(Tensor w, Tensor? phi, Tensor? alpha, Tensor b_pre, Tensor b_post, Tensor? b_res, "
            "float eps, int iters) -> (Tensor, Tensor, Tensor)", mhc_coeffs_op),
    }
    fused_ops = ("mhc_coeffs", "stream_pre", "stream_post")
    kernel_modules = ("post", "pre", "mhc")
    fused_pre, fused_post_pre = "mhc_pre", "mhc_post_pre"

    def check_n(self, n):
        if n < 2:
            raise SpecError(
                "mhc needs n >= 2: with one stream H_pre = sigmoid(.) < 1 cannot reproduce the original "
                "branch input; use variant='hc' for n=1"
            )

    def expand_args(self, n):
        return (n, MHC_EXPAND_SPREAD)  # the copies start apart (module docstring)

    def coeff_extra(self, sinkhorn_iters):
        # eps of the RMS normalisation of the widened stream. A literal, not a named float: torch.compile
        # (compile_stream_ops, dynamic=True) turns a float read from a global or attribute into a graph input
        return (1e-6, sinkhorn_iters)

    def mixes(self, coeff_args):
        return dict(zip(MHCParams.coeff_inputs, coeff_args))["b_res"] is not None  # the last site: no H_res

    def new_params(self, spec, row_width, index, is_last, generator, **kw):
        return MHCParams(spec.n, row_width, spec.dynamic, has_res=not is_last, generator=generator, **kw)


VARIANT = MHC()
