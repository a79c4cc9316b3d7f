"""The structure-preserving rewrite: the user's model, with its residual streams widened.

:func:`build_plan` turns the graph analysis (streams, sites, their placement on modules) into a
:class:`Plan`, plain data that is saved with the model. :func:`attach` applies a plan to a model: it adds
the connection parameters under ``model.hc`` (``hc.s<stream>_<position>``, the names of the graph form)
and registers one forward pre-hook per branch entry (:class:`~hc_rewrite.stream_value.EntryHook`) plus a
forward hook on the root that hands back plain tensors. Nothing else changes: the class, every submodule,
every ``forward`` and the user's Python code stay as they are. See docs/design.md, "Structure-preserving
form".
"""
from __future__ import annotations

import inspect
import json
import types
from dataclasses import asdict, dataclass, field

import torch
import torch.utils._pytree as pytree
from torch import nn

from . import variants
from .graph_utils import val
from .variants.base import Connections
from .spec import HCSpec
from .stream_value import CheckpointMode, EntryHook, LoopEntryHook, StartHook, StreamInfo, aliased_inputs, plain_outputs

PLAN_VERSION = 1
#: Attribute set on every parameter of a model :func:`attach` made: the compile backend recognises the graphs
#: of such a model (which hold no stream op: those run between the graphs) by their parameters.
MARK = "_hc_rewritten"


class _Owner:
    """The token that tells one rewritten model's stream values from another's (a deep copy gets its own)."""


class RootPreHook:
    """Root forward pre-hook of a rewritten model: marks the model's parameters (:data:`MARK`) on its first call, and
    again on the first call of every deep copy (``Parameter.__deepcopy__`` drops attributes). It touches no tensor."""

    def __init__(self):
        self.done = False

    def __deepcopy__(self, memo):
        return RootPreHook()

    def __call__(self, module, args, kwargs):
        if not self.done:
            mark_parameters(module)
            self.done = True


def mark_parameters(model: nn.Module) -> None:
    """Set :data:`MARK` on every parameter of ``model``."""
    for p in model.parameters():
        setattr(p, MARK, True)


def _rewritten_root_forward(self, *args, **kwargs):
    """The forward of a rewritten root (bound to it by :func:`pin_forward`): the class's own ``forward`` on aliases
    of the caller's tensors, handing back plain tensors, inside a :class:`~hc_rewrite.stream_value.CheckpointMode`
    (activation checkpointing inside compiled blocks; it passes everything else through: no cost measured in eager).
    Inside ``forward``, not in root hooks: ``torch.compile`` of a module runs the module's own hooks as frames of
    their own (three graphs for one model)."""
    args, kwargs = aliased_inputs(args, kwargs)
    with CheckpointMode():
        return plain_outputs(type(self).forward(self, *args, **kwargs))


_ROOT_FORWARDS: dict = {}


def _root_forward_for(cls):
    """One function per class, with the class forward's signature (``generate`` and ``Trainer`` read it)."""
    fn = _ROOT_FORWARDS.get(cls)
    if fn is None:
        def fn(self, *args, **kwargs):
            return _rewritten_root_forward(self, *args, **kwargs)
        fn.__name__ = fn.__qualname__ = "forward"
        fn.__doc__ = getattr(cls.forward, "__doc__", None)
        fn.__signature__ = inspect.signature(cls.forward)
        fn._hc_root_forward = True
        _ROOT_FORWARDS[cls] = fn
    return fn


def pin_forward(module: nn.Module, root: bool = False) -> None:
    """Give ``module`` an instance attribute ``forward``: its class's own ``forward``, bound to it.

    Nothing changes when it runs (same function, same signature for ``inspect``), but it is state that
    ``torch.compile`` guards on. A rewritten model shares its classes, and so its code objects, with the original,
    and dynamo installs no guard on an empty hook dict (``torch._dynamo.config.skip_nnmodule_hook_guards``, on by
    default): code compiled for the original (no hooks) would pass its guards on the rewritten model and run
    without the connections, silently. Dynamo does guard, for every module a compiled frame calls, that the
    instance holds no ``forward`` of its own (``not ___dict_contains('forward', m.__dict__)``): pinned, every
    frame compiled for the original that calls one of these modules fails that guard on the rewritten model and
    is compiled anew. The bound method is not guarded by identity, so the blocks of one model still share one
    compiled graph. See docs/design.md, "Compile caches".
    """
    if "forward" not in module.__dict__:
        fn = _root_forward_for(type(module)) if root else type(module).forward
        module.forward = types.MethodType(fn, module)


def unpin_forward(module: nn.Module) -> None:
    """Undo :func:`pin_forward` (a ``forward`` the user set on the instance stays)."""
    bound = module.__dict__.get("forward")
    if (isinstance(bound, types.MethodType) and bound.__self__ is module
            and (bound.__func__ is getattr(type(module), "forward", None)
                 or getattr(bound.__func__, "_hc_root_forward", False))):
        del module.__dict__["forward"]


class record_calls:
    """While the rewrite's check run traces (``stream_value.TRACE``): which module returned / took which tensor
    object, and how often each module ran, so that a stream whose first value had to be marked can be started by a
    :class:`~hc_rewrite.stream_value.StartHook` instead (see :func:`choose_starts`)."""

    def __init__(self, model: nn.Module):
        self.model, self.handles = model, []

    def __enter__(self):
        from .stream_value import TRACE

        def leaves(value):
            return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]

        for path, m in self.model.named_modules():
            if path == "hc" or path.startswith("hc."):
                continue

            def pre(module, args, kwargs, path=path):
                if TRACE.on:
                    TRACE.calls[path] = TRACE.calls.get(path, 0) + 1
                    for kind, key, value in [*(("arg", i, a) for i, a in enumerate(args)),
                                         *(("kw", k, v) for k, v in kwargs.items())]:
                        for t in leaves(value):
                            # a tensor passed directly: where it was passed; inside a structure: only that it was
                            TRACE.received.setdefault(id(t), {})[path] = [kind, key] if t is value else None
                            TRACE.keep.append(t)

            def post(module, args, kwargs, out, path=path):
                if TRACE.on:
                    for t in leaves(out):
                        TRACE.returned[id(t)] = path  # an outer module returning the same object comes later
                        TRACE.keep.append(t)

            self.handles.append(m.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
            self.handles.append(m.register_forward_hook(post, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def choose_starts(plan: Plan) -> dict:
    """``{first site name: [kind, path]}`` for the streams of ``plan`` whose first value the check run had to mark
    (``TRACE.starts``): ``["output", M]`` when a module ``M`` that ran once returned that very tensor object (its
    forward hook will return the stream value, Llama: ``embed_tokens``), else ``["input", M]`` when the module whose
    code holds the first site's add ran once and took it as an input (its forward pre-hook will hand it the stream
    value), else nothing (the entry hook keeps marking it: eager only)."""
    from .stream_value import TRACE

    out = {}
    for stream in plan.streams:
        seen = TRACE.starts.get(stream.id)
        first = stream.first
        if seen is None or first is None:
            continue
        returned, received = seen
        if returned is not None and TRACE.calls.get(returned) == 1:
            out[first.name] = ["output", returned]
        elif first.owner and first.owner in received and TRACE.calls.get(first.owner) == 1:
            out[first.name] = ["input", first.owner, received[first.owner]]
    return out


def is_structured_graph(gm, example_inputs) -> bool:
    """Whether a dynamo graph may be a piece of a model of the structure-preserving form: it holds parameters of
    such a model (see :data:`MARK`) or none at all (code between two modules, e.g. mask building)."""
    params = [t for t in [*example_inputs, *gm.parameters()] if isinstance(t, nn.Parameter)]
    return not params or any(getattr(t, MARK, False) for t in params)


@dataclass
class PlannedSite:
    name: str  # the add node's name in the captured graph (what the report calls the site)
    index: int
    entries: list
    owner: str
    extra: int = 0  # further branches summed after the first add (parallel blocks (x + a) + b)
    last: bool = False
    after: int = -1  # stream position of the value the site reads (the previous site's index; -1: the start)
    calls: int = 1  # how often its entry module runs per forward (> 1: a looped / shared block)
    functional: list = field(default_factory=list)  # ops of the add's own code that read the stream (see EntryHook)
    params: str = ""  # name of its connection parameters under model.hc ("": its own, s<stream>_<index>)

    def params_name(self, stream_id: int) -> str:
        """The name of its connection parameters under ``model.hc``."""
        return self.params or f"s{stream_id}_{self.index}"


@dataclass
class PlannedStream:
    id: int
    width: int
    feature_dim: int
    sites: list = field(default_factory=list)
    rank: int = 0  # rank of the stream tensor (0: not recorded, plans saved before it was)
    # where the stream value is made: ["output", module path] or ["input", module path, ["arg", i] | ["kw", name] |
    # None]; None: the first entry marks it (see choose_starts)
    start: list | None = None

    @property
    def first(self) -> "PlannedSite | None":
        """The stream's first site (None for a stream without sites)."""
        return min(self.sites, key=lambda s: s.index) if self.sites else None


@dataclass
class Plan:
    """Everything needed to rebuild a rewritten model from its original, without capturing it again."""

    variant: str
    n: int
    dynamic: bool
    sinkhorn_iters: int
    seed: int
    streams: list = field(default_factory=list)
    version: int = PLAN_VERSION
    loop_params: str = "per-call"
    flavour: str = "paper"
    rms_eps: float | None = None
    hc_eps: float = 1e-6

    @property
    def spec(self) -> HCSpec:
        return HCSpec(variant=self.variant, n=self.n, dynamic=self.dynamic,
                      sinkhorn_iters=self.sinkhorn_iters, seed=self.seed, loop_params=self.loop_params,
                      flavour=self.flavour, rms_eps=self.rms_eps, hc_eps=self.hc_eps)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        d = dict(d)
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"hc_rewrite plan version {d.get('version')} is not supported (expected {PLAN_VERSION})")
        streams = []
        for s in d.pop("streams"):
            s = dict(s)
            sites = [PlannedSite(**x) for x in s.pop("sites")]
            streams.append(PlannedStream(sites=sites, **s))
        return cls(streams=streams, **d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def build_plan(spec: HCSpec, streams, placements) -> Plan:
    """The plan of the placed sites of ``streams`` (sites without a placement are left out)."""
    from .passes.place_sites_on_modules import module_stack

    where = {p.site: p for p in placements}
    plan = Plan(spec.variant, spec.n, spec.dynamic, spec.sinkhorn_iters, spec.seed, loop_params=spec.loop_params,
                flavour=spec.flavour, rms_eps=spec.rms_eps, hc_eps=spec.hc_eps)
    for stream in streams:
        ps = PlannedStream(id=stream.id, width=stream.width, feature_dim=stream.feature_dim,
                           rank=len(val(stream.root).shape))
        after = {nxt: site.index for site in stream.sites for _path, nxt in stream.successors.get(site, [])}
        shared: dict = {}  # entry path -> params name of its first site (loop_params="per-module")
        for site in stream.sites:
            p = where[site]
            params = ""
            if p.calls > 1 and spec.loop_params == "per-module" and p.entries:
                params = shared.setdefault(p.entries[0], f"s{stream.id}_{site.index}")
            ps.sites.append(PlannedSite(name=site.name, index=site.index, entries=list(p.entries), owner=p.owner,
                                        extra=len(site.extra_branches), last=not stream.successors.get(site),
                                        after=after.get(site, -1), calls=p.calls, functional=list(p.functional),
                                        params=params))
        first = ps.first
        if first is not None and first.functional:
            # the first site reads the stream in the add's own code: nothing hands its entry hook the stream
            # itself, so the module that returns the stream's first value starts it (if one does)
            add_stack = module_stack(stream.sites[0].add)
            outside = [q for q in module_stack(stream.root) if q not in add_stack]
            if outside:
                ps.start = ["output", outside[0]]
        plan.streams.append(ps)
    return plan


def _dtype_device(model: nn.Module):
    for p in model.parameters():
        return p.dtype, p.device
    return torch.float32, torch.device("cpu")


def attach(model: nn.Module, plan: Plan) -> nn.Module:
    """Apply ``plan`` to ``model`` in place (call it on a copy) and return it (see module docstring)."""
    if isinstance(getattr(model, "hc", None), nn.Module):
        raise ValueError("this model already has an 'hc' submodule: was it rewritten already?")
    spec = plan.spec
    # A compiled graph whose input is a stream value (per-block compile: every block after the first gets one) fails
    # on its first call in AOTAutograd's custom-op aliasing check, whose dispatch mode refuses any tensor subclass it
    # does not know (pytorch issue 193932). The check is a first-call diagnostic of custom-op schemas; it is turned
    # off for the process once a model is rewritten (docs/design.md, "One graph"). Turned back on, such a call fails
    # loudly (TypeError), never silently.
    torch._functorch.config.check_custom_op_aliasing = False
    from .inductor_pass import register

    register()  # plain torch.compile(model) lowers the stream ops as backend="hc_rewrite" does
    dtype, device = _dtype_device(model)
    generator = torch.Generator().manual_seed(plan.seed)
    holder = Connections()
    owner = _Owner()
    variant = variants.get(spec.variant_key)
    at: dict = {}  # entry path -> [(site, stream id, EntryHook)]
    for stream in plan.streams:
        info = StreamInfo(id=stream.id, width=stream.width, feature_dim=stream.feature_dim, rank=stream.rank,
                          variant=variant, n=spec.n, sinkhorn_iters=spec.sinkhorn_iters, owner=owner,
                          indexed=any(s.calls > 1 or s.functional for s in stream.sites))
        if stream.start:
            kind, path, *where = stream.start
            start = model.get_submodule(path)
            if kind == "output":
                start.register_forward_hook(StartHook(info), with_kwargs=True)
            else:
                start.register_forward_pre_hook(StartHook(info, where[0] if where else None), with_kwargs=True)
            pin_forward(start)
        for site in sorted(stream.sites, key=lambda s: s.index):
            name = site.params_name(stream.id)
            if not hasattr(holder, name):
                last = site.last and not site.params  # parameters shared by several calls keep every matrix
                holder.add_module(name, variant.make_params(spec, stream.width, site.index, last, generator,
                                                            dtype=dtype, device=device))
            hook = EntryHook(info, site.index, site.name, holder.get_submodule(name), site.extra, site.functional)
            if site.functional:
                info.functional[site.after] = hook
            for path in site.entries:
                at.setdefault(path, []).append((site, stream.id, hook))
    for path, users in at.items():
        entry = model.get_submodule(path)
        if len(users) == 1:
            entry.register_forward_pre_hook(users[0][2], with_kwargs=True)
        else:  # one module, the entry of several sites: one per call
            after = {(sid, site.after): hook for site, sid, hook in users}
            calls = max(site.calls for site, _sid, _hook in users)
            entry.register_forward_pre_hook(LoopEntryHook(path, after, passes=calls > len(users)), with_kwargs=True)
        pin_forward(entry)
    model.add_module("hc", holder)
    model.hc_plan = plan
    model.register_forward_pre_hook(RootPreHook(), with_kwargs=True)
    model.register_load_state_dict_post_hook(UpcycleHook())
    pin_forward(model, root=True)
    mark_parameters(model)
    config = hf_config(model)
    if config is not None:
        config.hc_rewrite = plan.to_dict()  # saved by save_pretrained: from_pretrained rebuilds from it
    return model


def init_connections(model: nn.Module) -> nn.Module:
    """Put every connection parameter of the rewritten ``model`` back to its function-preserving init, in place, the
    same values ``rewrite`` gave (the plan's seed): after ``to_empty`` of a model built on the meta device (the
    connections are not reached by the model's own ``init_weights``), or to start the connections afresh."""
    holder = getattr(model, "hc", None)
    plan = getattr(model, "hc_plan", None)
    if not isinstance(holder, nn.Module) or plan is None:
        raise ValueError("init_connections: this model was not rewritten by hc_rewrite (no 'hc' connections)")
    generator = torch.Generator().manual_seed(plan.seed)
    for params in holder.children():  # the order attach made them in: the same draws
        params.reset_parameters(generator)
    return model


class UpcycleHook:
    """``load_state_dict`` post-hook of a rewritten model: a plain checkpoint (every key of the original model, none
    of the connections) loads, strict or not, and the connections go back to their function-preserving init, so the
    result computes what the original computes with those weights. Anything else is left as torch reports it: a
    checkpoint with some connection keys but not all, or a partial one (a PEFT adapter: the base weights missing too,
    the trained connections kept)."""

    def __call__(self, module, incompatible_keys) -> None:
        ours = connection_keys(module)
        missing = [k for k in incompatible_keys.missing_keys if any(k == o or k.endswith("." + o) for o in ours)]
        if ours and len(missing) == len(ours) == len(incompatible_keys.missing_keys):
            for k in missing:
                incompatible_keys.missing_keys.remove(k)
            init_connections(module)


def connection_keys(model: nn.Module) -> list:
    """The state-dict keys of the connection parameters of a rewritten ``model`` (``hc.*``): leave them out of the
    state dict given to a loader that insists on every key (``torch.distributed.checkpoint.load`` of a plain
    checkpoint), then call :func:`init_connections`."""
    return [f"hc.{k}" for k in model.hc.state_dict()]


def hf_config(model: nn.Module):
    """``model.config`` if it is a ``transformers.PretrainedConfig`` (the one config the plan is written into, for
    ``save_pretrained``), else ``None``: any other config object (torchtitan's slotted dataclasses, a user's own) is
    never written to; the plan lives on the model (``model.hc_plan``)."""
    import sys

    config = getattr(model, "config", None)
    transformers = sys.modules.get("transformers")
    if config is None or transformers is None:
        return None
    return config if isinstance(config, transformers.PretrainedConfig) else None


def from_pretrained(path, model_class=None, **kwargs) -> nn.Module:
    """Load a rewritten ``transformers`` model saved with ``save_pretrained``: the original class is built
    from the checkpoint, the saved plan is attached again and the connection weights are loaded.

    ``model_class``: the class to load (default: ``config.architectures[0]`` from ``transformers``).
    """
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    plan_dict = getattr(config, "hc_rewrite", None)
    if not plan_dict:
        raise ValueError(f"{path} holds no hc_rewrite plan (config.hc_rewrite): was it saved from a rewritten model?")
    if model_class is None:
        arch = (getattr(config, "architectures", None) or [None])[0]
        model_class = getattr(transformers, arch, None) if arch else None
        if model_class is None:
            raise ValueError(f"cannot tell the model class of {path} (config.architectures={arch!r}); pass model_class")
    del config.hc_rewrite
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the hc.* weights are "unexpected" to the plain class
    try:
        model = model_class.from_pretrained(path, config=config, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    attach(model, Plan.from_dict(plan_dict))
    load_hc_weights(model, path)
    return model


def load_hc_weights(model: nn.Module, path) -> None:
    """Load the ``hc.*`` tensors of a saved checkpoint folder into ``model``."""
    import os

    from safetensors import safe_open

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    state = {}
    for f in files:
        with safe_open(os.path.join(path, f), framework="pt") as fh:
            for k in fh.keys():
                if k.startswith("hc."):
                    state[k] = fh.get_tensor(k)
    own = {k for k in model.state_dict() if k.startswith("hc.")}
    missing = own - set(state)
    if missing:
        raise ValueError(f"checkpoint {path} lacks connection weights {sorted(missing)[:4]}...")
    model.load_state_dict(state, strict=False)


def rebuild(model: nn.Module, plan, state_dict=None) -> nn.Module:
    """The plain ``nn.Module`` path: a copy of the original ``model`` with ``plan`` (a :class:`Plan`, its dict or
    JSON, e.g. ``new.hc_plan.to_json()``) attached and, if given, ``state_dict`` (``new.state_dict()``) loaded."""
    import copy

    if isinstance(plan, str):
        plan = json.loads(plan)
    if isinstance(plan, dict):
        plan = Plan.from_dict(plan)
    new = attach(copy.deepcopy(model), plan)
    if state_dict is not None:
        new.load_state_dict(state_dict)
    return new


def strip(model: nn.Module) -> nn.Module:
    """A copy of a rewritten model without its connections: the original model (weights as they are now)."""
    import copy

    new = copy.deepcopy(model)
    for m in new.modules():
        for hooks, kw in ((m._forward_pre_hooks, m._forward_pre_hooks_with_kwargs),
                          (m._forward_hooks, m._forward_hooks_with_kwargs)):
            for k in [k for k, h in hooks.items()
                      if isinstance(h, (EntryHook, LoopEntryHook, StartHook, RootPreHook))]:
                del hooks[k]
                kw.pop(k, None)
        for k in [k for k, h in m._load_state_dict_post_hooks.items() if isinstance(h, UpcycleHook)]:
            del m._load_state_dict_post_hooks[k]
        unpin_forward(m)
    for attr in ("hc_plan", "hc_report"):
        new.__dict__.pop(attr, None)
    if isinstance(getattr(new, "hc", None), nn.Module):
        del new.hc
    config = hf_config(new)
    if config is not None and hasattr(config, "hc_rewrite"):
        del config.hc_rewrite
    return new


def to_graph(model: nn.Module, example_inputs, example_kwargs=None):
    """The flat graph form (``rewrite(form="graph")``) of a structure-preserving ``model``, with its current
    connection weights: what the ONNX export and the graph passes work on. Same function at any weights."""
    from .api import rewrite

    plan = model.hc_plan
    if plan.loop_params != "per-call":
        raise ValueError(f"this model shares connection parameters between the calls of a block (loop_params="
                         f"{plan.loop_params!r}); the graph form has one set per call and cannot carry them")
    gm = rewrite(strip(model), example_inputs, example_kwargs, variant=plan.variant, n=plan.n, dynamic=plan.dynamic,
                 form="graph", sinkhorn_iters=plan.sinkhorn_iters, seed=plan.seed)
    where = {s.name: (s.stream, s.index) for s in gm.hc_report.sites if s.rewritten}
    ours = {site.name: (site.params_name(stream.id), site.index)
            for stream in plan.streams for site in stream.sites}
    if set(where) != set(ours) or any(where[k][1] != v[1] for k, v in ours.items()):
        raise ValueError("the graph form of this model places its sites differently from the structure-preserving "
                         f"form (graph: {sorted(where)}, module: {sorted(ours)}); it cannot carry its weights")
    for name, (params, _idx) in ours.items():
        gsid, gidx = where[name]
        gm.hc.get_submodule(f"s{gsid}_{gidx}").load_state_dict(model.hc.get_submodule(params).state_dict())
    gm.train(model.training)
    return gm


def entry_hooks(model: nn.Module) -> list:
    """The entry hooks of a structure-preserving model, one per site (a site with two entries counts once)."""
    seen, out = set(), []
    for m in model.modules():
        for h in m._forward_pre_hooks.values():
            for hook in h.hooks if isinstance(h, LoopEntryHook) else [h]:
                if isinstance(hook, EntryHook) and id(hook) not in seen:
                    seen.add(id(hook))
                    out.append(hook)
    return out


def compile_stream_ops(model: nn.Module, backend="hc_rewrite", options=None) -> nn.Module:
    """Run the stream math of a structure-preserving ``model`` (each site's coefficients + pre, and its post)
    through ``torch.compile(..., backend=backend, dynamic=True)`` when the model itself runs eagerly: with the
    ``hc_rewrite`` backend that is the lowering to the fused kernels on CUDA. (``torch.compile(model)`` traces the
    stream ops into the model's own graph: ``torch.compile(model, backend="hc_rewrite")`` lowers them there.)
    Returns ``model`` (changed in place); compiled once per kind of site math."""
    from .stream_value import site_post, site_pre

    pre = torch.compile(site_pre, backend=backend, options=options, dynamic=True)
    post = torch.compile(site_post, backend=backend, options=options, dynamic=True)
    hooks = entry_hooks(model)
    if not hooks:
        raise ValueError("compile_stream_ops: this model has no hc_rewrite entry hooks (rewrite it first, form='module')")
    for hook in hooks:
        hook.compiled = (pre, post)
    return model
