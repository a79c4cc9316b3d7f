"""Place each residual site on the user's module tree (the structure-preserving form).

The graph is only read: this pass decides, for every site, which original submodule call the branch
enters through, so that the rewritten model can keep running the user's own Python code and inject the
connection math there (:mod:`hc_rewrite.structured`).

Before (the captured graph of a Llama decoder layer; the ``nn_module_stack`` of each node in brackets)::

    x                                          [model.layers.0]          # the skip (stream value)
    h = rms_norm(x)                            [... .input_layernorm]    # the branch reads x here
    y = attn(h)                                [... .self_attn]
    out = add(x, y)                            [model.layers.0]          # the site's add

After: ``Placement(site, owner="model.layers.0", entries=["model.layers.0.input_layernorm"])``: at run
time a forward pre-hook on ``input_layernorm`` gives the branch ``pre(W)`` instead of ``x``, and the add
``x + y`` in the layer's own code (or in any code that runs it) becomes ``post(W, y)``.

A site is refused, with the reason, when the branch reads the stream in the add's own code rather than
through a submodule call (there is no module boundary to hook), or when an entry module is shared with
another site or reused elsewhere in the same forward (one hook cannot tell the calls apart).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from ..graph_utils import _clean_path
from ..sites import Site, Stream


@dataclass
class Placement:
    """Where one site lives on the module tree."""

    site: Site
    owner: str  # innermost module whose code holds the add ('' for the root)
    entries: list = field(default_factory=list)  # module paths whose forward pre-hook feeds the branch


def module_stack(node: fx.Node) -> list[str]:
    """Dotted paths of the modules active when ``node`` ran, outermost first ([] for the root's code)."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, _cls in stack.values():
        p = _clean_path(str(path))
        if p and p not in out:
            out.append(p)
    return out


def _call_counts(gm: fx.GraphModule) -> dict:
    """How many distinct calls of each module path the graph holds (export keys repeated calls ``@k``)."""
    calls: dict = {}
    for node in gm.graph.nodes:
        for key, (path, _cls) in (node.meta.get("nn_module_stack") or {}).items():
            calls.setdefault(_clean_path(str(path)), set()).add(key)
    return {p: len(keys) for p, keys in calls.items()}


def _entry_of(reader: fx.Node, add_stack: list[str]) -> str | None:
    """The outermost module of ``reader`` that the add's code calls into (None: read in the add's code)."""
    inside = set(add_stack)
    for path in module_stack(reader):
        if path not in inside:
            return path
    return None


def place_sites_on_modules(gm: fx.GraphModule, streams: list[Stream]) -> list[Placement]:
    """Return a :class:`Placement` for every site of ``streams`` that can be placed; the others get
    ``reason`` set (see module docstring). The caller regroups the streams when any site was refused."""
    calls = _call_counts(gm)
    placements, used = [], {}
    for stream in streams:
        for site in stream.sites:
            add_stack = module_stack(site.add)
            owner = add_stack[-1] if add_stack else ""
            readers = [u for u in site.skip.users if u in site.region]
            entries, bad = [], None
            for r in readers:
                e = _entry_of(r, add_stack)
                if e is None:
                    where = f"'{owner}'" if owner else "the model's top-level forward"
                    bad = (f"the branch reads the stream in {where}'s own code ({r.name}), not through a "
                           "submodule call: no module boundary to inject the connection at (form='graph' can)")
                    break
                if e not in entries:
                    entries.append(e)
            if bad is None:
                for e in entries:
                    if calls.get(e, 1) > 1:
                        bad = (f"the branch enters through '{e}', which runs {calls[e]} times per forward: one "
                               "hook cannot tell its calls apart (form='graph' can)")
                        break
                    if e in used:
                        bad = f"the branch entry '{e}' is shared with site {used[e].name}"
                        break
            if bad is not None:
                site.reason = bad
                continue
            for e in entries:
                used[e] = site
            placements.append(Placement(site=site, owner=owner, entries=entries))
    return placements
