"""Fused Triton kernels for the stream ops (``torch.ops.hc_fused.*``).

Importing this package never imports triton. :func:`fused_ops` imports the kernel modules on first use
(registering the ``hc_fused`` operators) and maps each reference op ``torch.ops.hc_rewrite.<op>.default``
to the fused op of the same schema and semantics; :func:`fused_combos` lists the fused combinations
(coefficients + pre of one site, post of one site + pre of the next) that have schemas of their own
and are applied by :func:`hc_rewrite.kernels.fuse.fuse_graph`. See ``docs/kernels.md``.

The fused ops run their kernels on CUDA tensors (fp16 / bf16 / fp32), and on CPU tensors under the
triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported); anywhere else they run the
reference math, so a graph that uses them stays correct on any device.
"""
from __future__ import annotations

import importlib.util

_LOADED = None


def available() -> bool:
    """True when triton is installed (whether a GPU is present is not checked)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def _load():
    """Import the kernel modules (registers the ``hc_fused`` ops); ``None`` when triton cannot be imported."""
    global _LOADED
    if _LOADED is None:
        if not available():
            return None
        try:
            from . import hc_frac, mhc, mix, post, pre
        except ImportError:
            return None
        _LOADED = (mix, post, pre, mhc, hc_frac)
    return _LOADED


def fused_ops() -> dict:
    """``{reference OpOverload: fused OpOverload}`` with identical schemas; ``{}`` without triton."""
    if _load() is None:
        return {}
    import torch

    from ..ops.library import ops  # noqa: F401  (registers torch.ops.hc_rewrite)

    ref, fused = torch.ops.hc_rewrite, torch.ops.hc_fused
    names = ("mhc_coeffs", "hc_coeffs", "frac_coeffs", "stream_pre", "frac_pre", "stream_post")
    return {getattr(ref, name).default: getattr(fused, name).default for name in names}


def fused_combos() -> dict:
    """The fused combinations, ``{name: OpOverload}``; ``{}`` without triton.

    * ``mhc_pre``, ``hc_pre``, ``frac_pre_coeffs``: coefficients + pre of one site, ``(w, <coefficient
      args>) -> (branch_in, h_pre, h_post, h_res, *saved statistics)``;
    * ``mhc_post_pre``: ``stream_post`` of one site + coefficients and pre of the next mHC site,
      ``(w, y, h_post, h_res, <next site's mhc_coeffs args>) -> (W_next, branch_in, h_pre, h_post,
      h_res, logits, rstd)``.
    """
    if _load() is None:
        return {}
    import torch

    fused = torch.ops.hc_fused
    return {name: getattr(fused, name).default for name in ("mhc_pre", "hc_pre", "frac_pre_coeffs", "mhc_post_pre")}


__all__ = ["available", "fused_ops", "fused_combos"]
