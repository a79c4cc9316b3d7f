"""Drop the tensor-metadata asserts that ``torch.export`` leaves in an unlifted graph; keep its guards.

Before::

    _guards_fn = call_module[_guards_fn](x)                     # e.g. "x.size()[0] <= 2"
    _assert_tensor_metadata(embedding_1, dtype=float32, ...)

After: the asserts are gone (an assert that reads a stream value would count as one more reader of it); the
``_guards_fn`` call stays: it is what makes a graph specialised by the capture (a Python branch on
``x.shape[0]``, a captured size) raise ``Guard failed: ...`` on a call that does not fit, instead of silently
computing the captured branch.
"""
from __future__ import annotations

import torch
import torch.fx as fx

_ASSERTS = {torch.ops.aten._assert_tensor_metadata.default}


def remove_metadata_asserts(gm: fx.GraphModule, recompile: bool = True) -> int:
    """Remove metadata-assert nodes (nothing else); returns how many were removed."""
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _ASSERTS and not node.users:
            gm.graph.erase_node(node)
            removed += 1
    if recompile:  # a pipeline of passes recompiles once, at its end
        gm.recompile()
    return removed
