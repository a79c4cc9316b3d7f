"""Fuse the per-site op chains of a rewritten graph into the fused combination ops of the kernels.

Part of the lowering (:func:`hc_rewrite.passes.pipeline.lower`, run by the ``hc_rewrite`` compile backend
before :mod:`~hc_rewrite.passes.lower_stream_ops`). Each variant declares its combinations
(:attr:`~hc_rewrite.variants.base.Variant.fused_pre`, :attr:`~hc_rewrite.variants.base.Variant.fused_post_pre`);
they exist as ``torch.ops.hc_fused.*`` once :mod:`hc_rewrite.kernels` is loaded (triton installed).

Before (two dynamic mHC sites)::

    c0 = hc_rewrite.mhc_coeffs(W0, phi0, alpha0, b_pre0, b_post0, b_res0, 1e-06, 20)
    b0 = hc_rewrite.stream_pre(W0, getitem(c0, 0))
    W1 = hc_rewrite.stream_post(W0, F0(b0), getitem(c0, 1), getitem(c0, 2))
    c1 = hc_rewrite.mhc_coeffs(W1, phi1, alpha1, b_pre1, b_post1, None, 1e-06, 20)
    b1 = hc_rewrite.stream_pre(W1, getitem(c1, 0))

After::

    f0 = hc_fused.mhc_pre(W0, phi0, alpha0, b_pre0, b_post0, b_res0, 1e-06, 20)   # coefficients + pre
    b0 = getitem(f0, 0)
    f1 = hc_fused.mhc_post_pre(W0, F0(b0), getitem(f0, 2), getitem(f0, 3),
                               phi1, alpha1, b_pre1, b_post1, None, 1e-06, 20)  # post + next coefficients + pre
    W1, b1 = getitem(f1, 0), getitem(f1, 1)

1. ``<coefficient op> -> <pre op>`` of a variant becomes its ``fused_pre`` op when the coefficient op's
   ``h_pre`` is read by the pre op only: the stream is read once for both.
2. then ``stream_post -> <fused_pre op>`` becomes the variant's ``fused_post_pre`` op, when nothing reads the
   new stream before the next site's coefficients and the arguments fit the fused op's schema (mHC: the
   dynamic form only; ``phi`` is not optional there).

Works on any FX graph holding the ``hc_rewrite`` ops (the graph of ``rewrite(form="graph")``, or the one
``torch.compile`` hands a backend) or their same-schema ``hc_fused`` versions. Remaining single ops are left
alone (:mod:`~hc_rewrite.passes.lower_stream_ops` swaps them). The fused ops fall back to the reference math
where the kernels cannot run, so the fused graph computes the same on any device.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .. import variants
from .tag_stream_recompute import copy_tags


def _targets(name: str) -> set:
    """The reference op ``name`` and its same-schema fused version, if the kernels have one."""
    out = {getattr(torch.ops.hc_rewrite, name).default}
    if hasattr(torch.ops.hc_fused, name):
        out.add(getattr(torch.ops.hc_fused, name).default)
    return out


def _getitems(node: fx.Node):
    """``{index: getitem nodes}`` of a multi-output node, or ``None`` if it has other users."""
    items = {}
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem:
            return None
        items.setdefault(user.args[1], []).append(user)
    return items


def _replace_outputs(graph: fx.Graph, old_items: dict, new: fx.Node, index_map: dict):
    """Point the users of ``old getitem(i)`` at ``getitem(new, index_map[i])``; erase the old getitems."""
    for i, nodes in old_items.items():
        with graph.inserting_after(new):
            repl = graph.call_function(operator.getitem, (new, index_map[i]))
        for node in nodes:
            node.replace_all_uses_with(repl)
            graph.erase_node(node)


def _fits(op, args) -> bool:
    """Whether ``args`` pass ``None`` only where the schema of ``op`` allows it."""
    return all(a is not None or isinstance(s.type, torch._C.OptionalType)
               for a, s in zip(args, op._schema.arguments))


def _fuse_coeff_pre(gm: fx.GraphModule, combos: dict) -> int:
    pats = [(_targets(v.coeff_name), _targets(v.pre_name), combos[v.fused_pre])
            for v in variants.all_variants() if v.fused_pre in combos]
    g, count = gm.graph, 0
    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        for coeff_t, pre_t, combo in pats:
            if node.target not in coeff_t:
                continue
            items = _getitems(node)
            if not items or len(items.get(0, [])) != 1:
                break
            h_pre = items[0][0]
            pres = list(h_pre.users)
            if (len(pres) != 1 or pres[0].op != "call_function" or pres[0].target not in pre_t
                    or pres[0].args[0] is not node.args[0] or pres[0].args[1] is not h_pre or pres[0].kwargs):
                break
            pre = pres[0]
            with g.inserting_before(node):
                new = g.call_function(combo, tuple(node.args), dict(node.kwargs))
                copy_tags(node, new)
            with g.inserting_after(new):
                branch = g.call_function(operator.getitem, (new, 0))
            pre.replace_all_uses_with(branch)
            g.erase_node(pre)
            _replace_outputs(g, items, new, {0: 1, 1: 2, 2: 3})
            g.erase_node(node)
            count += 1
            break
    return count


def _fuse_post_pre(gm: fx.GraphModule, combos: dict) -> int:
    pats = {combos[v.fused_pre]: combos[v.fused_post_pre] for v in variants.all_variants()
            if v.fused_pre in combos and v.fused_post_pre in combos}
    post_t = _targets("stream_post")
    g, count = gm.graph, 0
    order = {n: i for i, n in enumerate(g.nodes)}
    for node in list(g.nodes):
        if node.op != "call_function" or node.target not in pats:
            continue
        combo = pats[node.target]
        post = node.args[0]
        if (not isinstance(post, fx.Node) or post.op != "call_function" or post.target not in post_t
                or post.kwargs or node.kwargs or len(post.args) != 4):
            continue
        args = tuple(post.args) + tuple(node.args[1:])
        if not _fits(combo, args):
            continue
        if any(order[u] < order[node] for u in post.users if u is not node):
            continue  # something reads the new stream before the next site's coefficients
        items = _getitems(node)
        if items is None:
            continue
        with g.inserting_before(node):
            new = g.call_function(combo, args)
            copy_tags(post, new)  # the post's group: the new stream it returns is what a later group reads
        with g.inserting_after(new):
            w1 = g.call_function(operator.getitem, (new, 0))
        _replace_outputs(g, items, new, {i: i + 1 for i in range(6)})
        g.erase_node(node)
        post.replace_all_uses_with(w1)
        g.erase_node(post)
        count += 1
    return count


def fuse_stream_ops(gm: fx.GraphModule, post_pre: bool = True) -> int:
    """Apply the fusions above to ``gm`` in place; returns the number of fused ops inserted (0 without
    triton, where the ``hc_fused`` ops do not exist). ``post_pre=False``: only step 1."""
    from ..kernels import fused_combos

    combos = fused_combos()
    if not combos:
        return 0
    count = _fuse_coeff_pre(gm, combos)
    if post_pre:
        count += _fuse_post_pre(gm, combos)
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
