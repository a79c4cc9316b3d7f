"""The pass pipeline, written once: which passes run, in which order (docs/design.md has the picture).

Each stage is a :class:`PassManager`, an ordered list of :class:`Pass` entries in the style of torch-tensorrt's
``DynamoPassManager`` (``build_from_passlist``, ``add_pass_with_index``, ``remove_pass_with_index``); a pass
reads the fields of a :class:`PassContext` it names and writes its result to one::

    capture ──▶ ANALYSIS: remove_metadata_asserts ─▶ restore_dropout_modules ─▶ restore_batch_norm_modules
                          ─▶ find_residual_sites ─▶ infer_feature_axes ─▶ group_residual_streams
                          ─▶ find_hyper_streams
            ├─▶ GRAPH_FORM:  insert_hyper_connections                           (rewrite(form="graph"))
            └─▶ MODULE_FORM: place_sites_on_modules, regrouping refused sites   (rewrite(form="module"))
    torch.compile ──▶ LOWERING: tag_stream_recompute ─▶ fuse_stream_ops ─▶ lower_stream_ops (CUDA)
                                ─▶ decompose_stream_ops                   (:func:`lower`: backend and Inductor pass)

Users: :mod:`hc_rewrite.api` (ANALYSIS and the form's stage), :mod:`hc_rewrite.backend` (:func:`lower`),
``benchmarks/pass_speed.py`` and the tests (a prefix of ANALYSIS: :meth:`PassManager.until`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .find_hyper_streams import find_hyper_streams
from .find_residual_sites import find_residual_sites
from .fuse_stream_ops import fuse_stream_ops
from .infer_feature_axes import infer_feature_axes
from .group_residual_streams import group_residual_streams
from .insert_hyper_connections import insert_hyper_connections
from .lower_stream_ops import lower_stream_ops, stream_op_nodes
from .decompose_stream_ops import decompose_stream_ops
from .place_sites_on_modules import place_sites_on_modules
from .tag_stream_recompute import tag_stream_recompute
from .remove_metadata_asserts import remove_metadata_asserts
from .restore_batch_norm_modules import restore_batch_norm_modules
from .restore_dropout_modules import restore_dropout_modules


@dataclass
class PassContext:
    """What the passes of a pipeline read and write."""

    gm: fx.GraphModule
    spec: object = None  # the HCSpec (GRAPH_FORM)
    sites: list = field(default_factory=list)  # find_residual_sites
    streams: list = field(default_factory=list)  # group_residual_streams (regrouped by MODULE_FORM)
    placements: list = field(default_factory=list)  # MODULE_FORM
    hyper: list = field(default_factory=list)  # find_hyper_streams: streams that already are hyper-connections
    fused: dict | None = None  # LOWERING: {reference op: fused op}; None: hc_rewrite.kernels.fused_ops()
    results: dict = field(default_factory=dict)  # pass name -> what it returned


@dataclass(frozen=True)
class Pass:
    """One pass: ``fn(ctx.gm, *[ctx.<f> for f in reads], **kwargs)``, its result stored in ``ctx.<writes>``
    (a tuple result is spread over several fields) and in ``ctx.results[name]``."""

    fn: Callable
    reads: tuple = ()
    writes: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.fn.__name__

    def __call__(self, ctx: PassContext) -> None:
        out = self.fn(ctx.gm, *(getattr(ctx, f) for f in self.reads), **self.kwargs)
        ctx.results[self.name] = out
        if len(self.writes) == 1:
            setattr(ctx, self.writes[0], out)
        elif self.writes:
            for name, value in zip(self.writes, out):
                setattr(ctx, name, value)


class PassManager:
    """An ordered list of passes, run one after the other on a :class:`PassContext`."""

    def __init__(self, passes=()):
        self.passes = list(passes)

    @classmethod
    def build_from_passlist(cls, passes) -> "PassManager":
        return cls(passes)

    def add_pass_with_index(self, lowering_pass: Pass, index: int | None = None) -> None:
        self.passes.insert(len(self.passes) if index is None else index, lowering_pass)

    def remove_pass_with_index(self, index: int) -> None:
        del self.passes[index]

    @property
    def names(self) -> list:
        return [p.name for p in self.passes]

    def until(self, name: str) -> "PassManager":
        """The passes before the one called ``name`` (a test's view of the graph just before that pass)."""
        return PassManager(self.passes[: self.names.index(name)])

    def without(self, *names: str) -> "PassManager":
        """The passes not called any of ``names``."""
        return PassManager([p for p in self.passes if p.name not in names])

    def __call__(self, ctx: PassContext) -> PassContext:
        for p in self.passes:
            p(ctx)
        return ctx

    def __str__(self) -> str:
        return " -> ".join(self.names)


def place_sites_regrouping(gm: fx.GraphModule, sites: list, streams: list):
    """:func:`place_sites_on_modules`; a refused site splits its stream, so regroup (without it) and place
    again until every site of every stream is placed. Returns ``(streams, placements)``."""
    while True:
        placements = place_sites_on_modules(gm, streams)
        placed = {p.site for p in placements}
        if all(s in placed for st in streams for s in st.sites):
            return streams, placements
        streams = group_residual_streams(gm, sites)


_NO_RECOMPILE = {"recompile": False}  # the cleanup passes leave recompiling to the pipeline's user

#: Cleanup of the captured graph, then detection. The graph is not recompiled: its user does that once.
ANALYSIS = PassManager.build_from_passlist([
    Pass(remove_metadata_asserts, kwargs=_NO_RECOMPILE),
    Pass(restore_dropout_modules, kwargs=_NO_RECOMPILE),
    Pass(restore_batch_norm_modules, kwargs=_NO_RECOMPILE),
    Pass(find_residual_sites, writes=("sites",)),
    Pass(infer_feature_axes, reads=("sites",), writes=("sites",)),
    Pass(group_residual_streams, reads=("sites",), writes=("streams",)),
    Pass(find_hyper_streams, writes=("hyper",)),
])
#: ``rewrite(form="graph")``: the streams rewritten in the graph itself (recompiles it).
GRAPH_FORM = PassManager.build_from_passlist([
    Pass(insert_hyper_connections, reads=("streams", "spec")),
])
#: ``rewrite(form="module")``: the graph is only read; every site gets the module its branch enters through.
MODULE_FORM = PassManager.build_from_passlist([
    Pass(place_sites_regrouping, reads=("sites", "streams"), writes=("streams", "placements")),
])
#: The ``hc_rewrite`` compile backend: the stream ops to the fused kernels where they run, the rest to the
#: forms Inductor fuses (see :func:`lower`).
LOWERING = PassManager.build_from_passlist([
    Pass(tag_stream_recompute),
    Pass(fuse_stream_ops),
    Pass(lower_stream_ops, reads=("fused",)),
    Pass(decompose_stream_ops),
])
#: The passes of :data:`LOWERING` that put in fused kernels (run where the kernels run).
KERNEL_PASSES = ("fuse_stream_ops", "lower_stream_ops")


def analyse(gm: fx.GraphModule, spec=None) -> PassContext:
    """Run :data:`ANALYSIS` on ``gm`` (in place); the context holds the sites and streams."""
    return ANALYSIS(PassContext(gm, spec))


def _meta_value(node):
    meta = getattr(node, "meta", {})
    return meta.get("val", meta.get("example_value"))


def node_devices(node: fx.Node) -> set:
    """Device types of the tensors ``node`` reads (from FX meta: ``val`` or Dynamo's ``example_value``)."""
    devices = set()
    for arg in pytree.tree_leaves((node.args, node.kwargs)):
        if isinstance(arg, fx.Node):
            for v in pytree.tree_leaves(_meta_value(arg)):
                if isinstance(v, torch.Tensor):
                    devices.add(v.device.type)
    return devices


def runs_on_cuda(gm: fx.GraphModule) -> bool:
    """Whether every stream op of ``gm`` reads CUDA tensors only: where the fused kernels run. This is the one
    place the lowering asks it (a CPU graph keeps the reference ops, which AOTAutograd decomposes)."""
    nodes = stream_op_nodes(gm)
    return bool(nodes) and all(node_devices(n) == {"cuda"} for n in nodes)


def lower(gm: fx.GraphModule, *, everywhere: bool = False, combos: bool = True, fused: dict | None = None,
          kernels: bool = True, decompose: bool = True, recompute: bool = True) -> int:
    """Run :data:`LOWERING` on ``gm`` in place. The kernel passes run where the stream ops run on CUDA
    (``everywhere``: on any device; off CUDA the fused ops run the reference math, or the Triton interpreter: for
    testing); ``combos=False`` leaves out the fusion (single-op swaps only), ``kernels=False`` both; ``fused``
    replaces the kernels' table (tests). ``decompose_stream_ops`` runs on every device unless ``decompose=False``;
    ``recompute=False`` leaves out ``tag_stream_recompute`` (AOTAutograd then saves what its partitioner picks).
    Returns the number of nodes fused, swapped or decomposed."""
    passes = LOWERING
    if not kernels or not (everywhere or runs_on_cuda(gm)):
        passes = passes.without(*KERNEL_PASSES)
    elif not combos:
        passes = passes.without("fuse_stream_ops")
    if not decompose:
        passes = passes.without("decompose_stream_ops")
    if not recompute:
        passes = passes.without("tag_stream_recompute")
    ctx = passes(PassContext(gm, fused=fused))
    return sum(v for k, v in ctx.results.items() if k != "tag_stream_recompute")
