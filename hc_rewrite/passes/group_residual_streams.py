"""Group residual sites into streams and check that each skip dominates its branch.

Before: sites found by :func:`~hc_rewrite.passes.find_residual_sites` (the graph is not changed)::

    x1 = x0 + attn(ln1(x0))            # site 0
    x2 = x1 + mlp(ln2(x1))             # site 1: its skip is site 0's output
    y1 = LN(y0 + attn(y0))             # post-norm: site 2, the LayerNorm links it ...
    y2 = LN(y1 + mlp(y1))              # ... to site 3

After: streams ``[site 0, site 1]`` and ``[site 2, site 3]``. One site's output reaches the next site's
skip directly or through stream-wise ops (dropout, casts, clones, a LayerNorm over the feature dim);
those ops become the stream's links.

Dominance: in the dataflow graph of everything computed from the stream's first value, every path from
the stream into a site's branch must pass through that site's skip (networkx immediate dominators
over the branch's backward cone, with the stream's values as entries). A branch that also reads an
earlier value of its stream directly is refused with the reason, and the streams are regrouped
without it.
"""
from __future__ import annotations

import networkx as nx
import torch.fx as fx

from ..graph_utils import data_inputs, data_users, width
from ..sites import Site, Stream, is_norm_link, link_input

_ROOT = "__stream_entry__"


def _successors(site: Site, skip_of: dict, gm: fx.GraphModule):
    """Sites whose skip is reached from ``site.add`` through link ops, with the link path to each."""
    found = []
    todo = [(site.add, [])]
    while todo:
        value, path = todo.pop()
        nexts = [s for s in skip_of.get(value, []) if s is not site]
        if nexts:
            found.extend((path, s) for s in nexts)
            continue
        for user in value.users:
            if link_input(user, gm, site.channel_first) is value:
                todo.append((user, path + [user]))
    return found


def _build_streams(sites: list[Site], gm: fx.GraphModule) -> list[Stream]:
    skip_of: dict = {}
    for s in sites:
        skip_of.setdefault(s.skip, []).append(s)
    # a stream keeps one layout: channels-first sites only chain to channels-first sites
    def _compatible(a, b):
        return a.channel_first == b.channel_first
    succ = {s: [(p, t) for p, t in _successors(s, skip_of, gm) if _compatible(s, t)] for s in sites}
    has_pred = {nxt for lst in succ.values() for _, nxt in lst}
    streams = []
    for s in sites:
        if s in has_pred:
            continue
        fdim = 1 if s.channel_first else -1
        stream = Stream(id=len(streams), root=s.skip, width=width(s.skip, fdim), feature_dim=fdim)
        todo = [s]
        while todo:
            cur = todo.pop(0)
            stream.sites.append(cur)
            stream.successors[cur] = succ[cur]
            todo.extend(nxt for _, nxt in succ[cur])
        streams.append(stream)
    return streams


def _descendants(node: fx.Node) -> set:
    seen, todo = {node}, [node]
    while todo:
        for user in data_users(todo.pop()):
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return seen


def _dominance_violation(site: Site, values: set, reach: set) -> list:
    """Stream values other than the skip through which the stream reaches the branch ([] if none)."""
    return sorted({bad for b in [site.branch, *site.extra_branches] for bad in _violation(site.skip, b, values, reach)},
                  key=lambda n: n.name)


def _violation(skip: fx.Node, branch: fx.Node, values: set, reach: set) -> list:
    h = nx.DiGraph()
    h.add_node(branch)
    entries, seen, todo = set(), {branch}, [branch]
    while todo:
        cur = todo.pop()
        for inp in data_inputs(cur):
            if inp not in reach:
                continue  # parameters, masks, positions: side inputs, not the stream
            h.add_edge(inp, cur)
            if inp in values:
                entries.add(inp)
            elif inp not in seen:
                seen.add(inp)
                todo.append(inp)
    for e in entries:
        h.add_edge(_ROOT, e)
    if not entries:
        return []
    idom = nx.immediate_dominators(h, _ROOT)
    cur = branch
    while cur != _ROOT:
        if cur is skip:
            return []
        cur = idom[cur]
    return [e for e in entries if e is not skip]


def _parallel_or_pre(site: Site, gm: fx.GraphModule) -> str:
    """``parallel`` when the branch is a sum of two computations that both read the skip (GPT-J style
    ``x + attn(ln(x)) + mlp(ln(x))``), else ``pre-norm``."""
    from ..graph_utils import is_add, is_compute

    if site.extra_branches:
        return "parallel"
    b = site.branch
    while b.op in ("call_module", "call_function") and len(b.all_input_nodes) == 1 and not is_compute(b, gm):
        b = b.all_input_nodes[0]  # look through the branch's trailing dropout / cast
    if is_add(b) and len(b.args) >= 2 and all(isinstance(a, fx.Node) for a in b.args[:2]):
        def computes(v):
            seen, todo = set(), [v]
            while todo:
                cur = todo.pop()
                if cur in seen or cur not in site.region:
                    continue
                seen.add(cur)
                if is_compute(cur, gm):
                    return True
                todo.extend(cur.all_input_nodes)
            return False
        if computes(b.args[0]) and computes(b.args[1]):
            return "parallel"
    return "pre-norm"


def group_residual_streams(gm: fx.GraphModule, sites: list[Site]) -> list[Stream]:
    """Chain the rewritable ``sites`` into streams; refuse (set ``reason`` on) sites that fail dominance.

    Sites already carrying a ``reason`` are left out. Returns the streams; every site in a stream gets
    ``stream``, ``index`` and ``kind`` set.
    """
    candidates = [s for s in sites if not s.reason]
    while True:
        streams = _build_streams(candidates, gm)
        refused = []
        for stream in streams:
            values = set(stream.values())
            reach = _descendants(stream.root)
            for site in stream.sites:
                bad = _dominance_violation(site, values, reach)
                if bad:
                    site.reason = (
                        "skip does not dominate the branch: the branch also reads "
                        + ", ".join(n.name for n in bad) + " of the same stream directly"
                    )
                    refused.append(site)
        if not refused:
            break
        candidates = [s for s in candidates if s not in refused]
    for stream in streams:
        for i, site in enumerate(stream.sites):
            site.stream, site.index = stream.id, i
            if site.channel_first:
                site.kind = "conv"
            elif any(is_norm_link(n) for path, _ in stream.successors[site] for n in path):
                site.kind = "post-norm"
            else:
                site.kind = _parallel_or_pre(site, gm)
        # the last site has no link to read its norm from: it is post-norm when its stream is
        for site in stream.sites:
            if not stream.successors[site] and site.kind == "pre-norm" and len(stream.sites) > 1:
                if all(s.kind == "post-norm" for s in stream.sites if stream.successors[s]):
                    site.kind = "post-norm"
    return streams
