"""The user's connection spec, validated before any work is done."""
from __future__ import annotations

from dataclasses import dataclass, field

from . import variants
from .errors import SpecError


LOOP_PARAMS = ("per-call", "per-module")
#: mHC flavours: the paper's math, or the production models' (:mod:`hc_rewrite.variants.mhc_production`)
FLAVOURS = ("paper", *variants.mhc_production.FLAVOURS)


@dataclass(frozen=True)
class HCSpec:
    """What to rewrite residual streams into.

    ``variant``: the name of a registered variant (:mod:`hc_rewrite.variants`): ``"mhc"`` (DeepSeek
    manifold-constrained HC), ``"frac"`` (Frac-connections) or ``"hc"`` (Hyper-Connections). ``n``: expansion
    rate (mHC, HC) or number of fractions (Frac). ``dynamic``: input-dependent coefficients (True) or static ones.
    ``flavour`` (mHC only): ``"paper"`` (default), ``"deepseek-v4"`` or ``"glm5-next"``: the production models'
    site math; ``rms_eps`` (their RMS normalisation's eps; ``None``: the model's own, resolved by ``rewrite``) and
    ``hc_eps`` (their eps of ``H_pre`` and of the Sinkhorn) go with it.
    """

    variant: str = "mhc"
    n: int = 4
    dynamic: bool = True
    sinkhorn_iters: int = 20
    seed: int = 0
    loop_params: str = "per-call"
    flavour: str = "paper"
    rms_eps: float | None = None
    hc_eps: float = 1e-6
    rms_eps_source: str = field(default="", compare=False)  # where rewrite found rms_eps (for the report)

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
        if self.flavour not in FLAVOURS:
            raise SpecError(f"flavour must be one of {', '.join(FLAVOURS)}, got {self.flavour!r}")
        if self.flavour != "paper" and self.variant != "mhc":
            raise SpecError(f"flavour={self.flavour!r} is a flavour of mHC; variant={self.variant!r} has none")
        for name in ("rms_eps", "hc_eps"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 <= value < 0.1):
                raise SpecError(f"{name} must be a small non-negative float, got {value!r}")

    @property
    def variant_key(self) -> str:
        """The registry name of the variant this spec computes (a flavoured mHC's carries its constants)."""
        if self.flavour == "paper":
            return self.variant
        made = variants.mhc_production
        rms = made.production.RMS_EPS if self.rms_eps is None else self.rms_eps
        return made.key(self.flavour, rms, self.hc_eps)

    def check_width(self, width: int, where: str = "the residual stream") -> None:
        """Whether a stream of feature width ``width`` fits the variant (Frac: it splits evenly into ``n``)."""
        variants.get(self.variant_key).check_width(self.n, width, where)


def make_spec(variant="mhc", n=4, dynamic=True, **options) -> HCSpec:
    """Build and validate an :class:`HCSpec`; unknown options are an error, not silently ignored."""
    known = {"sinkhorn_iters", "seed", "loop_params", "flavour", "rms_eps", "hc_eps"}
    unknown = set(options) - known
    if unknown:
        raise SpecError(f"unknown option(s) {sorted(unknown)}; known options: {sorted(known)}")
    return HCSpec(variant=variant, n=n, dynamic=dynamic, **options)
