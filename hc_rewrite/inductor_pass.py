"""Plain ``torch.compile(model)`` lowers the stream ops too: a pre-grad pass registered with Inductor.

Users compile with Inductor (``torch.compile(model)``; torchtitan and the HF Trainer pass ``backend="inductor"``),
not with a backend of ours. Inductor runs ``config.pre_grad_custom_pass`` on the dynamo graph before AOTAutograd:
the graph that still holds one ``torch.ops.hc_rewrite`` node per stream op, as the ``hc_rewrite`` backend gets it.
:class:`LowerStreamOps` runs the same lowering stage there (:func:`hc_rewrite.passes.pipeline.lower`: the fused
kernels where the ops run on CUDA, the fusible forms for Inductor everywhere), so both paths compile the same graph.
:func:`register` chains it after a pass the user registered; it is a no-op on graphs without stream ops and on
graphs the ``hc_rewrite`` backend compiles (it lowers them itself, with its options, and leaves this pass out:
:func:`others`).

Before (dynamo's graph of a rewritten model)::

    c = hc_rewrite.mhc_coeffs.default(w, ...); x = hc_rewrite.stream_pre.default(w, c[0]); ...

After::

    c = hc_rewrite.ops.fusible.mhc_coeffs(w, ...); ...        (CUDA: hc_fused.* kernels)
"""
from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files


class LowerStreamOps(CustomGraphPass):
    """Inductor pre-grad pass: :func:`hc_rewrite.passes.pipeline.lower` on a graph with stream ops.
    ``recompute`` (default ``True``): tag the stream ops for recomputation in backward
    (:mod:`~hc_rewrite.passes.tag_stream_recompute`); ``hc_rewrite.inductor_pass.PASS.recompute = False`` keeps
    AOTAutograd's own choice (faster backward, more activation memory)."""

    def __init__(self):
        self.recompute = True

    def __call__(self, graph: torch.fx.Graph) -> None:
        from .passes.lower_stream_ops import stream_op_nodes
        from .passes.pipeline import lower

        gm = graph.owning_module
        if gm is None or not stream_op_nodes(gm):
            return
        lower(gm, recompute=self.recompute)

    def uuid(self) -> bytes:  # Inductor's FX graph cache keys on it: any change to the lowering is a new key
        import os

        here = os.path.dirname(os.path.abspath(__file__))
        files = []
        for sub in ("passes", "ops", "kernels", "variants"):
            root = os.path.join(here, sub)
            files += sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".py"))
        return get_hash_for_files(tuple(files)) + (b"recompute" if self.recompute else b"save")


PASS = LowerStreamOps()


def register() -> None:
    """Add :data:`PASS` to ``torch._inductor.config.pre_grad_custom_pass`` (once; after the user's own)."""
    from torch._inductor import config

    current = config.pre_grad_custom_pass
    if current is None:
        config.pre_grad_custom_pass = PASS
    elif current is PASS or (isinstance(current, (list, tuple)) and PASS in current):
        return
    elif isinstance(current, (list, tuple)):
        config.pre_grad_custom_pass = [*current, PASS]
    else:
        config.pre_grad_custom_pass = [current, PASS]


def others():
    """``pre_grad_custom_pass`` without :data:`PASS` (what the ``hc_rewrite`` backend hands Inductor)."""
    from torch._inductor import config

    current = config.pre_grad_custom_pass
    if current is PASS:
        return None
    if isinstance(current, (list, tuple)):
        rest = [p for p in current if p is not PASS]
        return rest[0] if len(rest) == 1 else (rest or None)
    return current
