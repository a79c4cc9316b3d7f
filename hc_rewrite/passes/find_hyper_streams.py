"""Find residual streams that already are hyper-connections (DeepSeek-V4, GLM-5-Next, Hunyuan V4 style).

Such a model widens its stream itself and carries ``[B, S, n, D]`` through its blocks; every block collapses it
with a weighted sum over the copies, and the residual "add" mixes copies (``post * y + comb^T @ W``), so
:mod:`~hc_rewrite.passes.find_residual_sites` finds no ``skip + F(skip)`` there. Detected by the stream's shape,
not by class names.

Before (the captured graph; nothing is changed)::

    e = embedding(ids)                          # [B, S, D]
    W = expand(unsqueeze(e, 2), [-1, -1, n, -1])  # [B, S, n, D]: the widening
    x = sum(pre.unsqueeze(-1) * W, dim=2)       # [B, S, D]: a block's collapse (once or twice per block)
    ...

After: ``[HyperStream(start="expand", n=4, width=D, collapses=k)]`` for each widening whose descendants reduce
over the new axis at least twice (a widening read once is a broadcast, not a stream).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..graph_utils import val

aten = torch.ops.aten
_WIDEN = {aten.expand.default, aten.repeat.default, aten.expand_copy.default}
_REDUCE = {aten.sum.dim_IntList, aten.mean.dim}
#: Copies per token that count as a hyper-connection stream (HC / mHC use 2 to 8).
MAX_COPIES = 16


@dataclass
class HyperStream:
    start: str  # the widening node
    n: int  # copies
    width: int  # features per copy
    collapses: int  # reductions over the copies among its descendants


def _widened_axis(node: fx.Node):
    """``(axis, n)`` if ``node`` widens a tensor by a new axis of ``2..MAX_COPIES`` copies before its last dim."""
    if node.op != "call_function" or node.target not in _WIDEN or not node.args:
        return None
    out, src = val(node), val(node.args[0]) if isinstance(node.args[0], fx.Node) else None
    if out is None or src is None or not hasattr(out, "shape") or len(out.shape) < 3 or len(src.shape) != len(out.shape):
        return None
    for axis in range(1, len(out.shape) - 1):
        try:
            n, one = int(out.shape[axis]), int(src.shape[axis])
        except (TypeError, ValueError):  # symbolic sizes are never the copy axis
            continue
        if one == 1 and 2 <= n <= MAX_COPIES and all(
                str(a) == str(b) for i, (a, b) in enumerate(zip(out.shape, src.shape)) if i != axis):
            return axis, n
    return None


def _reduces_axis(node: fx.Node, axis: int, rank: int) -> bool:
    if node.target not in _REDUCE or len(node.args) < 2:
        return False
    dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
    return [d % rank for d in dims] == [axis]


def find_hyper_streams(gm: fx.GraphModule) -> list[HyperStream]:
    """The hyper-connection streams of ``gm`` (see module docstring); the graph is only read."""
    found = []
    for node in gm.graph.nodes:
        hit = _widened_axis(node)
        if hit is None:
            continue
        axis, n = hit
        rank = len(val(node).shape)
        seen, todo, collapses = {node}, [node], 0
        while todo:
            for user in todo.pop().users:
                if user in seen:
                    continue
                seen.add(user)
                v = val(user)
                if _reduces_axis(user, axis, rank):
                    collapses += 1
                    continue  # past a collapse the values are narrow again
                if v is not None and hasattr(v, "shape") and len(v.shape) == rank:
                    todo.append(user)
        if collapses >= 2:
            found.append(HyperStream(start=node.name, n=n, width=int(val(node).shape[-1]), collapses=collapses))
    return found
