"""Fused Triton kernels for the stream ops (``torch.ops.hc_fused.*``).

Importing this package never imports triton. :func:`fused_ops` imports the kernel modules on first use
(registering the ``hc_fused`` operators) and maps each reference op ``torch.ops.hc_rewrite.<op>.default``
to the fused op of the same schema and semantics; :func:`fused_combos` lists the fused combinations
(coefficients + pre of one site, post of one site + pre of the next) that have schemas of their own
and are applied by :func:`hc_rewrite.passes.fuse_stream_ops.fuse_stream_ops`. Which ops, modules and
combinations exist is declared by each variant (:mod:`hc_rewrite.variants`). See ``docs/kernels.md``.

The fused ops run their kernels on CUDA tensors (fp16 / bf16 / fp32), and on CPU tensors under the
triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported); anywhere else they run the
reference math, so a graph that uses them stays correct on any device.
"""
from __future__ import annotations

import importlib
import importlib.util

from .. import variants

_LOADED = None


def available() -> bool:
    """True when triton is installed (whether a GPU is present is not checked)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def _module_names() -> list:
    """The kernel modules every registered variant needs, in the order they are first named."""
    names: list = []
    for variant in variants.all_variants():
        names += [m for m in variant.kernel_modules if m not in names]
    return names


def _load():
    """Import the kernel modules (registers the ``hc_fused`` ops); ``None`` when triton cannot be imported."""
    global _LOADED
    if _LOADED is None:
        if not available():
            return None
        try:
            _LOADED = tuple(importlib.import_module(f"{__name__}.{m}") for m in _module_names())
        except ImportError:
            return None
    return _LOADED


def fused_ops() -> dict:
    """``{reference OpOverload: fused OpOverload}`` with identical schemas; ``{}`` without triton."""
    if _load() is None:
        return {}
    import torch

    ref, fused = torch.ops.hc_rewrite, torch.ops.hc_fused
    names = dict.fromkeys(name for v in variants.all_variants() for name in v.fused_ops)
    return {getattr(ref, name).default: getattr(fused, name).default for name in names}


def fused_combos() -> dict:
    """The fused combinations, ``{name: OpOverload}``; ``{}`` without triton.

    * ``fused_pre`` of a variant (``mhc_pre``, ``hc_pre``, ``frac_pre_coeffs``): coefficients + pre of one
      site, ``(w, <coefficient args>) -> (branch_in, h_pre, h_post, h_res, *saved statistics)``;
    * ``fused_post_pre`` (``mhc_post_pre``): ``stream_post`` of one site + coefficients and pre of the next
      site, ``(w, y, h_post, h_res, <next site's coefficient args>) -> (W_next, branch_in, h_pre, h_post,
      h_res, *saved statistics)``.
    """
    if _load() is None:
        return {}
    import torch

    names = [n for v in variants.all_variants() for n in (v.fused_pre, v.fused_post_pre) if n]
    return {name: getattr(torch.ops.hc_fused, name).default for name in names}


__all__ = ["available", "fused_ops", "fused_combos"]
