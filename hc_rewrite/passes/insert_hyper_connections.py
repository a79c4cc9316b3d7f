"""Rewrite each residual stream into an mHC, HC or Frac stream.

Before (one pre-norm stream, two sites)::

    x0 = embed(ids)
    x1 = add(x0, attn(ln1(x0)))
    x2 = add(x1, mlp(ln2(x1)))
    out = ln_f(x2)

After (mHC shown; each variant of :mod:`hc_rewrite.variants` names its expand / reduce, coefficient and pre
ops, e.g. Frac ``split_fractions`` / ``merge_fractions``, ``frac_coeffs``, ``frac_pre``)::

    x0  = embed(ids)
    W0  = hc_rewrite.expand_stream(x0, n, spread)          # [.., n, C]
    c0  = hc_rewrite.mhc_coeffs(W0, hc.s0_0.phi, ...)       # H_pre, H_post, H_res
    b0  = hc_rewrite.stream_pre(W0, c0[0])                 # what the branch reads instead of x0
    W1  = hc_rewrite.stream_post(W0, attn(ln1(b0)), c0[1], c0[2])
    c1  = ...; b1 = hc_rewrite.stream_pre(W1, c1[0])
    W2  = hc_rewrite.stream_post(W1, mlp(ln2(b1)), c1[1], None)
    out = ln_f(hc_rewrite.reduce_stream(W2))

Stream-wise links (dropout, casts, ReLU, views, post-norm LayerNorm) are applied to the widened stream;
every other reader of a stream value (a final norm, an output, ``output_hidden_states``) reads its
reduction; readers of the last site's output read the variant's ``end`` (production mHC's learned head,
``hyper_head(W2, hc.s0_1.hc_fn, ...)``, where the last site's parameters have one). Channels-first streams (conv nets, ``[B, C, H, W]``) are widened channels-last
(``[B, H, W, n, C]``): ``movedim`` at the stream's start, at each branch input and output, and at
each reduction.
The site math is the variant's (:class:`hc_rewrite.variants.base.Variant`: ``expand``, ``site_pre``,
``site_post``, ``reduce``), emitted here as nodes. The site parameters live on ``gm.hc`` (one module per
site, made by the variant).
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from .. import variants
from ..graph_utils import RELU_TARGETS, VIEW_TARGETS, val
from ..ops.library import ops
from ..sites import Stream, is_norm_link, link_input
from ..variants.base import Connections

_MOVEDIM = torch.ops.aten.movedim.int


class _Cursor:
    """Inserts nodes one after another, starting right after ``node``."""

    def __init__(self, graph: fx.Graph, node: fx.Node):
        self.graph, self.node = graph, node

    def _place(self, make):
        with self.graph.inserting_after(self.node):
            self.node = make()
        return self.node

    def call(self, target, args, kwargs=None):
        return self._place(lambda: self.graph.call_function(target, tuple(args), kwargs or {}))

    def module(self, target, args):
        return self._place(lambda: self.graph.call_module(target, tuple(args)))

    def attr(self, target):
        return self._place(lambda: self.graph.get_attr(target))

    def emit(self, target, *args):
        """The ``emit`` of :class:`hc_rewrite.variants.base.Variant`'s site math: one node per op."""
        return self.call(target, args)


def _param_nodes(cur: _Cursor, name: str, names, values) -> list:
    """``get_attr`` nodes of the parameters ``names`` of ``hc.<name>`` (``None`` where the parameter is absent)."""
    return [None if p is None else cur.attr(f"hc.{name}.{p_name}") for p_name, p in zip(names, values)]


def _emit_site(cur: _Cursor, spec, w: fx.Node, name: str, module: nn.Module, channel_first: bool):
    """Coefficients and branch input of one site; returns (branch_in, h_post, h_res)."""
    params = _param_nodes(cur, name, module.coeff_inputs, module.coeff_args())
    branch_in, h_post, h_res = variants.get(spec.variant_key).site_pre(cur.emit, w, params, spec.sinkhorn_iters)
    if channel_first:
        branch_in = cur.call(_MOVEDIM, (branch_in, -1, 1))
    return branch_in, h_post, h_res


def _emit_link(cur: _Cursor, spec, link: fx.Node, w: fx.Node) -> fx.Node:
    """The stream-wise op ``link`` applied to the widened stream ``w``."""
    variant = variants.get(spec.variant_key)
    if link.op == "call_module":
        return cur.module(link.target, (w,))
    if link.target in RELU_TARGETS:
        return cur.call(ops.stream_relu.default, (w, variant.split))
    if link.target in VIEW_TARGETS:
        shape = list(link.args[1])
        tail = [spec.n, variant.row_width(spec.n, shape[-1])]
        return cur.call(link.target, (w, shape[:-1] + tail))
    if is_norm_link(link):
        args = list(link.args) + [None] * (5 - len(link.args))
        weight = link.kwargs.get("weight", args[2])
        bias = link.kwargs.get("bias", args[3])
        eps = link.kwargs.get("eps", args[4] if args[4] is not None else 1e-5)
        return cur.call(ops.stream_layer_norm.default, (w, weight, bias, float(eps), variant.split))
    return cur.call(link.target, (w, *link.args[1:]), dict(link.kwargs))


def insert_hyper_connections(gm: fx.GraphModule, streams: list[Stream], spec, seed: int | None = None) -> int:
    """Rewrite ``streams`` of ``gm`` in place (see module docstring); returns the number of sites rewritten.
    ``seed`` (default ``spec.seed``) initialises the dynamic mHC projections."""
    if hasattr(gm, "hc"):
        raise ValueError("graph module already has an 'hc' submodule: was it rewritten already?")
    g = gm.graph
    holder = Connections()
    gm.add_module("hc", holder)
    generator = torch.Generator().manual_seed(spec.seed if seed is None else seed)
    variant = variants.get(spec.variant_key)
    order = {node: i for i, node in enumerate(g.nodes)}
    dead, rewritten = [], 0
    # a value of an earlier stream that its readers now read reduced: a later stream that starts from it (the
    # same tensor read in another layout) starts from the reduction, so the original add does not stay alive
    reduced_of: dict = {}
    for stream in streams:
        root = reduced_of.get(stream.root, stream.root)
        root_val = val(stream.root)
        channel_first = stream.feature_dim == 1
        cur = _Cursor(g, root)
        start_in = cur.call(_MOVEDIM, (root, 1, -1)) if channel_first else root
        wide = {stream.root: variant.expand(cur.emit, start_in, spec.n)}
        ours = {wide[stream.root], start_in}
        heads: dict = {}  # the last site's add -> (its parameter module's name, the module): a learned collapse
        for site in sorted(stream.sites, key=lambda s: order[s.add]):
            w = wide[site.skip]
            name = f"s{stream.id}_{site.index}"
            is_last = not stream.successors.get(site)
            params = variant.make_params(spec, stream.width, site.index, is_last, generator,
                                         dtype=root_val.dtype, device=root_val.device)
            holder.add_module(name, params)
            if params.head_args():
                heads[site.add] = (name, params)
            cur = _Cursor(g, w)
            branch_in, h_post, h_res = _emit_site(cur, spec, w, name, params, channel_first)
            skip = root if site.skip is stream.root else site.skip
            for user in list(skip.users):
                if user in site.region:
                    user.replace_input_with(skip, branch_in)
            cur = _Cursor(g, site.add)
            y = site.branch
            if site.alpha != 1:
                y = cur.call(torch.ops.aten.mul.Tensor, (y, site.alpha))
            for extra in site.extra_branches:  # parallel block: one site, the branches summed
                y = cur.call(torch.ops.aten.add.Tensor, (y, extra))
            if channel_first:
                y = cur.call(_MOVEDIM, (y, 1, -1))
            wide[site.add] = variant.site_post(cur.emit, w, y, h_post, h_res)
            dead.append(site.add)
            dead.extend(site.merged)
            for path, _nxt in stream.successors.get(site, []):
                prev = site.add
                for link in path:
                    if link not in wide:
                        wide[link] = _emit_link(_Cursor(g, link), spec, link, wide[prev])
                        dead.append(link)
                    prev = link
            rewritten += 1
            site.rewritten = True
        # every other reader of a stream value reads its reduction
        site_of_skip = {(s.skip, s.add) for s in stream.sites}
        for value, w in wide.items():
            if value is stream.root:
                continue  # reduce(expand(x)) is x: readers of the root keep reading it (or its reduction)
            reduced = None
            for user in list(value.users):
                if user in ours or (value, user) in site_of_skip:
                    continue
                if user in wide and link_input(user, gm, channel_first) is value:
                    continue
                if reduced is None:
                    rcur = _Cursor(g, w)
                    if value in heads:  # where the stream ends: the variant's collapse with the last site's head
                        name, params = heads[value]
                        args = _param_nodes(rcur, name, params.head_inputs, params.head_args())
                        reduced = variant.end(rcur.emit, w, args)
                    else:
                        reduced = variant.reduce(rcur.emit, w)
                    if channel_first:
                        reduced = rcur.call(_MOVEDIM, (reduced, -1, 1))
                user.replace_input_with(value, reduced)
                reduced_of[value] = reduced
                stream.ends.append((value.name, user.name))
    for node in sorted(set(dead), key=lambda n: -order[n]):
        if not node.users:
            g.erase_node(node)
    g.lint()
    gm.recompile()
    return rewritten
