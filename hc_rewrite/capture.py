"""Capture an arbitrary ``nn.Module`` as an FX graph.

``torch.export`` (non-strict, every tensor dim ``Dim.AUTO``) first, so the graph is ATen-level, keeps
the original parameter names and the original output structure (HF ``ModelOutput`` included), and is
not specialised to the example's batch or sequence size where the model allows it.
``torch.fx.symbolic_trace`` is the fallback. The caller's model is never touched: capture works on a
deep copy, so the rewritten module owns its own parameters.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.passes.shape_prop import ShapeProp

from .errors import CaptureError, NotAModuleError


@dataclass
class Captured:
    gm: fx.GraphModule
    method: str
    binder: "InputBinder | None" = None


class InputBinder:
    """Forward pre-hook that maps a user's call onto the captured call's structure.

    The exported graph expects exactly the arguments it was captured with. Non-tensor constants that the
    capture supplied (``use_cache=False``) are filled in when the caller omits them; a different value, or
    an input the capture never saw, is a clear error instead of a wrong result.
    """

    def __init__(self, signature: inspect.Signature, args, kwargs):
        self.signature = signature
        bound = signature.bind(*args, **kwargs)
        self.positional = [name for name, _ in zip(signature.parameters, args)]
        self.keywords = list(kwargs)
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
        expected = set(self.positional) | set(self.keywords)
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
        missing = [n for n in expected if n not in given and n not in self.constants]
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
    """Every dim of every tensor input ``Dim.AUTO``: export keeps what the model allows dynamic."""
    from torch.export import Dim

    def spec(x):
        if isinstance(x, torch.Tensor):
            return {i: Dim.AUTO for i in range(x.dim())}
        return None

    return pytree.tree_map(spec, tuple(args)), pytree.tree_map(spec, dict(kwargs))


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


def _export(model, args, kwargs) -> fx.GraphModule:
    dyn_args, dyn_kwargs = _auto_dynamic_shapes(args, kwargs)
    sig = _forward_signature(model)
    names = list(sig.parameters)
    dynamic_shapes = {names[i]: d for i, d in enumerate(dyn_args)}
    dynamic_shapes.update(dyn_kwargs)
    try:
        ep = torch.export.export(model, tuple(args), kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception:  # dynamic shapes can fail where static ones work: retry specialised
        ep = torch.export.export(model, tuple(args), kwargs, strict=False)
    unlifted = ep.module()
    gm = fx.GraphModule(unlifted, copy.deepcopy(unlifted.graph), class_name=type(model).__name__ + "HC")
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(unlifted, attr):
            setattr(gm, attr, getattr(unlifted, attr))
    gm.meta = dict(getattr(unlifted, "meta", {}))
    _keep_non_persistent_buffers(model, gm)
    return gm


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


def _symbolic_trace(model, args, kwargs) -> fx.GraphModule:
    concrete = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    gm = fx.symbolic_trace(model, concrete_args=concrete or None)
    tensor_kwargs = [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    ShapeProp(gm).propagate(*args, *tensor_kwargs)
    return gm


def capture(model: torch.nn.Module, args, kwargs=None) -> Captured:
    """Capture ``model(*args, **kwargs)`` as an FX graph (see module docstring).

    Raises :class:`CaptureError` naming every capture path tried and why each failed.
    """
    if not isinstance(model, torch.nn.Module):
        raise NotAModuleError(f"expected an nn.Module, got {type(model).__name__}: nothing was captured")
    if not isinstance(args, (tuple, list)):
        args = (args,)
    kwargs = prepare_kwargs(model, kwargs)
    training = model.training
    model = copy.deepcopy(model).eval()  # capture in eval mode; the passes restore train/eval switches
    tried = []
    for name, fn in (("torch.export (non-strict)", _export), ("torch.fx.symbolic_trace", _symbolic_trace)):
        try:
            with torch.no_grad():
                gm = fn(model, tuple(args), kwargs)
        except Exception as e:  # noqa: BLE001 - every failure is reported below
            tried.append(f"{name}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
            continue
        binder = None
        if name.startswith("torch.export"):
            binder = InputBinder(_forward_signature(model), args, kwargs)
        gm.train(training)
        return Captured(gm=gm, method=name, binder=binder)
    raise CaptureError(
        f"could not capture {type(model).__name__} as an FX graph; tried:\n  " + "\n  ".join(tried)
    )
