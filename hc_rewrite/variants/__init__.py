"""The registry of connection variants: one module each (:mod:`.mhc`, :mod:`.frac`, :mod:`.hc`).

Everything that depends on the variant asks the registry: the spec check (:mod:`hc_rewrite.spec`), the graph
pass (:mod:`hc_rewrite.passes.insert_hyper_connections`), the structure-preserving form
(:mod:`hc_rewrite.stream_value`), the fused kernels and their fusion (:mod:`hc_rewrite.kernels`,
:mod:`hc_rewrite.passes.fuse_stream_ops`), the CLI and the tests. A new variant is a new module here with a
:class:`~.base.Variant` subclass (see :mod:`.base` for what it declares), listed in ``_MODULES`` below, plus
its kernels if it has any.
"""
from __future__ import annotations

from ..errors import SpecError
from . import frac, hc, mhc, mhc_production
from .base import ConnectionParams, Variant, eager

_MODULES = (mhc, frac, hc)  # the order of NAMES: CLI choices, report columns, test parameters

REGISTRY: dict = {m.VARIANT.name: m.VARIANT for m in _MODULES}
NAMES: tuple = tuple(REGISTRY)


def get(name: str) -> Variant:
    """The registered variant called ``name`` (or a flavoured mHC's name, :func:`.mhc_production.key`);
    :class:`~hc_rewrite.errors.SpecError` if there is none."""
    variant = REGISTRY.get(name)
    if variant is None and (flavoured := mhc_production.parse(name)) is not None:
        return mhc_production.variant(*flavoured)
    if variant is None:
        raise SpecError(f"unknown variant {name!r}: expected one of {', '.join(NAMES)}")
    return variant


def all_variants() -> tuple:
    """Every registered variant, in the order of :data:`NAMES`."""
    return tuple(REGISTRY.values())


__all__ = ["REGISTRY", "NAMES", "get", "all_variants", "Variant", "ConnectionParams", "eager"]
