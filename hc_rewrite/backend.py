"""The ``hc_rewrite`` torch.compile backend.

    model = hc_rewrite.rewrite(model, example_inputs, variant="mhc")
    compiled = torch.compile(model, backend="hc_rewrite")                   # options={"fuse": False}

The backend compiles models returned by :func:`hc_rewrite.rewrite`: it finds the
``torch.ops.hc_rewrite`` stream ops in the graph Dynamo captured, lowers them to fused kernels where
:mod:`hc_rewrite.kernels` has one and the tensors are on CUDA (the lowering stage of the pipeline,
:func:`hc_rewrite.passes.pipeline.lower`), and hands the graph to Inductor. The stream ops no kernel covers
(on the CPU: all of them) go to Inductor in their fusible form (:mod:`hc_rewrite.ops.fusible`: the reference
math with its small products unrolled, so Inductor fuses them into its own loops; docs/kernels.md).

It never creates connection parameters: a parameter created inside a backend is invisible to
optimizers and to ``state_dict``. A graph without any stream op (a model that was not rewritten) is an
error (:class:`~hc_rewrite.errors.BackendError`) that names the one-line fix.

The name ``"hc_rewrite"`` resolves through the ``torch_dynamo_backends`` entry point of the installed
package, and is also registered when this module is imported.

``options`` (``torch.compile(..., options={...})``):

* ``fuse`` (default True): lower stream ops whose tensors are on a CUDA device to the fused kernels
  of :mod:`hc_rewrite.kernels` (first the per-site combinations of
  :mod:`hc_rewrite.passes.fuse_stream_ops`, then single-op swaps); False keeps the reference ops;
  ``"all"`` lowers on every device (the fused ops fall back to the reference math, or run under the
  Triton interpreter, off CUDA: for testing).
* ``combos`` (bool, default True): apply the fused combinations (``fuse_stream_ops``) too.
* ``decompose`` (bool, default True): hand Inductor the stream ops no kernel covers (all of them on the CPU)
  in their fusible form (:mod:`hc_rewrite.ops.fusible`: the products over the stream's ``n`` unrolled, no
  normalised copies; :mod:`hc_rewrite.passes.decompose_stream_ops`); False leaves them to AOTAutograd's
  decomposition of the reference (for comparison).
* ``recompute`` (bool, default True): tag the stream ops for recomputation in backward (the widened stream is kept
  once per block, :mod:`hc_rewrite.passes.tag_stream_recompute`); False: AOTAutograd's partitioner picks alone.
* ``compiler`` (default ``"inductor"``): what compiles the (lowered) graph. ``"aot_eager"`` runs
  AOTAutograd (decompositions, fake-tensor tracing of the fused ops, the joint graph) without code
  generation; ``"eager"`` runs the graph as captured. Both are for debugging, or for machines where no
  C++ / Triton compiler is usable.
* ``require_hc_ops`` (bool, default True): False also compiles graphs without stream ops (fragments of
  a rewritten model split by a graph break) instead of raising. Graphs of a model of the
  structure-preserving form without stream ops (pieces between graph breaks, blocks without a site; recognised by
  its parameters) are compiled without raising.
* any other key is an Inductor config patch, as in ``torch.compile(backend="inductor", options=...)``
  (e.g. ``"max_autotune": True``); ``mode=`` is honoured the same way.
"""
from __future__ import annotations

from . import structured

import logging

import torch
import torch.fx as fx

from .errors import BackendError
from .passes.lower_stream_ops import stream_op_nodes
from .passes.pipeline import lower

log = logging.getLogger(__name__)

BACKEND_NAME = "hc_rewrite"

#: Options the backend itself reads; anything else goes to Inductor as a config patch.
BACKEND_OPTIONS = {"fuse": True, "combos": True, "decompose": True, "recompute": True, "compiler": "inductor",
                   "require_hc_ops": True}
COMPILERS = ("inductor", "aot_eager", "eager")

FIX = (
    'model = hc_rewrite.rewrite(model, example_inputs, variant="mhc")   # or "frac", "hc"\n'
    'compiled = torch.compile(model, backend="hc_rewrite")'
)


_NOTED: list = []


def _no_stream_ops_error(gm: fx.GraphModule) -> BackendError:
    ops = sum(1 for n in gm.graph.nodes if n.op == "call_function")
    return BackendError(
        f"the hc_rewrite backend compiles models returned by hc_rewrite.rewrite, but this graph "
        f"({ops} ops) contains no torch.ops.hc_rewrite op: the model was not rewritten. The backend does "
        f"not add connection parameters itself (parameters created inside a torch.compile backend are "
        f"invisible to optimizers and state_dict). Fix: rewrite first, then compile:\n    "
        + FIX.replace("\n", "\n    ")
        + "\n(If this graph is a piece of a rewritten model cut off by a graph break, pass "
        'options={"require_hc_ops": False}.)'
    )


def _split_options(options) -> tuple[dict, dict]:
    """``(backend options, Inductor config patches)``; bad values of the backend's own are an error."""
    options = dict(options or {})
    ours = {k: options.pop(k, v) for k, v in BACKEND_OPTIONS.items()}
    if ours["fuse"] not in (True, False, "all"):
        raise BackendError(f'option fuse={ours["fuse"]!r}: expected True, False or "all"')
    if ours["compiler"] not in COMPILERS:
        raise BackendError(f'option compiler={ours["compiler"]!r}: expected one of {COMPILERS}')
    if ours["compiler"] != "inductor" and options:
        raise BackendError(
            f'option(s) {sorted(options)} are not hc_rewrite backend options {sorted(BACKEND_OPTIONS)}; '
            f'Inductor config keys need compiler="inductor", not {ours["compiler"]!r}'
        )
    return ours, options


def _inductor_patches(mode, extra: dict) -> dict:
    patches = {}
    if mode and mode != "default":
        from torch._inductor import list_mode_options

        patches.update(list_mode_options(mode))
    if extra:
        from torch._inductor import config as inductor_config

        known = inductor_config.get_config_copy()
        unknown = sorted(k for k in extra if k not in known)
        if unknown:
            raise BackendError(
                f"unknown option(s) {unknown} for the hc_rewrite backend: its own options are "
                f"{sorted(BACKEND_OPTIONS)}, anything else must be an Inductor config key"
            )
        patches.update(extra)
    return patches


def hc_rewrite_backend(gm: fx.GraphModule, example_inputs, *, options: dict | None = None,
                       mode: str | None = None, **kwargs):
    """torch.compile backend (see module docstring). ``options`` and ``mode`` come from torch.compile."""
    if kwargs:
        raise BackendError(f"unexpected argument(s) {sorted(kwargs)} for the hc_rewrite backend")
    ours, extra = _split_options(options)
    patches = _inductor_patches(mode, extra) if ours["compiler"] == "inductor" else {}
    nodes = stream_op_nodes(gm)
    piece = not nodes and structured.is_structured_graph(gm, example_inputs)
    if not nodes and ours["require_hc_ops"] and not piece:
        raise _no_stream_ops_error(gm)
    if piece and not _NOTED:
        _NOTED.append(True)
        log.warning("hc_rewrite backend: a graph without stream ops, from a model of the structure-preserving form "
                    "(a block without a site, or a piece between graph breaks: a checkpointed region nested in "
                    "another inside the compiled region runs eagerly). Compiled whole, or block by block, such a "
                    "model is one graph with its stream ops in it")
    lowered = lower(gm, everywhere=ours["fuse"] == "all", combos=ours["combos"], kernels=bool(ours["fuse"]),
                    decompose=bool(ours["decompose"]), recompute=bool(ours["recompute"])) if nodes else 0
    log.info("hc_rewrite backend: %d stream ops, %d fused, swapped or decomposed", len(nodes), lowered)
    compiler = ours["compiler"]
    if compiler != "inductor":
        if compiler == "eager":
            return gm.forward
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    from .inductor_pass import others

    # this backend lowered the graph already, with its own options: Inductor's pre-grad pass of ours stays out
    return compile_fx(gm, example_inputs, config_patches={**patches, "pre_grad_custom_pass": others()})


def compile(model, *, options: dict | None = None, **compile_kwargs):  # noqa: A001 - mirrors torch.compile
    """``torch.compile(model, backend="hc_rewrite", options=options, **compile_kwargs)``, with the check
    that ``model`` was rewritten done up front (an error here rather than at the first call)."""
    if not isinstance(model, torch.nn.Module) or not isinstance(getattr(model, "hc", None), torch.nn.Module):
        raise BackendError(
            f"{type(model).__name__} was not rewritten by hc_rewrite (it has no 'hc' connection "
            f"parameters). Fix: rewrite first, then compile:\n    " + FIX.replace("\n", "\n    ")
        )
    return torch.compile(model, backend=BACKEND_NAME, options=options, **compile_kwargs)


def register() -> bool:
    """Register ``"hc_rewrite"`` with Dynamo unless it is already known; returns whether it registered.

    Safe to call any number of times. When the name is already discovered through the entry point
    (and not loaded yet), nothing is registered here: Dynamo loads the entry point, which is
    :func:`hc_rewrite_backend`, and registering now would make that load fail as a duplicate.
    """
    from torch._dynamo.backends import registry

    compiler_fns = getattr(registry, "_COMPILER_FNS", None)
    backends = getattr(registry, "_BACKENDS", None)
    if compiler_fns is not None and BACKEND_NAME in compiler_fns:
        return False
    if backends is not None and backends.get(BACKEND_NAME) is not None:
        return False  # an entry point: lookup_backend loads and registers it
    try:
        registry.register_backend(compiler_fn=hc_rewrite_backend, name=BACKEND_NAME)
    except AssertionError:  # "duplicate name": registered meanwhile
        return False
    return True


register()

__all__ = ["hc_rewrite_backend", "compile", "register", "BACKEND_NAME", "BACKEND_OPTIONS", "COMPILERS"]
