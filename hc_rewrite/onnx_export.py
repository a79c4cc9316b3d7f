"""ONNX export of a rewritten model, and a small onnxruntime runner.

    model = hc_rewrite.rewrite(model, (), {"input_ids": ids}, variant="mhc")
    path = export_onnx(model, (), "model.onnx", example_kwargs={"input_ids": ids})
    logits, = run_onnx(path, {"input_ids": other_ids})

The stream ops are registered ``CompositeImplicitAutograd``, so the dynamo exporter
(``torch.onnx.export(..., dynamo=True)``) decomposes them into standard ATen ops and translates those to
standard ONNX ops: the file needs no custom operator domain and runs on any ONNX runtime.

The exported module is a thin wrapper around the rewritten one that takes only the tensor inputs (as
flat ONNX inputs named after the model's arguments) and returns the tensor leaves of the output (named
after their place in it: ``logits``, ``last_hidden_state``, ``pooler_output`` ...). Non-tensor inputs
(``use_cache=False`` ...) are constants of the export; the rewritten module's input binder fills the
ones the capture fixed.

Dynamic axes: dim 0 of every tensor input is ``batch``; dim 1 of 2-D inputs (token ids, masks,
position ids) and of 3-D ``*embeds`` inputs is ``seq``. Images keep their size. Pass
``dynamic_shapes=`` to choose otherwise.
"""
from __future__ import annotations

import inspect
import os
import warnings

import torch
import torch.utils._pytree as pytree

__all__ = ["export_onnx", "run_onnx", "onnx_input_layout"]


# ----------------------------------------------------------------------------- inputs and outputs
def _binder(model):
    for hook in getattr(model, "_forward_pre_hooks", {}).values():
        if hasattr(hook, "signature") and hasattr(hook, "positional"):
            return hook
    return None


def _positional_names(model, count: int) -> list[str]:
    binder = _binder(model)
    params = None
    if binder is not None:
        params = [p for p in binder.signature.parameters.values()]
    else:
        try:
            params = list(inspect.signature(model.forward).parameters.values())
        except (TypeError, ValueError):
            params = None
    names = []
    for i in range(count):
        if params is not None and i < len(params) and params[i].kind in (
            inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD
        ):
            names.append(params[i].name)
        else:
            names.append(f"input_{i}")
    return names


def onnx_input_layout(model, example_inputs, example_kwargs=None):
    """``(names, tensors, slots)``: the tensor inputs of the call, as the exported file takes them.

    ``slots`` says where each tensor goes in the call: ``("arg", i)`` or ``("kw", name)``.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    args = tuple(example_inputs or ())
    kwargs = dict(example_kwargs or {})
    arg_names = _positional_names(model, len(args))
    names, tensors, slots = [], [], []
    for i, (name, value) in enumerate(zip(arg_names, args)):
        if isinstance(value, torch.Tensor):
            names.append(name), tensors.append(value), slots.append(("arg", i))
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            names.append(key), tensors.append(value), slots.append(("kw", key))
    return names, tensors, slots


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _output_names(out) -> list[str]:
    leaves = pytree.tree_flatten_with_path(out)[0]
    names = []
    for path, leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            continue
        name = ".".join(_key_name(p) for p in path) or "output"
        names.append(name)
    if len(names) == 1 and names[0] == "0":
        names = ["output"]
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name] - 1}")
    return unique


class _TensorIO(torch.nn.Module):
    """Calls ``model`` with the example call's structure, taking only its tensors; returns tensor leaves."""

    def __init__(self, model, args, kwargs, slots):
        super().__init__()
        self.model = model
        self._args, self._kwargs, self._slots = tuple(args), dict(kwargs), list(slots)
        self.train(model.training)

    def forward(self, *tensors):
        args, kwargs = list(self._args), dict(self._kwargs)
        for (kind, where), t in zip(self._slots, tensors):
            if kind == "arg":
                args[where] = t
            else:
                kwargs[where] = t
        out = self.model(*args, **kwargs)
        return tuple(x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor))


def _default_dynamic_shapes(names, tensors, dynamic_batch: bool, dynamic_seq: bool):
    specs = []
    for name, t in zip(names, tensors):
        axes = {}
        if dynamic_batch and t.dim() >= 1:
            axes[0] = "batch"
        if dynamic_seq and (t.dim() == 2 or (t.dim() == 3 and name.endswith("embeds"))):
            axes[1] = "seq"
        specs.append(axes or None)
    return specs


# ----------------------------------------------------------------------------- export
def export_onnx(model, example_inputs, path, example_kwargs=None, dynamic_batch=True, dynamic_seq=True, *,
                dynamic_shapes=None, opset_version=None, optimize=True, verify=False, rtol=1e-4):
    """Export ``model`` (a module returned by :func:`hc_rewrite.rewrite`) to ONNX at ``path``; returns ``path``.

    A model of the structure-preserving form (the default) is exported through its graph form
    (:func:`hc_rewrite.structured.to_graph`, same weights, same function).

    ``model(*example_inputs, **example_kwargs)`` is the call exported (see module docstring for the
    input / output naming and the dynamic axes). ``dynamic_shapes``: one entry per tensor input, in
    the order of :func:`onnx_input_layout` (``{axis: "name"}`` or ``None``), replacing the defaults.
    ``verify``: run the file with onnxruntime on the example inputs and raise ``AssertionError``
    if an output's max relative error (max abs difference / max abs value) exceeds ``rtol``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if getattr(model, "hc_plan", None) is not None:  # the structure-preserving form: export its graph form
        from .structured import to_graph

        model = to_graph(model, example_inputs, example_kwargs)
    example_inputs = tuple(example_inputs or ())
    example_kwargs = dict(example_kwargs or {})
    names, tensors, slots = onnx_input_layout(model, example_inputs, example_kwargs)
    if not tensors:
        raise ValueError("export_onnx: the example call has no tensor input")
    wrapper = _TensorIO(model, example_inputs, example_kwargs, slots)
    with torch.no_grad():
        full_out = model(*example_inputs, **example_kwargs)
    reference = [x for x in pytree.tree_leaves(full_out) if isinstance(x, torch.Tensor)]
    output_names = _output_names(full_out)
    if len(output_names) != len(reference):
        output_names = [f"output_{i}" for i in range(len(reference))]
    if dynamic_shapes is None:
        dynamic_shapes = _default_dynamic_shapes(names, tensors, dynamic_batch, dynamic_seq)
    if len(dynamic_shapes) != len(tensors):
        raise ValueError(f"dynamic_shapes has {len(dynamic_shapes)} entries for {len(tensors)} tensor inputs {names}")
    has_dynamic = any(d for d in dynamic_shapes)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*training mode.*")
        warnings.filterwarnings("ignore", message=".*shares the same shape constraints.*")
        program = torch.onnx.export(
            wrapper, tuple(tensors), dynamo=True, input_names=names, output_names=output_names,
            dynamic_shapes=(tuple(dynamic_shapes),) if has_dynamic else None,
            opset_version=opset_version, optimize=optimize, verbose=False,
        )
    program.save(path)
    if verify:
        got = run_onnx(path, dict(zip(names, tensors)))
        for name, ref, out in zip(output_names, reference, got):
            err = max_relative_error(out, ref)
            if not err <= rtol:
                raise AssertionError(f"ONNX output {name!r}: max relative error {err:.3g} > {rtol}")
    return path


# ----------------------------------------------------------------------------- run
def _to_numpy(value):
    import numpy as np

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def run_onnx(path, inputs, *, providers=None, session_options=None) -> list:
    """Run the ONNX file at ``path`` with onnxruntime; returns its outputs as a list of numpy arrays.

    ``inputs``: a dict ``{input name: tensor or array}`` (entries the file does not take, like
    ``use_cache=False``, are ignored), a sequence in the file's input order, a single tensor, or a
    zoo-style ``(args, kwargs)`` pair.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(
        os.fspath(path), sess_options=session_options, providers=providers or ["CPUExecutionProvider"]
    )
    wanted = [i.name for i in session.get_inputs()]
    if (isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[1], dict)
            and isinstance(inputs[0], (tuple, list))):
        args, kwargs = inputs
        feed = dict(zip(wanted, [a for a in args if isinstance(a, torch.Tensor)]))
        feed.update({k: v for k, v in kwargs.items() if k in wanted})
    elif isinstance(inputs, dict):
        feed = {k: v for k, v in inputs.items() if k in wanted}
    elif isinstance(inputs, (torch.Tensor,)) or not isinstance(inputs, (list, tuple)):
        feed = {wanted[0]: inputs}
    else:
        feed = dict(zip(wanted, inputs))
    missing = [n for n in wanted if n not in feed]
    if missing:
        raise ValueError(f"run_onnx: missing input(s) {missing}; the file takes {wanted}")
    return session.run(None, {k: _to_numpy(v) for k, v in feed.items()})


def max_relative_error(got, ref) -> float:
    """``max |got - ref| / max |ref|`` (0 for two all-zero arrays)."""
    import numpy as np

    got, ref = _to_numpy(got).astype(np.float64), _to_numpy(ref).astype(np.float64)
    if got.shape != ref.shape:
        raise ValueError(f"shape mismatch: {got.shape} vs {ref.shape}")
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    diff = float(np.abs(got - ref).max()) if ref.size else 0.0
    return diff / scale if scale > 0 else diff
