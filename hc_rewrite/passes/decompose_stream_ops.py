"""Decompose the stream ops left in a graph into their fusible form, for Inductor.

The last pass of the lowering (:func:`hc_rewrite.passes.pipeline.lower`), on every device: whatever
``torch.ops.hc_rewrite`` op is still in the graph after the fused kernels went in (all of them on the CPU; on
CUDA the ones no kernel covers) is replaced by its fusible form from :data:`hc_rewrite.ops.fusible.FUSIBLE`: the
reference math with the contractions over the stream's ``n`` unrolled and the dynamic projections reading the
stream itself, so that AOTAutograd traces ATen ops Inductor fuses, instead of batched matmuls and normalised
copies it cannot (``docs/kernels.md``, "Without the kernels"). Ops without a fusible form stay: they are
``CompositeImplicitAutograd`` and decompose into the reference.

Before (a Frac site)::

    c0 = hc_rewrite.frac_coeffs.default(W0, y, a, b, w_y, w_a, w_b)
    x0 = hc_rewrite.frac_pre.default(W0, getitem(c0, 0))
    W1 = hc_rewrite.stream_post.default(W0, F(x0), getitem(c0, 1), getitem(c0, 2))

After::

    c0 = hc_rewrite.ops.fusible.frac_coeffs(W0, y, a, b, w_y, w_a, w_b)
    x0 = hc_rewrite.ops.fusible.frac_pre(W0, getitem(c0, 0))
    W1 = hc_rewrite.ops.fusible.stream_post(W0, F(x0), getitem(c0, 1), getitem(c0, 2))
"""
from __future__ import annotations

import torch.fx as fx

from ..ops.fusible import FUSIBLE
from .lower_stream_ops import stream_op_nodes


def decompose_stream_ops(gm: fx.GraphModule, table: dict | None = None) -> int:
    """Swap every ``torch.ops.hc_rewrite`` node with a fusible form for it (arguments untouched); returns how
    many nodes changed. ``table``: ``{op name: function}``, :data:`~hc_rewrite.ops.fusible.FUSIBLE` by default."""
    table = FUSIBLE if table is None else table
    count = 0
    for node in stream_op_nodes(gm):  # torch.ops.hc_rewrite only (the fused ops are hc_fused)
        fn = table.get(node.target.__name__.split(".")[0])
        if fn is None:
            continue
        node.target = fn
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
