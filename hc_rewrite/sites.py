"""What the detection passes find: residual sites and the streams they form, and the stream-wise ops
(links) that carry a stream from one site to the next."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .graph_utils import CAST_TARGETS, LAYER_NORM_TARGETS, RELU_TARGETS, VIEW_TARGETS, shape_key, val, width


@dataclass(eq=False)
class Site:
    """One residual add ``out = skip + branch`` where ``branch = F(skip, side inputs)``."""

    add: fx.Node
    skip: fx.Node | None
    branch: fx.Node | None
    module: str = ""
    branch_module: str = ""
    region: set = field(default_factory=set)  # nodes on paths skip -> branch, branch included
    kind: str = "pre-norm"
    alpha: float = 1  # add(skip, branch, alpha=a): the branch enters scaled by a
    channel_first: bool = False  # conv-net stream [B, C, H, W]: the feature dim is 1
    # parallel blocks written ``(x + attn(ln1(x))) + mlp(ln2(x))``: further branches of the same skip,
    # summed into the site's output; ``add`` is then the last add and ``merged`` the earlier ones
    extra_branches: list = field(default_factory=list)
    merged: list = field(default_factory=list)
    rewritten: bool = False
    reason: str = ""
    placed: str = ""  # structure-preserving form: where the connection is injected (Placement.describe)
    stream: int | None = None
    index: int | None = None  # position of the site in its stream

    @property
    def name(self) -> str:
        return self.add.name


@dataclass(eq=False)
class Stream:
    """A chain (or tree) of sites: the output of one site reaches the skip of the next, possibly through
    stream-wise ops (``links``: casts, dropout, post-norm LayerNorm)."""

    id: int
    root: fx.Node  # skip of the first site: where the stream is expanded
    sites: list = field(default_factory=list)
    # site -> list of (path of link nodes from site.add to next skip, next site)
    successors: dict = field(default_factory=dict)
    width: int = 0
    feature_dim: int = -1  # -1: channels last (transformers); 1: channels first (conv nets)
    ends: list = field(default_factory=list)  # (stream value, reader) pairs that read the reduced stream

    def values(self) -> list:
        """Every original node that carries the stream, in graph order (root, site outputs, links)."""
        vals = [self.root]
        for site in self.sites:
            vals.append(site.add)
            for path, _ in self.successors.get(site, []):
                vals.extend(path)
        seen, out = set(), []
        for v in vals:
            if v not in seen:
                seen.add(v)
                out.append(v)
        return out

    def readers(self) -> list:
        """``(value, reader)`` name pairs for every reader of a stream value that is not part of the stream:
        where the structure-preserving form's readers see the reduced stream (the graph form records the same
        pairs in ``ends`` as it inserts the reductions)."""
        inner = set()
        for site in self.sites:
            inner |= {(site.skip, u) for u in site.skip.users if u in site.region}
            inner.add((site.skip, site.add))
            for path, _nxt in self.successors.get(site, []):
                prev = site.add
                for link in path:
                    inner.add((prev, link))
                    prev = link
        out = []
        for value in self.values()[1:]:  # readers of the root read the original value
            out += [(value.name, u.name) for u in value.users if (value, u) not in inner]
        return out


def link_input(node: fx.Node, gm: fx.GraphModule, channel_first: bool = False) -> fx.Node | None:
    """If ``node`` is a stream-wise op, the stream value it reads (its first argument), else None.

    Stream-wise ops: dropout, casts / clones, ReLU (elementwise), a LayerNorm over the feature dim and
    (channels-last streams) a view or reshape that keeps the feature dim last.
    """
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    x = node.args[0]
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return x if isinstance(mod, torch.nn.Dropout) else None
    if node.op != "call_function":
        return None
    same_shape = shape_key(node) == shape_key(x)
    if node.target in CAST_TARGETS | RELU_TARGETS and same_shape:
        return x
    if channel_first:
        return None
    if node.target in LAYER_NORM_TARGETS and same_shape:
        normalized = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        if list(normalized) == [width(x)]:
            return x
    if node.target in VIEW_TARGETS and len(node.args) > 1 and not node.kwargs:
        shape = list(node.args[1])
        out = val(node)
        if (out is not None and out.dim() >= 1 and shape and isinstance(shape[-1], int)
                and shape[-1] == width(x) and int(out.shape[-1]) == width(x)):
            return x
    return None


def is_norm_link(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in LAYER_NORM_TARGETS
