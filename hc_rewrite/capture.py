"""Capture an arbitrary ``nn.Module`` as an FX graph.

``torch.export`` (non-strict, every tensor dim ``Dim.AUTO``) first, so the graph is ATen-level, keeps
the original parameter names and the original output structure (HF ``ModelOutput`` included), and is
not specialised to the example's batch or sequence size where the model allows it.
``torch.fx.symbolic_trace`` is the fallback. The caller's model is never touched: capture works on a
deep copy, so the rewritten module owns its own parameters.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import tempfile
import os
import sys
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.passes.shape_prop import ShapeProp

from .errors import CaptureError, NotAModuleError


class StaticShapesWarning(UserWarning):
    """The capture is specialised to the example's shapes (see ``Captured.shapes``)."""


@dataclass
class Captured:
    gm: fx.GraphModule
    method: str
    binder: "InputBinder | None" = None
    shapes: str = "dynamic"  # or "static shapes: <why>" when the graph is specialised to the example's shapes
    baked: dict = field(default_factory=dict)  # keyword constants bound into the graph (not among its inputs)
    # False: a graph that only says where the sites are (a trace of one eager call, data-dependent values of the
    # example burnt in): the structure-preserving form can use it, the graph form cannot replay it
    replayable: bool = True
    hyper: list = field(default_factory=list)  # set by the analysis: streams that already are hyper-connections


class InputBinder:
    """Forward pre-hook that maps a user's call onto the captured call's structure.

    The exported graph expects exactly the arguments it was captured with. Non-tensor constants that the
    capture supplied (``use_cache=False``) are filled in when the caller omits them; a different value, or
    an input the capture never saw, is a clear error instead of a wrong result.
    """

    def __init__(self, signature: inspect.Signature, args, kwargs, baked=()):
        self.signature = signature
        bound = signature.bind(*args, **kwargs)
        self.positional = [name for name, _ in zip(signature.parameters, args)]
        self.baked = set(baked)  # constants baked into the graph: checked, not passed on
        self.keywords = [k for k in kwargs if k not in self.baked]
        self.constants = {
            k: v for k, v in self._flat(bound).items()
            if not isinstance(v, torch.Tensor) and _is_leafy_constant(v)
        }

    def _flat(self, bound) -> dict:
        """Bound arguments with a ``**kwargs`` catch-all merged in (HF forwards take many that way)."""
        out = {}
        for name, value in bound.arguments.items():
            if self.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                out.update(value)
            else:
                out[name] = value
        return out

    def _default(self, name):
        p = self.signature.parameters.get(name)
        return None if p is None else p.default

    def __call__(self, module, args, kwargs):
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"rewritten module called with arguments that do not fit the original forward: {e}")
        given = self._flat(bound)
        expected = set(self.positional) | set(self.keywords) | self.baked
        for name, value in given.items():
            if name not in expected and value is not None and value is not self._default(name):
                raise TypeError(
                    f"input {name!r} was not part of the call the model was captured with "
                    f"(captured inputs: {sorted(expected)}); rewrite again with it in example inputs"
                )
        for name, value in self.constants.items():
            if name in given and given[name] != value:
                raise TypeError(
                    f"{name}={given[name]!r} differs from the captured constant {name}={value!r}; "
                    "the graph was specialised to it"
                )
        missing = [n for n in expected - self.baked if n not in given and n not in self.constants]
        if missing:
            raise TypeError(f"missing input(s) {missing} that the captured graph reads")
        new_args = tuple(given.get(n, self.constants.get(n)) for n in self.positional)
        new_kwargs = {n: given.get(n, self.constants.get(n)) for n in self.keywords}
        return new_args, new_kwargs


def _is_leafy_constant(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _forward_signature(model) -> inspect.Signature:
    return inspect.signature(model.forward)


def _auto_dynamic_shapes(args, kwargs):
    """``dynamic_shapes`` for ``torch.export``: every dim of every tensor input ``Dim.AUTO`` (export keeps what
    the model allows dynamic). Keyed by tensor (a ``ShapesCollection``), so export lays it out along the
    forward's own signature, ``**kwargs`` catch-alls and decorated HF forwards included."""
    from torch.export import Dim, ShapesCollection

    shapes = ShapesCollection()
    for x in pytree.tree_leaves((tuple(args), dict(kwargs))):
        if isinstance(x, torch.Tensor):
            shapes[x] = {i: Dim.AUTO for i in range(x.dim())}
    return shapes


def prepare_kwargs(model, kwargs) -> dict:
    """Add ``use_cache=False`` for models whose forward takes it, so no KV cache object is returned."""
    kwargs = dict(kwargs or {})
    try:
        params = _forward_signature(model).parameters
    except (TypeError, ValueError):
        return kwargs
    if "use_cache" in params and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    return kwargs


def _bake_catch_all_constants(model, kwargs: dict) -> tuple[dict, dict]:
    """``(kwargs, baked)``: non-tensor constants that the forward collects through ``**kwargs``
    (``output_hidden_states=True`` in HF 5.x) are bound into ``model.forward`` (a ``functools.partial`` on the
    capture's own copy) instead of passed to export, whose dynamic-shape constraints mishandle variadic keywords
    in torch 2.13. The graph is specialised to them, as to any non-tensor constant."""
    params = _forward_signature(model).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return kwargs, {}
    baked = {k: v for k, v in kwargs.items()
             if k not in params and not isinstance(v, torch.Tensor) and _is_leafy_constant(v)}
    if baked:
        model.forward = functools.partial(model.forward, **baked)
    return {k: v for k, v in kwargs.items() if k not in baked}, baked


def _export(model, args, kwargs, notes: list, sink) -> fx.GraphModule:
    try:
        with _quiet(sink):
            ep = torch.export.export(model, tuple(args), kwargs,
                                     dynamic_shapes=_auto_dynamic_shapes(args, kwargs), strict=False)
    except Exception as e:  # noqa: BLE001 - dynamic shapes can fail where static ones work: say so, then retry
        why = _first_line(e)
        with _quiet(sink):
            ep = torch.export.export(model, tuple(args), kwargs, strict=False)
        notes.append(f"static shapes: the dynamic-shape capture failed ({type(e).__name__}: {why}); the graph is "
                     "specialised to the example's shapes")
    unlifted = ep.module()
    gm = fx.GraphModule(unlifted, copy.deepcopy(unlifted.graph), class_name=type(model).__name__ + "HC")
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(unlifted, attr):
            setattr(gm, attr, getattr(unlifted, attr))
    gm.meta = dict(getattr(unlifted, "meta", {}))
    _keep_non_persistent_buffers(model, gm)
    return gm


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


class _Unclosable:
    """``sys.stderr`` stand-in writing to the sink; code under capture that closes stderr does not close it."""

    def __init__(self, sink):
        self._sink = sink

    def write(self, text):
        return self._sink.write(text)

    def flush(self):
        self._sink.flush()

    def fileno(self):
        return self._sink.fileno()

    def isatty(self):
        return False

    def close(self):
        pass


@contextlib.contextmanager
def _quiet(sink):
    """Keep what torch prints and logs while capturing (a failed export dumps whole graphs to stderr) in the
    file ``sink``, for a short excerpt in the error instead of thousands of lines on the user's terminal. Both
    ``sys.stderr`` and file descriptor 2 are redirected: torch's log handlers hold their own stderr reference."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(sink.fileno(), 2)
    try:
        with contextlib.redirect_stderr(_Unclosable(sink)):
            yield
    finally:
        sys.stderr.flush()
        sink.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _keep_non_persistent_buffers(model: torch.nn.Module, gm: fx.GraphModule) -> None:
    """Buffers the original keeps out of its state_dict (``persistent=False``) stay out of it here too."""
    for path, mod in model.named_modules():
        names = getattr(mod, "_non_persistent_buffers_set", ())
        if not names:
            continue
        try:
            target = gm.get_submodule(path)
        except AttributeError:
            continue
        for name in names:
            if name in target._buffers:
                target._non_persistent_buffers_set.add(name)


def _symbolic_trace(model, args, kwargs, notes: list, sink) -> fx.GraphModule:
    concrete = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    with _quiet(sink):
        gm = fx.symbolic_trace(model, concrete_args=concrete or None)
    tensor_kwargs = [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    ShapeProp(gm).propagate(*args, *tensor_kwargs)
    notes.append("static shapes: torch.fx.symbolic_trace records the example's shapes")
    return gm


TRACE_CALL = "a trace of one eager call (make_fx, real tensors)"


class _Scope(torch.nn.Module):
    """What ``make_fx`` records module paths under (its module-stack tracer reads ``_orig_mod``)."""

    def __init__(self, model, kwargs):
        super().__init__()
        self._orig_mod, self._kwargs = model, kwargs

    def forward(self, *args):
        return self._orig_mod(*args, **self._kwargs)


def _trace_call(model, args, kwargs, notes: list, sink) -> fx.GraphModule:
    """One eager call of the model recorded op by op (``make_fx`` on real tensors, with module paths): the
    values the model reads in Python (``.item()``, ``nonzero``) are the example's, so the graph is only good for
    finding the residual sites, which is all the structure-preserving form needs from it."""
    from torch.fx.experimental.proxy_tensor import make_fx

    with _quiet(sink):
        gm = make_fx(_Scope(model, kwargs), tracing_mode="real", record_module_stack=True, pre_dispatch=True,
                     _error_on_data_dependent_ops=False)(*args)
    return gm


def capture(model: torch.nn.Module, args, kwargs=None, *, replayable: bool = True) -> Captured:
    """Capture ``model(*args, **kwargs)`` as an FX graph (see module docstring).

    A capture that ends up with static shapes (the dynamic-shape export failed, or only ``symbolic_trace``
    worked) says so in ``Captured.shapes`` and with a :class:`StaticShapesWarning`. Raises :class:`CaptureError`
    naming every capture path tried and why each failed, with an excerpt of what torch printed.
    ``replayable=False``: a graph that only has to show where the sites are will do (the structure-preserving
    form): a trace of one eager call is tried last.
    """
    if not isinstance(model, torch.nn.Module):
        raise NotAModuleError(f"expected an nn.Module, got {type(model).__name__}: nothing was captured")
    if not isinstance(args, (tuple, list)):
        args = (args,)
    kwargs = prepare_kwargs(model, kwargs)
    training = model.training
    model = copy.deepcopy(model).eval()  # capture in eval mode; the passes restore train/eval switches
    signature = _forward_signature(model)
    kwargs, baked = _bake_catch_all_constants(model, kwargs)
    tried, sink = [], tempfile.TemporaryFile("w+")
    paths = [("torch.export (non-strict)", _export), ("torch.fx.symbolic_trace", _symbolic_trace)]
    if not replayable:
        paths.append((TRACE_CALL, _trace_call))
    for name, fn in paths:
        notes: list = []
        try:
            with torch.no_grad():
                gm = fn(model, tuple(args), kwargs, notes, sink)
        except Exception as e:  # noqa: BLE001 - every failure is reported below
            tried.append(f"{name}: {type(e).__name__}: {_first_line(e)}")
            continue
        binder = None
        if name.startswith("torch.export"):
            binder = InputBinder(signature, args, dict(kwargs, **baked), baked=baked)
        gm.train(training)
        if fn is _trace_call:
            return Captured(gm=gm, method=name, shapes=f"example's shapes and values, used only to find the sites "
                            f"({'; '.join(tried)})", baked=baked, replayable=False)
        shapes = notes[0] if notes else "dynamic"
        if tried:
            shapes = f"{shapes} ({'; '.join(tried)})" if notes else shapes
        if notes:
            warnings.warn(f"{type(model).__name__}: {shapes}", StaticShapesWarning, stacklevel=3)
        return Captured(gm=gm, method=name, binder=binder, shapes=shapes, baked=baked)
    sink.seek(0)
    printed = [line for line in sink.read().splitlines() if line.strip()]
    excerpt = ""
    if printed:
        excerpt = (f"\n  torch printed {len(printed)} lines while trying; the last ones:\n    "
                   + "\n    ".join(line[:200] for line in printed[-8:]))
    raise CaptureError(
        f"could not capture {type(model).__name__} as an FX graph; tried:\n  " + "\n  ".join(tried) + excerpt
    )
