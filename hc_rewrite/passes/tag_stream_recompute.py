"""Tag the stream ops for recomputation in backward: keep the widened stream once per block, recompute the rest.

The first pass of the lowering (:func:`hc_rewrite.passes.pipeline.lower`), on the graph dynamo hands Inductor or the
``hc_rewrite`` backend. mHC and HC carry an ``n``-times wider stream ``W``; left to itself, AOTAutograd's partitioner
saves ``W`` (and its flattened copy for the coefficients) at every site. DeepSeek's answer (mHC paper, section
4.3) is to keep ``W`` at block entries only and recompute the stream ops' intermediates in backward. This pass says
so in the partitioner's own language, the tags selective activation checkpointing puts on a checkpointed region:
every stream op gets ``meta["recompute"] = PREFER_RECOMPUTE`` and the ``meta["ac_graph_id"]`` of its group.
AOTAutograd copies both to the ATen nodes each op traces into; the partitioner then recomputes tagged nodes, saves
what enters a group from untagged code (the branch outputs), and saves a tagged value read by a later group (the
stream at the group boundary: ``torch._functorch.partitioners.cleanup_recompute_tags``).

Groups: the sites whose add runs in the same module's code (a decoder layer's two sites), found from the add's
``nn_module_stack``; where one module holds every add (a flat graph, a loop in the root), each site is a group of
its own (one group for all would only move the widened streams' memory from forward into backward). The ops before
a site's add (coefficients) join the group of the add that reads them; the rest (pre, the stream start,
reductions, stream-wise links) the latest group among their stream-op inputs (pre: its coefficients').

Before::

    c0 = hc_rewrite.mhc_coeffs(W0, ...)            # meta: {}
    b0 = hc_rewrite.stream_pre(W0, getitem(c0, 0))
    W1 = hc_rewrite.stream_post(W0, F0(b0), getitem(c0, 1), getitem(c0, 2))

After (the same nodes)::

    c0, b0, W1: meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE, meta["ac_graph_id"] = GROUP_BASE + 0
"""
from __future__ import annotations

import contextlib
import operator

import torch.fx as fx
from torch.fx import traceback as fx_traceback
from torch.utils.checkpoint import CheckpointPolicy

from .lower_stream_ops import stream_op_nodes

#: first group id: far above the ids of checkpointed regions dynamo numbers from 1 in a graph
GROUP_BASE = 1 << 20
TAGS = ("recompute", "ac_graph_id")


def _is_post(node: fx.Node) -> bool:
    return node.target.__name__.split(".")[0].endswith("_post")


def _owner(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    return str(list(stack.values())[-1][0]) if stack else None


def _stream_users(node: fx.Node, ours: set):
    """The stream ops that read ``node``, directly or through ``getitem``."""
    for user in node.users:
        if user in ours:
            yield user
        elif user.op == "call_function" and user.target is operator.getitem:
            yield from (u for u in user.users if u in ours)


def _stream_inputs(node: fx.Node, ours: set):
    """The stream ops ``node`` reads, directly or through ``getitem``."""
    for a in node.all_input_nodes:
        if a in ours:
            yield a
        elif a.op == "call_function" and a.target is operator.getitem and a.args[0] in ours:
            yield a.args[0]


def tag_stream_recompute(gm: fx.GraphModule) -> int:
    """Tag every ``torch.ops.hc_rewrite`` node of ``gm`` (see the module docstring); returns how many were tagged.
    Nodes that already carry a recompute tag (inside a checkpointed region of the user's) are left as they are."""
    nodes = [n for n in stream_op_nodes(gm) if "recompute" not in n.meta]
    if not nodes:
        return 0
    ours = set(nodes)
    posts = [n for n in nodes if _is_post(n)]
    owners = [_owner(n) for n in posts]
    per_site = len(set(owners)) < 2 or None in owners
    keys: dict = {}
    group: dict = {}
    for node, owner in zip(posts, owners):
        group[node] = keys.setdefault(node if per_site else owner, len(keys))
    for node in reversed(nodes):  # coefficients: the group of the add that reads them
        if node not in group:
            found = [group[u] for u in _stream_users(node, ours) if u in group]
            if found:
                group[node] = min(found)
    last = 0
    for node in nodes:  # the rest: the latest group among their stream-op inputs (pre: its coefficients')
        if node not in group:
            inputs = [group[a] for a in _stream_inputs(node, ours) if a in group]
            group[node] = max(inputs) if inputs else last
        last = group[node]
    for node in nodes:
        node.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
        node.meta["ac_graph_id"] = GROUP_BASE + group[node]
    return len(nodes)


def copy_tags(src: fx.Node, dst: fx.Node) -> None:
    """Give ``dst`` (a node that replaces ``src``) its recompute tags."""
    for key in TAGS:
        if key in src.meta:
            dst.meta[key] = src.meta[key]


@contextlib.contextmanager
def saved_for_backward():
    """While AOTAutograd traces a stream op this pass tagged for recomputation, tag the nodes made in this context
    ``MUST_SAVE`` instead: a value that is small beside the stream (a few floats a token: the coefficient
    projection's output, the Sinkhorn output) is kept for backward rather than computed again from the stream.
    Tags of a checkpointed region of the user's (``ac_graph_id`` below :data:`GROUP_BASE`) are left alone."""
    meta = fx_traceback.get_current_meta() if fx_traceback.has_preserved_node_meta() else None
    if not meta or "recompute" not in meta or meta.get("ac_graph_id", 0) < GROUP_BASE:
        yield
        return
    old = meta["recompute"]
    meta["recompute"] = CheckpointPolicy.MUST_SAVE
    try:
        yield
    finally:
        meta["recompute"] = old
