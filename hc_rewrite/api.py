"""Public entry points: :func:`rewrite` and :func:`report`."""
from __future__ import annotations

import copy
import dataclasses

import torch
import torch.utils._pytree as pytree

from .capture import capture, prepare_kwargs
from .errors import AlreadyHyperConnectedError, NoResidualStreamError, NotAModuleError, SpecError, StructureError
from .passes import group_residual_streams
from .passes.pipeline import GRAPH_FORM, MODULE_FORM, PassContext, analyse
from .report import RewriteReport, SiteReport, StreamReport
from .spec import HCSpec, make_spec
from .stream_value import TRACE, StreamError
from .structured import attach, build_plan, choose_starts, record_calls

_WIDTH_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
FORMS = ("module", "graph")
#: Largest relative error (max |a - b| / max |a| over every floating output) of the structure-preserving form
#: against the original on the example call at init; above it the rewrite refuses to return a model. A misplaced
#: site gives errors of 1e-2 and more; fp32 rounding gives ~1e-7 on main outputs and up to ~1e-5 on padded
#: positions of a 12-site post-norm stack (MiniLM), hence the margin.
CHECK_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def _precheck_width(model, spec: HCSpec) -> None:
    """Frac width check from the model's config, before the (slower) capture, where a config says it."""
    config = getattr(model, "config", None)
    for key in _WIDTH_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int):
            spec.check_width(value, f"{type(model).__name__} ({key}={value})")
            return


def _check_model(model) -> None:
    if not isinstance(model, torch.nn.Module):
        raise NotAModuleError(f"expected an nn.Module, got {type(model).__name__}: nothing was rewritten")
    previous = getattr(model, "hc_report", None)
    if previous is not None or isinstance(getattr(model, "hc", None), torch.nn.Module):
        what = f"into {previous.variant} n={previous.n}" if previous is not None else "(it has hc.* parameters)"
        raise ValueError(f"this model was already rewritten by hc_rewrite {what}; rewrite the original model instead")


def _analyse(model, example_inputs, example_kwargs, spec: HCSpec, replayable: bool = True):
    """Capture and detect (:data:`~hc_rewrite.passes.pipeline.ANALYSIS`): ``(captured, sites, streams)``. The
    caller's model is untouched. ``replayable=False``: a capture that only locates the sites will do."""
    _check_model(model)
    _precheck_width(model, spec)
    captured = capture(model, example_inputs, example_kwargs, replayable=replayable)
    ctx = analyse(captured.gm, spec)
    sites, streams = ctx.sites, ctx.streams
    for stream in streams:
        spec.check_width(stream.width, f"residual stream {stream.id} (expanded at {stream.root.name})")
    captured.hyper = [f"a stream of {h.n} copies of width {h.width} ([..., {h.n}, {h.width}]) widened at {h.start}, "
                      f"collapsed {h.collapses} times (its blocks mix copies, not skip + branch)" for h in ctx.hyper]
    return captured, sites, streams


def _report(model, spec, captured, sites, streams, form, new_parameters, init_rel_err=None) -> RewriteReport:
    return RewriteReport(
        model=type(model).__name__, variant=spec.variant, n=spec.n, dynamic=spec.dynamic,
        capture=captured.method, form=form, init_rel_err=init_rel_err, shapes=captured.shapes,
        streams=[StreamReport.of(s) for s in streams], sites=[SiteReport.of(s) for s in sites],
        new_parameters=new_parameters, existing=list(getattr(captured, "hyper", [])),
        flavour=_describe_flavour(spec),
    )


def _describe_flavour(spec) -> str:
    if spec.flavour == "paper":
        return ""
    from .variants.mhc_production import FLAVOURS

    collapse = "a learned head where each stream ends" if FLAVOURS[spec.flavour] else "the mean"
    return (f"{spec.flavour}: rms_eps {spec.rms_eps:g} ({spec.rms_eps_source or 'given'}), "
            f"hc_eps {spec.hc_eps:g}, collapse by {collapse}")


def model_rms_eps(model) -> tuple:
    """``(eps, where)``: the RMS normalisation eps of ``model`` for production mHC: its HF config's
    ``rms_norm_eps``, else the ``eps`` (``variance_epsilon``) of its first RMSNorm module (``nn.RMSNorm`` or a class
    named so), else DeepSeek-V4's default."""
    from .production import RMS_EPS

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if number(value := getattr(getattr(model, "config", None), "rms_norm_eps", None)):
        return float(value), "config.rms_norm_eps"
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.RMSNorm) or "rmsnorm" in type(m).__name__.lower():
            for attr in ("eps", "variance_epsilon"):
                if number(value := getattr(m, attr, None)):
                    return float(value), f"{name}.{attr}"
    return RMS_EPS, "DeepSeek-V4's default: the model has no RMSNorm"


def _resolve_spec(spec: HCSpec, model) -> HCSpec:
    """The spec with what it takes from the model filled in (production mHC's RMS eps)."""
    if spec.flavour == "paper" or spec.rms_eps is not None:
        return spec
    eps, where = model_rms_eps(model)
    return dataclasses.replace(spec, rms_eps=eps, rms_eps_source=where)


def _no_stream(model, rep):
    if rep.existing:
        return AlreadyHyperConnectedError(
            f"{type(model).__name__} already carries hyper-connections ({'; '.join(rep.existing)}): it has no plain "
            f"residual stream to rewrite\n{rep}", report=rep)
    return NoResidualStreamError(f"no residual stream found in {type(model).__name__}: nothing to rewrite\n{rep}",
                                 report=rep)


# ----------------------------------------------------------------------------- graph form
def _run_graph(model, example_inputs, example_kwargs, spec: HCSpec):
    if spec.loop_params != "per-call":
        raise SpecError(f"loop_params={spec.loop_params!r} is an option of the structure-preserving form; the graph "
                        "form gives every call of a block its own connection parameters")
    captured, sites, streams = _analyse(model, example_inputs, example_kwargs, spec)
    gm = captured.gm
    if streams:
        GRAPH_FORM(PassContext(gm, spec, sites, streams))  # recompiles gm
    rep = _report(model, spec, captured, sites, streams, "graph",
                  sum(p.numel() for p in gm.hc.parameters()) if streams else 0)
    if not streams:
        raise _no_stream(model, rep)
    _Finalize(captured.binder, rep)(gm)
    gm.train(model.training)
    return gm, rep


class _Finalize:
    """Attach what a rewritten module carries besides its graph (the input binder hook, ``.hc_report``),
    and re-attach it to every ``copy.deepcopy`` of it (GraphModule's deepcopy drops forward hooks)."""

    def __init__(self, binder, rep):
        self.binder, self.rep = binder, rep

    def __call__(self, gm):
        if self.binder is not None:
            gm.register_forward_pre_hook(self.binder, with_kwargs=True)
        gm.hc_report = self.rep
        register = getattr(gm, "_register_deepcopy_hook", None)
        if register is not None and not any(isinstance(h, _Finalize) for h in getattr(gm, "_deepcopy_hooks", [])):
            register(self)


# ----------------------------------------------------------------------------- module form
def _float_leaves(out) -> list:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _max_rel_err(ref_out, out, numeric: bool = True) -> float | None:
    """Largest relative error over the floating outputs; the count and shapes are checked first (``numeric=False``:
    only those, for tensors without data: the meta device; returns ``None``)."""
    a, b = _float_leaves(ref_out), _float_leaves(out)
    if len(a) != len(b):
        raise StructureError(f"the rewritten model returns {len(b)} floating tensors, the original {len(a)}")
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            raise StructureError(f"an output of the rewritten model has shape {tuple(y.shape)}, the original's "
                                 f"{tuple(x.shape)}")
        if not numeric:
            continue
        x, y = x.detach().double(), y.detach().double()
        scale = x.abs().max().item()
        if scale > 0:
            worst = max(worst, (x - y).abs().max().item() / scale)
    return worst if numeric else None


def _check_tol(model) -> float:
    """The largest relative error the rewrite accepts at init, for the model's parameter dtype."""
    return CHECK_TOL.get(next((p.dtype for p in model.parameters()), torch.float32), 1e-5)


def _on_meta(model, args, kwargs) -> bool:
    """Whether the model's weights or the example are on the meta device (no values: nothing to compare)."""
    leaves = [*model.parameters(), *model.buffers(), *pytree.tree_leaves((args, kwargs))]
    return any(isinstance(t, torch.Tensor) and t.is_meta for t in leaves)


def _check_run(new, args, kwargs, meta: bool):
    """The rewritten model on the example call (it finds where streams start and that every site is reached)."""
    if not meta:
        return new(*args, **kwargs)
    try:
        return new(*args, **kwargs)
    except (RuntimeError, NotImplementedError) as e:
        if "meta" not in str(e):
            raise
        raise StructureError(
            f"{type(new).__name__}'s own forward cannot run on the meta device ({e}): the rewrite runs the model once "
            "to place its streams. Rewrite it on a real device, or build it on the meta device with code that reads "
            "no tensor values in forward (torchtitan's models do)") from e


META_CHECK = ("not run: the model is on the meta device (no values); after to_empty and init, "
              "hc_rewrite.check(new, original, example_inputs) compares them on real weights")


def check(new, original, example_inputs, example_kwargs=None, *, tol: float | None = None) -> float:
    """The rewritten ``new`` against ``original`` (same weights: e.g. both materialised and initialised after a
    meta-device rewrite, ``original.load_state_dict`` of ``new``'s plain weights) on one call, in eval mode without
    grad: returns the largest relative error of the floating outputs and raises
    :class:`~hc_rewrite.errors.StructureError` above ``tol`` (default: the rewrite's own, :data:`CHECK_TOL` for the
    parameter dtype)."""
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    kwargs = prepare_kwargs(original, example_kwargs)
    modes = original.training, new.training
    original.eval(), new.eval()
    try:
        with torch.no_grad():
            err = _max_rel_err(original(*args, **kwargs), new(*args, **kwargs))
    finally:
        original.train(modes[0]), new.train(modes[1])
    limit = _check_tol(original) if tol is None else tol
    if err > limit:
        raise StructureError(f"the rewritten model differs from the original by {err:.2e} (relative; limit "
                             f"{limit:.0e}): do both have the same weights, and the connections their init "
                             "(hc_rewrite.init_connections)?")
    return err


def _run_module(model, example_inputs, example_kwargs, spec: HCSpec):
    captured, sites, streams = _analyse(model, example_inputs, example_kwargs, spec, replayable=False)
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    kwargs = prepare_kwargs(model, example_kwargs)
    reference = captured.gm.eval() if captured.replayable else copy.deepcopy(model).eval()
    if captured.replayable:
        reference.recompile()  # the passes above leave recompiling to their last user
    with torch.no_grad():
        ref_out = reference(*args, **{k: v for k, v in kwargs.items() if k not in captured.baked}) \
            if captured.replayable else reference(*args, **kwargs)
    meta = _on_meta(model, args, kwargs)
    starts: dict = {}  # first site name -> where its stream value is made (found by the check run)
    placed = None
    while True:
        if placed is None:  # placed again only after a refused site regrouped the streams
            placed = MODULE_FORM(PassContext(captured.gm, spec, sites, streams))
        streams, placements = placed.streams, placed.placements
        if not streams:
            rep = _report(model, spec, captured, sites, streams, "module", 0)
            raise _no_stream(model, rep)
        plan = build_plan(spec, streams, placements)
        for ps in plan.streams:
            ps.start = starts.get(ps.first.name, ps.start) if ps.first else None
        new = attach(copy.deepcopy(model).eval(), plan)
        by_name = {s.name: s for st in streams for s in st.sites}
        try:
            with torch.no_grad(), TRACE, record_calls(new):
                out = _check_run(new, args, kwargs, meta)
            found = choose_starts(plan)
            lost = [name for name in by_name if name not in TRACE.added]
            if not lost and any(starts.get(k) != v for k, v in found.items()):
                starts.update(found)
                continue  # attach again with the streams started by their modules, and check that
            why = "its add was not reached through the stream value at run time (the skip is copied or " \
                  "transformed by code the rewrite does not follow)"
        except StreamError as e:
            culprit = next((n for n in by_name if f"site {n} " in str(e)), None)
            if culprit is None:
                raise
            lost, why = [culprit], f"at run time: {e}"
        if not lost:
            break
        for name in lost:
            by_name[name].reason = why
        streams = group_residual_streams(captured.gm, sites)
        placed = None
    err = _max_rel_err(ref_out, out, numeric=not meta)
    if err is not None and err > _check_tol(model):
        raise StructureError(
            f"the structure-preserving rewrite of {type(model).__name__} differs from the original by {err:.2e} "
            "(relative) on the example call at init: refusing to return it. form='graph' gives the flat graph form")
    for st in streams:
        st.ends = st.readers()
        for s in st.sites:
            s.rewritten = True
    for p in placements:
        p.site.placed = p.describe()
    rep = _report(model, spec, captured, sites, streams, "module",
                  sum(p.numel() for p in new.hc.parameters()), init_rel_err=err)
    rep.check = META_CHECK if meta else ""
    new.hc_report = rep
    new.train(model.training)
    return new, rep


def _run(model, example_inputs, example_kwargs, spec: HCSpec, form: str = "module"):
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}: expected one of {', '.join(FORMS)}")
    run = _run_module if form == "module" else _run_graph
    return run(model, example_inputs, example_kwargs, spec)


def rewrite(model, example_inputs, example_kwargs=None, *, variant="mhc", n=4, dynamic=True, form="module",
            **options) -> torch.nn.Module:
    """Rewrite every residual stream of ``model`` into ``variant`` connections.

    ``model(*example_inputs, **example_kwargs)`` is captured as an FX graph and its residual streams are
    detected (see :mod:`hc_rewrite.passes`). The caller's model is not modified.

    ``form="module"`` (default): returns a copy of the user's model, same class and module tree, whose
    Python code keeps running; the connection math is injected where each branch enters its first submodule
    and at each residual add (:mod:`hc_rewrite.structured`). It accepts every input the original accepts, at
    any shape. Sites that cannot be placed that way are refused with the reason in the report. It is checked
    against the original on the example call before it is returned.

    ``form="graph"``: one flat ``GraphModule`` of the example call (specialised to its inputs and branches;
    what the ONNX export and the ``hc_rewrite`` compile backend's graph passes work on).

    Both keep the original parameter names in their ``state_dict`` and add the connection parameters under
    ``hc.``; the report is at ``.hc_report``. ``n``: expansion rate (mhc, hc) or number of fractions (frac).
    ``options``: ``sinkhorn_iters`` (mhc, default 20), ``seed`` (initialisation of the dynamic mHC
    projections, default 0).

    Raises ``ValueError`` (:class:`~hc_rewrite.errors.SpecError`) for a spec that does not fit,
    :class:`~hc_rewrite.errors.CaptureError` for a model that cannot be captured,
    :class:`~hc_rewrite.errors.NoResidualStreamError` (with ``.report``) when nothing can be rewritten, and
    :class:`~hc_rewrite.errors.StructureError` when the module form cannot reproduce the original.
    """
    spec = _resolve_spec(make_spec(variant, n, dynamic, **options), model)
    new, _ = _run(model, example_inputs, example_kwargs, spec, form)
    return new


def report(model, example_inputs, example_kwargs=None, *, variant="mhc", n=4, dynamic=True, form="module",
           **options) -> RewriteReport:
    """What :func:`rewrite` would do, with the same arguments: every stream and site, and why a site is
    refused. Unlike :func:`rewrite`, a model without residual streams gives a report, not an error."""
    spec = _resolve_spec(make_spec(variant, n, dynamic, **options), model)
    try:
        _, rep = _run(model, example_inputs, example_kwargs, spec, form)
    except NoResidualStreamError as e:
        rep = e.report
    return rep
