"""Per-site parameters of each variant, with their function-preserving initialisation.

The graph pass creates one module per residual site under ``hc.<site>``; the module holds parameters
only. The math is in :mod:`hc_rewrite.ops.reference`; :meth:`coeff_inputs` says which parameters feed
the coefficient op, in its argument order.

Function preservation. The reduction takes the mean over copies (Frac: concatenation), so the model
is unchanged as long as every site keeps ``mean_i W[i]`` equal to the original residual value and its
branch reads exactly that value. mHC also needs every connection parameter to learn from the first
backward pass (docs/design.md has the argument):

* mHC: the copies start *different*, ``W = 1 x + D`` with every deviation ``D`` in the span ``U`` of
  the pair differences ``e_2k - e_2k+1`` (:func:`~hc_rewrite.ops.reference.pair_pattern`): the
  expansion scales the copies by ``1 +- MHC_EXPAND_SPREAD``, and ``H_post = 2 sigmoid(.)`` has biases
  and ``phi`` columns in ``(+v, -v)`` pairs, so ``H_post - 1`` lies in ``U`` for every token.
  ``H_pre = sigmoid(b_pre)`` sums to 1 and is tilted along a vector orthogonal to ``U`` (gate
  ``alpha_pre = 0``), so the branch reads ``x`` exactly while ``H_pre`` is not uniform.
  ``H_res = Sinkhorn(exp(b_res))`` with ``b_res`` diagonal is ``a I + b J``, which maps ``U`` to itself
  (its dynamic gate ``alpha_res`` starts at 0). A perturbation of ``H_res`` moves ``D`` out of ``U``,
  which the next site's tilted ``H_pre`` reads: ``b_res`` has a real gradient at the first backward
  pass. The last site of a stream has no ``H_res`` at all: only the mean of its output is ever read.
  ``n = 2`` is the exception: ``U`` is then the whole zero-sum space, ``H_pre`` must stay uniform, and
  ``b_res`` learns only once ``H_pre`` moves (the first step does that).
* HC: the paper's init: ``A_m = e_(k mod n)``, ``A_r = I``, ``B = 1``, dynamic weights 0 (copies stay
  identical at init); tanh scale fixed at 0.01.
* Frac: ``Y = I``, ``A = I``, ``B = 1``, dynamic weights 0 (branch input = concat of fractions = x).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .ops.reference import logit, pair_contrast, pair_pattern

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


def expand_spread(spec) -> float:
    """The ``spread`` argument of ``expand_stream`` for a variant: mHC copies start apart, HC identical."""
    return MHC_EXPAND_SPREAD if spec.variant == "mhc" else 0.0


class SiteParams(nn.Module):
    """Base class: knows its variant, size and whether it is dynamic."""

    variant = ""

    def __init__(self, n: int, width: int, dynamic: bool):
        super().__init__()
        self.n, self.width, self.dynamic = n, width, dynamic

    def extra_repr(self) -> str:
        return f"n={self.n}, width={self.width}, dynamic={self.dynamic}"


class MHCSite(SiteParams):
    variant = "mhc"

    def __init__(self, n, width, dynamic, has_res=True, generator=None, dtype=None, device=None):
        super().__init__(n, width, dynamic)
        self.has_res = has_res
        kw = {"dtype": dtype, "device": device}
        k = 2 * n + (n * n if has_res else 0)
        pre = [(1.0 + MHC_PRE_TILT * c) / n for c in pair_contrast(n)]
        self.b_pre = nn.Parameter(torch.tensor([logit(p) for p in pre], **kw))
        self.b_post = nn.Parameter((MHC_POST_SPREAD * torch.tensor(pair_pattern(n))).to(**kw))
        if has_res:
            off = math.log(MHC_RES_DIAGONAL * (n - 1) / (1.0 - MHC_RES_DIAGONAL))
            self.b_res = nn.Parameter((off * torch.eye(n)).to(**kw))
        else:
            self.register_parameter("b_res", None)
        if dynamic:
            phi = torch.randn(n * width, k, generator=generator) / math.sqrt(n * width)
            # post columns in (+v, -v) pairs (a lone middle column is zero): mean(H_post) stays 1.
            post = phi[:, n:2 * n]
            post[:, 1:2 * (n // 2):2] = -post[:, 0:2 * (n // 2):2]
            if n % 2:
                post[:, n - 1] = 0.0
            self.phi = nn.Parameter(phi.to(**kw))
            self.alpha = nn.Parameter(torch.tensor(MHC_ALPHA[: 3 if has_res else 2], **kw))
        else:
            self.register_parameter("phi", None)
            self.register_parameter("alpha", None)

    def coeff_inputs(self):
        return ["phi", "alpha", "b_pre", "b_post", "b_res"]


class HCSite(SiteParams):
    variant = "hc"

    def __init__(self, n, width, dynamic, index=0, dtype=None, device=None):
        super().__init__(n, width, dynamic)
        kw = {"dtype": dtype, "device": device}
        a_m = torch.zeros(n, **kw)
        a_m[index % n] = 1.0
        self.a_m = nn.Parameter(a_m)
        self.a_r = nn.Parameter(torch.eye(n, **kw))
        self.b = nn.Parameter(torch.ones(n, **kw))
        if dynamic:
            self.w_m = nn.Parameter(torch.zeros(width, **kw))
            self.w_r = nn.Parameter(torch.zeros(width, n, **kw))
            self.w_b = nn.Parameter(torch.zeros(width, **kw))
        else:
            for name in ("w_m", "w_r", "w_b"):
                self.register_parameter(name, None)

    def coeff_inputs(self):
        return ["a_m", "a_r", "b", "w_m", "w_r", "w_b"]


class FracSite(SiteParams):
    """``n`` is the number of fractions m; ``width`` the fraction width d/m."""

    variant = "frac"

    def __init__(self, n, width, dynamic, dtype=None, device=None):
        super().__init__(n, width, dynamic)
        kw = {"dtype": dtype, "device": device}
        self.y = nn.Parameter(torch.eye(n, **kw))
        self.a = nn.Parameter(torch.eye(n, **kw))
        self.b = nn.Parameter(torch.ones(n, **kw))
        if dynamic:
            self.w_y = nn.Parameter(torch.zeros(width, n, **kw))
            self.w_a = nn.Parameter(torch.zeros(width, n, **kw))
            self.w_b = nn.Parameter(torch.zeros(width, **kw))
        else:
            for name in ("w_y", "w_a", "w_b"):
                self.register_parameter(name, None)

    def coeff_inputs(self):
        return ["y", "a", "b", "w_y", "w_a", "w_b"]


def make_site(spec, width: int, index: int, is_last: bool, generator=None, dtype=None, device=None):
    """The parameter module of one site. ``width`` is the stream's feature width d."""
    dtype = torch.float64 if dtype == torch.float64 else torch.float32  # coefficients stay >= fp32
    if spec.variant == "mhc":
        return MHCSite(spec.n, width, spec.dynamic, has_res=not is_last, generator=generator,
                       dtype=dtype, device=device)
    if spec.variant == "hc":
        return HCSite(spec.n, width, spec.dynamic, index=index, dtype=dtype, device=device)
    return FracSite(spec.n, width // spec.n, spec.dynamic, dtype=dtype, device=device)
