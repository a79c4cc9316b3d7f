"""The user's connection spec, validated before any work is done."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import SpecError

VARIANTS = ("mhc", "frac", "hc")


@dataclass(frozen=True)
class HCSpec:
    """What to rewrite residual streams into.

    ``variant``: ``"mhc"`` (DeepSeek manifold-constrained HC), ``"frac"`` (Frac-connections) or ``"hc"``
    (Hyper-Connections). ``n``: expansion rate (mHC, HC) or number of fractions (Frac).
    ``dynamic``: input-dependent coefficients (True) or static ones.
    """

    variant: str = "mhc"
    n: int = 4
    dynamic: bool = True
    sinkhorn_iters: int = 20
    seed: int = 0

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise SpecError(f"unknown variant {self.variant!r}: expected one of {', '.join(VARIANTS)}")
        if isinstance(self.n, bool) or not isinstance(self.n, int):
            raise SpecError(f"n must be an int, got {type(self.n).__name__}")
        if self.n < 1:
            raise SpecError(f"n must be >= 1, got n={self.n}")
        if self.variant == "mhc" and self.n < 2:
            raise SpecError(
                "mhc needs n >= 2: with one stream H_pre = sigmoid(.) < 1 cannot reproduce the original "
                "branch input; use variant='hc' for n=1"
            )
        if self.sinkhorn_iters < 1:
            raise SpecError(f"sinkhorn_iters must be >= 1, got {self.sinkhorn_iters}")

    @property
    def frac(self) -> bool:
        return self.variant == "frac"

    def check_width(self, width: int, where: str = "the residual stream") -> None:
        """Frac needs the feature width to split evenly into ``n`` fractions."""
        if self.frac and width % self.n != 0:
            raise SpecError(
                f"variant='frac' with n={self.n} fractions does not fit {where}: its width d={width} "
                f"is not divisible by {self.n} (d % n = {width % self.n})"
            )


def make_spec(variant="mhc", n=4, dynamic=True, **options) -> HCSpec:
    """Build and validate an :class:`HCSpec`; unknown options are an error, not silently ignored."""
    known = {"sinkhorn_iters", "seed"}
    unknown = set(options) - known
    if unknown:
        raise SpecError(f"unknown option(s) {sorted(unknown)}; known options: {sorted(known)}")
    return HCSpec(variant=variant, n=n, dynamic=dynamic, **options)
