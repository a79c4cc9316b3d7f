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

Two more shapes of branch are placed:

* **Functional entries**: the branch reads the stream in the add's own code before its first submodule
  (``h + self.f(torch.tanh(h))``, ``x + self.attn(x * scale)``, ``x + torch.tanh(x)``). ``functional`` lists the
  ops that read it (``["tanh"]``); ``entries`` are the submodules those ops feed (none: the ops feed the add). At
  run time the ops on the stream value are recorded and replayed on ``pre(W)`` where the branch enters its
  first submodule, or at the add (:class:`hc_rewrite.stream_value.Derived`).
* **Blocks that run several times per forward** (ALBERT's shared layer, ``for _ in range(k): x = block(x)``):
  export keys each call of a module apart (``block``, ``block@1``, ...), so each call's site gets its own
  placement; ``calls`` says how often the entry module ran. At run time one hook on the module tells the calls
  apart by the stream position of the value it is given.

A site is refused, with the reason, when its entry module call is shared with another site (one call of a
module cannot feed two sites).
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
    calls: int = 1  # how often the entry modules run per forward (> 1: a looped / shared block)
    functional: list = field(default_factory=list)  # ops of the add's own code that read the stream first

    def describe(self) -> str:
        """How the site is placed, for the report."""
        entry = ", ".join(self.entries) or "the add"
        if self.functional:
            where = f"the code of '{self.owner}'" if self.owner else "the top-level forward's code"
            text = f"functional entry: {'/'.join(self.functional)} in {where}, replayed on pre(W) at {entry}"
        else:
            text = f"entry {entry}"
        if self.calls > 1:
            text += f" (one of its {self.calls} calls per forward)"
        return text


def module_stack(node: fx.Node) -> list[str]:
    """Dotted paths of the modules active when ``node`` ran, outermost first ([] for the root's code)."""
    return [p for p, _key in _stack_keys(node)]


def _stack_keys(node: fx.Node) -> list[tuple[str, str]]:
    """``(path, call key)`` of the modules active when ``node`` ran, outermost first; the key tells calls of one
    module apart (export: ``L__self___block``, ``L__self___block@1``, ...)."""
    stack = node.meta.get("nn_module_stack") or {}
    out, seen = [], set()
    for key, (path, _cls) in stack.items():
        p = _clean_path(str(path))
        if p and p not in seen:
            seen.add(p)
            out.append((p, str(key)))
    return out


def _call_counts(gm: fx.GraphModule) -> dict:
    """How many distinct calls of each module path the graph holds (export keys repeated calls ``@k``)."""
    calls: dict = {}
    for node in gm.graph.nodes:
        for key, (path, _cls) in (node.meta.get("nn_module_stack") or {}).items():
            calls.setdefault(_clean_path(str(path)), set()).add(key)
    return {p: len(keys) for p, keys in calls.items()}


def _entry_of(reader: fx.Node, add_stack: list[str]):
    """``(path, call key)`` of the outermost module of ``reader`` that the add's code calls into (None: read in
    the add's own code)."""
    inside = set(add_stack)
    for path, key in _stack_keys(reader):
        if path not in inside:
            return path, key
    return None


def _op_name(node: fx.Node) -> str:
    """``aten.tanh.default`` -> ``tanh``; ``aten.native_layer_norm.default`` -> ``layer_norm``."""
    target = node.target
    name = getattr(target, "__name__", str(target)).split(".")[0]
    return name.removeprefix("native_").strip("_")


def _functional_entries(reader: fx.Node, site: Site, add_stack: list[str]):
    """The module calls that the ops of the add's own code starting at ``reader`` feed, walking forward inside
    the branch: ``(entries, ops)``. Ops that feed the add without a module leave no entry."""
    entries, ops, seen, todo = [], [], set(), [reader]
    while todo:
        node = todo.pop()
        if node in seen or node not in site.region:
            continue
        seen.add(node)
        e = _entry_of(node, add_stack)
        if e is not None:
            if e not in entries:
                entries.append(e)
            continue
        if node.op == "call_function":
            ops.append(node)
        todo.extend(node.users)
    return entries, ops


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
            entries, functional, bad = [], [], None
            for r in readers:
                e = _entry_of(r, add_stack)
                found = [e] if e is not None else None
                if found is None:
                    found, ops = _functional_entries(r, site, add_stack)
                    functional.extend(n for n in ops if n not in functional)
                for f in found:
                    if f not in entries:
                        entries.append(f)
            for e in entries:
                if e in used:
                    bad = (f"the branch entry '{e[0]}' (call {e[1]}) is shared with site {used[e].name}: one call "
                           "of a module cannot feed two sites")
                    break
            if bad is not None:
                site.reason = bad
                continue
            for e in entries:
                used[e] = site
            paths = list(dict.fromkeys(p for p, _key in entries))
            # the ops that read the stream itself (else the first op of the walk)
            names = list(dict.fromkeys(_op_name(n) for n in functional if n in readers)) or \
                [_op_name(n) for n in functional[:1]]
            placements.append(Placement(site=site, owner=owner, entries=paths,
                                        calls=max([calls.get(p, 1) for p in paths], default=1), functional=names))
    return placements
