"""Lower the reference stream ops of a graph to fused kernels, where a fused kernel exists.

Part of the lowering (:func:`hc_rewrite.passes.pipeline.lower`, which decides whether the graph runs on CUDA,
where the kernels run): the ``hc_rewrite`` torch.compile backend runs it on the graph Dynamo hands it, after
:mod:`~hc_rewrite.passes.fuse_stream_ops` and before AOTAutograd and Inductor. The fused table comes from
:func:`hc_rewrite.kernels.fused_ops` (``{reference OpOverload: fused OpOverload}``, same schema). Everything
not lowered stays a reference op: it is registered ``CompositeImplicitAutograd``, so AOTAutograd decomposes
it into ATen ops that Inductor compiles.

Before (mHC site)::

    c0 = hc_rewrite.mhc_coeffs.default(W0, phi, alpha, b_pre, b_post, b_res, 1e-06, 20)
    b0 = hc_rewrite.stream_pre.default(W0, getitem(c0, 0))
    W1 = hc_rewrite.stream_post.default(W0, y, getitem(c0, 1), getitem(c0, 2))

After (the ops the kernels module provides are swapped, arguments untouched)::

    c0 = hc_rewrite_fused.mhc_coeffs.default(W0, phi, alpha, b_pre, b_post, b_res, 1e-06, 20)
    b0 = hc_rewrite_fused.stream_pre.default(W0, getitem(c0, 0))
    W1 = hc_rewrite_fused.stream_post.default(W0, y, getitem(c0, 1), getitem(c0, 2))

Without :mod:`hc_rewrite.kernels` (or Triton) the graph is left as it is and 0 is returned.
"""
from __future__ import annotations

import logging
import warnings

import torch
import torch.fx as fx

log = logging.getLogger(__name__)

NAMESPACE = "hc_rewrite"


def is_stream_op(target) -> bool:
    """Whether ``target`` is one of the ``torch.ops.hc_rewrite`` operators (overload or packet)."""
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace == NAMESPACE
    if isinstance(target, torch._ops.OpOverloadPacket):
        return getattr(target, "_qualified_op_name", "").startswith(NAMESPACE + "::")
    return False


def stream_op_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Every node of ``gm`` that calls a ``torch.ops.hc_rewrite`` operator."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and is_stream_op(n.target)]


def _overload(target):
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.default
    return target


def _same_signature(ref, fused) -> bool:
    try:
        a, b = ref._schema, fused._schema
    except AttributeError:
        return True  # not an operator with a schema (a plain callable): trust the table
    return len(a.arguments) == len(b.arguments) and len(a.returns) == len(b.returns)


def load_fused_ops() -> dict:
    """``hc_rewrite.kernels.fused_ops()``, or ``{}`` where the kernels module (or Triton) is missing."""
    try:
        from ..kernels import fused_ops  # type: ignore[import-not-found]
    except ImportError:
        return {}
    try:
        table = fused_ops()
    except ImportError:
        return {}
    return dict(table or {})


def lower_stream_ops(gm: fx.GraphModule, fused: dict | None = None) -> int:
    """Swap reference stream ops for fused ones (see module docstring); returns how many nodes changed.

    ``fused``: ``{reference OpOverload: fused OpOverload}``; ``None`` loads :func:`hc_rewrite.kernels.fused_ops`
    (lazily: only when the graph holds a stream op). A fused op whose schema arity differs from the reference
    is skipped with a warning.
    """
    candidates = stream_op_nodes(gm)
    if not candidates:
        return 0
    table = load_fused_ops() if fused is None else fused
    if not table:
        return 0
    table = {_overload(k): v for k, v in table.items()}
    lowered, refused = 0, set()
    for node in candidates:
        ref = _overload(node.target)
        new = table.get(ref)
        if new is None or new is ref:
            continue
        if not _same_signature(ref, new):
            refused.add(str(ref))
            continue
        node.target = new
        lowered += 1
    for name in sorted(refused):
        warnings.warn(f"hc_rewrite: fused kernel for {name} has a different schema; kept the reference op")
    if lowered:
        gm.graph.lint()
        gm.recompile()
    log.debug("lower_stream_ops: %d of %d stream-op nodes lowered", lowered, len(candidates))
    return lowered
