"""Find residual sites: adds ``out = skip + branch`` where the branch is a real computation of the skip.

Before (any spelling of the add)::

    h   = layer_norm(x); ...; y = addmm(b, h, W)       # branch F(x)
    out = aten.add.Tensor(y, x)                          # or x + y, torch.add, x.add_(y), alpha=1

After: the graph is unchanged; the pass returns one :class:`~hc_rewrite.sites.Site` per add whose

* two operands are floating tensors of the same shape as the result (no broadcasting: this excludes
  bias adds, ``eps`` adds and position-embedding adds of another shape),
* one operand (the skip) is an ancestor of the other (the branch): adds of two independent values,
  such as token + position embeddings or RoPE's ``q*cos + rotate(q)*sin``, are not residual,
* and the nodes between them hold a real computation (matmul, linear, conv, attention): an elementwise
  tweak such as GELU's ``x + 0.044715 * x**3`` is not a residual branch.

* and the skip is the value the branch was computed from, not a side input that reaches it through other
  residual computations: MPNet / T5 / DeBERTa add one position bias, computed once, to the attention scores of
  every layer (``scores += position_bias``); the bias is an ancestor of layer 2's scores, but only through
  layer 1's residual sites. A candidate whose branch contains the add of a site accepted before it (graph
  order) is therefore not a site of the skip's stream: it is a side-input add and is dropped, unless it wraps
  sites of its own skip (a residual around residual blocks): then it is kept, refused, and its inner sites are
  the stream.

Symbolic sizes of the two operands are compared by their example values (:func:`~hc_rewrite.graph_utils.same_shape`):
Swin's window-attention branch spells ``(s1//4)*(s2//4)`` as a longer expression of the same value.
The feature axis of each site is inferred afterwards (:mod:`~hc_rewrite.passes.infer_feature_axes`).

Parallel blocks written ``(x + attn(ln1(x))) + mlp(ln2(x))`` make one site with two branches: an add
of a site's output (read by nothing else) and a further real computation of the same skip that does not
read that output is merged into the site.

Adds that pass these tests but cannot be rewritten (the skip scaled by ``alpha``) come back with
``reason`` set. Whether the skip dominates the branch within its stream is checked once streams are
known (:mod:`~hc_rewrite.passes.group_residual_streams`).
"""
from __future__ import annotations

import torch.fx as fx

from ..graph_utils import (
    add_alpha, data_inputs, data_users, is_add, is_compute, is_float_tensor, module_path, same_shape, topo_index,
)
from ..sites import Site


def _ancestors_within(node: fx.Node, lo: int, index: dict) -> set:
    """Ancestors of ``node`` (itself included) whose graph position is >= ``lo``."""
    seen, todo = {node}, [node]
    while todo:
        cur = todo.pop()
        for inp in data_inputs(cur):
            if inp not in seen and index[inp] >= lo:
                seen.add(inp)
                todo.append(inp)
    return seen


def _descendants_within(node: fx.Node, hi: int, index: dict) -> set:
    seen, todo = {node}, [node]
    while todo:
        cur = todo.pop()
        for user in data_users(cur):
            if user not in seen and index[user] <= hi:
                seen.add(user)
                todo.append(user)
    return seen


def _branch_module(region: set, gm: fx.GraphModule) -> str:
    """The innermost module holding every compute op of the branch (e.g. ``transformer.h.0.attn``)."""
    paths = [module_path(n).split(".") for n in region if is_compute(n, gm)]
    common = paths[0]
    for p in paths[1:]:
        k = 0
        while k < min(len(common), len(p)) and common[k] == p[k]:
            k += 1
        common = common[:k]
    return ".".join(common)


def find_residual_sites(gm: fx.GraphModule) -> list[Site]:
    """Return the residual sites of ``gm`` in graph order (see module docstring)."""
    index = topo_index(gm.graph)
    sites = []
    for node in gm.graph.nodes:
        if not is_add(node) or len(node.args) < 2:
            continue
        a, b = node.args[0], node.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or a is b:
            continue
        if not (is_float_tensor(a) and is_float_tensor(b)):
            continue
        if not (same_shape(a, node) and same_shape(b, node)):
            continue
        if index[a] < index[b]:
            early, late = a, b
        else:
            early, late = b, a
        back = _ancestors_within(late, index[early], index)
        if early not in back:
            continue  # independent operands: not a residual add
        skip, branch = early, late
        region = back & _descendants_within(skip, index[branch], index)
        region.discard(skip)
        if not any(is_compute(n, gm) for n in region):
            continue  # no real computation between skip and branch
        site = Site(
            add=node, skip=skip, branch=branch, module=module_path(node),
            branch_module=_branch_module(region, gm), region=region,
        )
        alpha = add_alpha(node)
        if alpha != 1 and skip is node.args[1]:
            site.reason = f"the skip is scaled by alpha={alpha} (branch + alpha*skip), not a residual add"
        site.alpha = alpha
        sites.append(site)
    return _drop_side_input_adds(_merge_parallel_branches(gm, sites, index))


def _drop_side_input_adds(sites: list[Site]) -> list[Site]:
    """See the module docstring: candidates whose branch runs through an accepted site's add. In graph order,
    so that a real site whose branch holds a side-input add (``scores += position_bias``) is not taken for one:
    only adds of sites already accepted count."""
    accepted, kept = {}, []
    for site in sites:
        inside = [a for a in accepted if a in site.region]
        if not inside:
            for add in (site.add, *site.merged):
                accepted[add] = site
            kept.append(site)
        elif any(accepted[a].skip is site.skip for a in inside):
            names = ", ".join(a.name for a in inside[:4])
            site.reason = (f"a residual around residual blocks: its branch contains the residual site(s) {names} "
                           "of the same skip, which are rewritten instead")
            kept.append(site)
    return kept


def _merge_parallel_branches(gm: fx.GraphModule, sites: list[Site], index: dict) -> list[Site]:
    by_add = {s.add: s for s in sites}
    for node in gm.graph.nodes:
        if not is_add(node) or node in by_add or len(node.args) < 2 or add_alpha(node) != 1:
            continue
        a, b = node.args[0], node.args[1]
        for out, other in ((a, b), (b, a)):
            site = by_add.get(out)
            if site is None or site.reason or len(out.users) != 1 or not isinstance(other, fx.Node):
                continue
            if not same_shape(other, out):
                continue
            back = _ancestors_within(other, index[site.skip], index)
            if site.skip not in back or out in back:
                continue
            region = back & _descendants_within(site.skip, index[other], index)
            region.discard(site.skip)
            if not any(is_compute(n, gm) for n in region):
                continue
            del by_add[site.add]
            site.merged.append(site.add)
            site.extra_branches.append(other)
            site.add = node
            site.region |= region
            by_add[node] = site
            break
    return sorted(by_add.values(), key=lambda s: index[s.add])
