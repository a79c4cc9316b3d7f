"""The user's connection spec, validated before any work is done."""
from __future__ import annotations

from dataclasses import dataclass

from . import variants
from .errors import SpecError


LOOP_PARAMS = ("per-call", "per-module")


@dataclass(frozen=True)
class HCSpec:
    """What to rewrite residual streams into.

    ``variant``: the name of a registered variant (:mod:`hc_rewrite.variants`): ``"mhc"`` (DeepSeek
    manifold-constrained HC), ``"frac"`` (Frac-connections) or ``"hc"`` (Hyper-Connections). ``n``: expansion
    rate (mHC, HC) or number of fractions (Frac). ``dynamic``: input-dependent coefficients (True) or static ones.
    """

    variant: str = "mhc"
    n: int = 4
    dynamic: bool = True
    sinkhorn_iters: int = 20
    seed: int = 0
    loop_params: str = "per-call"

    def __post_init__(self):
        kind = variants.get(self.variant)
        if isinstance(self.n, bool) or not isinstance(self.n, int):
            raise SpecError(f"n must be an int, got {type(self.n).__name__}")
        if self.n < 1:
            raise SpecError(f"n must be >= 1, got n={self.n}")
        kind.check_n(self.n)
        if self.loop_params not in LOOP_PARAMS:
            raise SpecError(f"loop_params must be one of {', '.join(LOOP_PARAMS)}, got {self.loop_params!r}")
        if self.sinkhorn_iters < 1:
            raise SpecError(f"sinkhorn_iters must be >= 1, got {self.sinkhorn_iters}")

    def check_width(self, width: int, where: str = "the residual stream") -> None:
        """Whether a stream of feature width ``width`` fits the variant (Frac: it splits evenly into ``n``)."""
        variants.get(self.variant).check_width(self.n, width, where)


def make_spec(variant="mhc", n=4, dynamic=True, **options) -> HCSpec:
    """Build and validate an :class:`HCSpec`; unknown options are an error, not silently ignored."""
    known = {"sinkhorn_iters", "seed", "loop_params"}
    unknown = set(options) - known
    if unknown:
        raise SpecError(f"unknown option(s) {sorted(unknown)}; known options: {sorted(known)}")
    return HCSpec(variant=variant, n=n, dynamic=dynamic, **options)
