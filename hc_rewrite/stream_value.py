"""The residual stream of a structure-preserving rewrite, as it runs through the user's own code.

The user's Python code keeps running unchanged. The value it holds where the original holds the residual
stream is a :class:`StreamValue`: a ``torch.Tensor`` subclass with the original's shape whose data is the
*reduced* stream (mean of the ``n`` copies for mHC / HC; for Frac the fractions concatenated, which is the
whole stream). The widened stream ``W [..., n, C]`` rides along as an attribute. So every reader the rewrite
does not know about (a final norm, ``output_hidden_states``, a loss, a shape test) sees exactly what the
flat graph form gives such readers, and any Python control flow behaves as in the original.

Three things change what a :class:`StreamValue` does (everything else unwraps to a plain tensor):

* a site's **entry hook** (:class:`EntryHook`, a forward pre-hook on the branch's first submodule) gives the
  branch ``pre(W)`` instead of the stream and leaves the site's coefficients on the stream value;
* the **site add** ``x + y`` (any spelling, in place too) of a stream value that carries pending
  coefficients becomes ``W' = post(W, y)``; the result is a new stream value;
* **stream-wise links** (dropout, LayerNorm over the features, ReLU, casts, clones, views that keep the
  feature dim) are applied to ``W`` with the lifted ops of :mod:`hc_rewrite.ops.reference`.

The site math is the variant's (:class:`hc_rewrite.variants.base.Variant`, the same the graph form emits),
run on the ops ``torch.ops.hc_rewrite.*`` so that the ``hc_rewrite`` compile backend can lower it.
"""
from __future__ import annotations

import inspect
import types
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
import torch.utils.checkpoint

from . import variants
from .errors import HCRewriteError
from .ops.library import ops
from .variants import eager

def _plain():
    """Subclass dispatch off, for the code that works on the plain tensors under a stream value. Under compile, torch
    function modes too: dynamo, with a mode on the stack (:class:`CheckpointMode`), still offers calls to the
    subclasses of their arguments while subclass dispatch is off (eager C++ does not), which would recurse."""
    if torch.compiler.is_compiling():
        return torch._C.DisableTorchFunction()
    return torch._C.DisableTorchFunctionSubclass()


class StreamError(HCRewriteError, RuntimeError):
    """The rewritten model was run in a way its residual streams cannot follow (named in the message)."""


@dataclass
class StreamInfo:
    """What every site of one stream shares."""

    id: int
    width: int
    feature_dim: int  # -1 channels last, 1 channels first
    variant: variants.Variant
    n: int
    sinkhorn_iters: int
    owner: object = None  # one token per rewritten model: stream values of other models are not ours
    rank: int = 0  # rank of the stream tensor (0: unknown)
    # stream position -> the entry hook of the functional site that reads the stream value at that position
    # (its branch reads the stream in the add's own code: the ops are recorded as Derived values)
    functional: dict = field(default_factory=dict)
    # positions are kept under compile too (looped entries and functional sites choose by position; the stream's
    # blocks then compile one graph per position)
    indexed: bool = False


@dataclass
class _Pending:
    """Coefficients an entry hook computed, waiting for the site's add."""

    hook: "EntryHook"
    w: torch.Tensor
    h_post: torch.Tensor
    h_res: torch.Tensor | None
    branch_in: torch.Tensor
    extra: int  # further branches still to be added (parallel blocks written (x + a) + b)
    continued: bool = False  # a further branch of a site whose first add is done (no H_res again)


class StreamValue(torch.Tensor):
    """See the module docstring. Attributes: ``_hc_info`` (:class:`StreamInfo`), ``_hc_w`` (the widened
    stream, ``None`` for Frac), ``_hc_index`` (the last site applied), ``_hc_pending``."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        arm = _arm_of(args, kwargs)
        if arm is not None and (handler is None or (getattr(func, "__name__", "") in arm.hook.spellings
                                                    and (handler is not _add or _reads_stream(arm, args)))):
            return _derive(arm, func, args, kwargs)
        if handler is not None:
            out = handler(func, args, kwargs)
            if out is not NotImplemented:
                return out
        with _plain():
            if args and _bound(args[0]) and getattr(func, "__name__", "") != "__get__":
                _LAST_DROP[0] = getattr(func, "__name__", str(func))
            if func in _INPLACE_OTHER and args and _bound(args[0]):
                raise StreamError(
                    f"in-place {getattr(func, '__name__', func)} on a residual stream value: the rewrite "
                    "cannot carry it to the widened stream")
            return _call_plain(func, args, kwargs)


def _call_plain(func, args, kwargs):
    """``func`` with subclass dispatch off. Under compile, a torch function written in Python (``F.rms_norm``,
    ``F.layer_norm``) gets plain aliases of the stream values: it asks ``has_torch_function`` of its arguments, which
    dynamo answers from their type (so the call failed). Eager, and for builtins, the values themselves, as before
    (dynamo replays some builtins on stream values after a graph, where an alias would compile a graph of its own;
    eager, FSDP2's DTensor parameters meet the stream values in ``Tensor.__mul__``, which an alias breaks)."""
    with _plain():
        if not (torch.compiler.is_compiling() and isinstance(func, types.FunctionType)):
            return func(*args, **kwargs)
        args = tuple(_plain_arg(a) for a in args)
        kwargs = {k: _plain_arg(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _alias(t: torch.Tensor) -> torch.Tensor:
    """A plain alias of ``t`` (``view_as`` with subclass dispatch off: dynamo cannot trace ``as_subclass(Tensor)``)."""
    with _plain():
        return t.view_as(t)


def _plain_arg(a):
    """A plain alias of a stream value or a derived value; one level of lists and tuples (``torch.cat([x, y])``)
    looked into."""
    ours = (StreamValue, Derived)
    if isinstance(a, ours):
        return _alias(a)
    if isinstance(a, (list, tuple)) and any(isinstance(v, ours) for v in a):
        return type(a)(_alias(v) if isinstance(v, ours) else v for v in a)
    return a


def _fits_stream(v, info: "StreamInfo") -> bool:
    """Whether ``v`` could hold stream ``info``: a floating tensor of its rank with its width on its feature dim."""
    return (isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 2
            and (not info.rank or v.dim() == info.rank) and v.shape[info.feature_dim] == info.width)


def _bound(x) -> bool:
    return isinstance(x, StreamValue) and getattr(x, "_hc_info", None) is not None


# ----------------------------------------------------------------------------- functional entries
class _Arm:
    """A stream value ``src`` at the position a functional site reads it: the ops on it until the site's add are
    recorded (:class:`Derived`) so that the branch can be replayed on ``pre(W)``."""

    def __init__(self, hook: "EntryHook", src: "StreamValue"):
        self.hook, self.src, self.done = hook, src, False


class Derived(torch.Tensor):
    """A value the user's code computed from a stream value whose next site reads it in the add's own code
    (``torch.tanh(h)`` in ``h + self.f(torch.tanh(h))``): the plain result, and how it was computed
    (``_hc_rec``: ``((func, args, kwargs), output index)``), so that the site's entry hook (or the add, for a branch
    without a submodule) can replay the ops on ``pre(W)`` in place of the stream (:func:`_replay`). Ops on it stay
    recorded until the site's add; after that it is a plain tensor to every op."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _HANDLERS.get(func) is _add and any(_bound(a) for a in args[:2]):
            return NotImplemented  # the site's add: StreamValue.__torch_function__ replays this value there
        arm = None
        for a in pytree.tree_leaves((args, kwargs)):
            if isinstance(a, Derived) and not a._hc_arm.done:
                arm = a._hc_arm
                break
        if arm is None:
            return _call_plain(func, args, kwargs)
        return _derive(arm, func, args, kwargs)


def _reads_stream(arm: _Arm, args) -> bool:
    """An add on the armed stream value that is a read by its branch (``self.f(x + pos)``), not the site's add: the
    value has no pending coefficients and no operand comes from the branch."""
    return arm.src._hc_pending is None and not any(isinstance(a, Derived) and a._hc_arm is arm for a in args)


def _arm_of(args, kwargs):
    """The live arm of a stream value among ``args`` whose position is read by a functional site (else None)."""
    for a in (*args, *kwargs.values()):
        if not (_bound(a) and a._hc_info.functional):
            continue
        hook = a._hc_info.functional.get(a._hc_index)
        if hook is None:
            continue
        pending = a._hc_pending
        if pending is not None and pending.hook is not hook:
            continue
        arm = getattr(a, "_hc_arm", None)
        if arm is None:
            arm = _Arm(hook, a)
            a._hc_arm = arm
        if not arm.done:
            return arm
    return None


def _derive(arm: _Arm, func, args, kwargs):
    """``func`` on plain values, its tensor results recorded as :class:`Derived` values of ``arm``."""
    out = _call_plain(func, args, kwargs)
    rec = (func, args, kwargs)
    if isinstance(out, torch.Tensor):
        return _as_derived(out, arm, rec, None)
    if isinstance(out, (tuple, list)) and out and all(isinstance(o, torch.Tensor) for o in out):
        return type(out)(_as_derived(o, arm, rec, i) for i, o in enumerate(out))
    return out


def _as_derived(t: torch.Tensor, arm: _Arm, rec, index) -> "Derived":
    with _plain():
        d = t.as_subclass(Derived)
    d._hc_arm, d._hc_rec = arm, (rec, index)
    return d


def _replay(value, arm: _Arm, z: torch.Tensor, memo: list):
    """``value`` recomputed with the stream value of ``arm`` replaced by ``z`` (the site's ``pre(W)``): the recorded
    ops of every :class:`Derived` value of ``arm`` it depends on run again; anything else is kept."""
    if value is arm.src:
        return z
    if not (isinstance(value, Derived) and value._hc_arm is arm):
        return value
    for k, v in memo:
        if k is value:
            return v
    (func, args, kwargs), index = value._hc_rec
    args, kwargs = pytree.tree_map(lambda a: _replay(a, arm, z, memo), (args, kwargs))
    out = _call_plain(func, args, kwargs)
    if index is not None:
        out = out[index]
    memo.append((value, out))
    return out


# Live stream values by storage: wrappers that hand a layer an alias of its input (FSDP2's pre-forward
# autograd function, ``x.view_as(x)``) make a new tensor object without our attributes; an entry hook that
# gets such an alias finds the stream value it aliases here (same data pointer, shape, strides and dtype).
_LIVE: dict = {}


def _key(t: torch.Tensor):
    if t.is_meta:  # no storage: every meta tensor has data pointer 0
        return None
    try:
        return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)
    except (RuntimeError, NotImplementedError):  # fake / meta tensors have no data pointer
        return None


def _remember(sv: StreamValue) -> None:
    if torch.compiler.is_compiling():  # eager only: under compile the registry's size would be guarded on (a recompile
        return                          # per call); aliases made by view_as keep the stream there (_same)
    key = _key(sv)
    if key is None:
        return
    if len(_LIVE) > 4096:
        for k in [k for k, r in _LIVE.items() if r() is None]:
            del _LIVE[k]
    _LIVE[key] = weakref.ref(sv)


def _aliased(t: torch.Tensor, info: StreamInfo):
    """The live value of stream ``info`` that ``t`` aliases, if any."""
    key = _key(t)
    ref = _LIVE.get(key) if key is not None else None
    sv = ref() if ref is not None else None
    if sv is not None and sv is not t and _bound(sv) and sv._hc_info is info:
        return sv
    return None


def _wrap(narrow: torch.Tensor, info: StreamInfo, w, index: int) -> StreamValue:
    with _plain():
        out = narrow.as_subclass(StreamValue)
    out._hc_info, out._hc_w, out._hc_index, out._hc_pending, out._hc_arm = info, w, index, None, None
    _remember(out)
    return out


def _mark(x: torch.Tensor, info: StreamInfo, w, index: int) -> StreamValue:
    """Turn the object ``x`` itself into a stream value (the user's code holds it: an alias would not do)."""
    if not isinstance(x, StreamValue):
        x.__class__ = StreamValue
    x._hc_info, x._hc_w, x._hc_index, x._hc_pending, x._hc_arm = info, w, index, None, None
    _remember(x)
    return x


# ----------------------------------------------------------------------------- layout helpers
def _to_last(t: torch.Tensor, info: StreamInfo) -> torch.Tensor:
    return t.movedim(1, -1) if info.feature_dim == 1 else t


def _from_last(t: torch.Tensor, info: StreamInfo) -> torch.Tensor:
    """Back to channels first, in the memory format the user's convolutions get from the original model: a
    ``movedim`` view alone hands them channels-last strides, on which oneDNN's 1x1-convolution weight gradient
    (avx512) was seen to crash the process (SIGSEGV in ``jit_avx512_common_1x1_convolution_bwd_weights``)."""
    return t.movedim(-1, 1).contiguous() if info.feature_dim == 1 else t


def _widen(x: torch.Tensor, info: StreamInfo) -> torch.Tensor:
    return info.variant.expand(eager, _to_last(x, info), info.n)


def _wide_of(x: StreamValue) -> torch.Tensor:
    """The widened stream of a bound value (a split stream: the fractions of the value itself)."""
    if x._hc_info.variant.split:
        with _plain():
            return _widen(x, x._hc_info)
    return x._hc_w


class _Tie(torch.autograd.Function):
    """``W`` unchanged, with an autograd edge to the narrow stream value ``x`` (zero gradient).

    The gradient of a site reaches the previous one through ``W``, the attribute, not through the tensor the
    user's code passed between modules. Module-level tools hook those tensors (FSDP2 unshards a block when the
    gradient of its output arrives, and reduce-scatters when the gradient of its input does): this edge keeps
    their hooks firing in the order of the original model.
    """

    @staticmethod
    def forward(ctx, w, x):
        ctx.x_meta = (x.shape, x.dtype, x.device)
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad_w):
        shape, dtype, device = ctx.x_meta
        return grad_w, torch.zeros(shape, dtype=dtype, device=device)


def _tied(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _Tie.apply(w, x)
    return w


# ----------------------------------------------------------------------------- start
class StartHook:
    """Where a stream value is made: a forward hook of the module that returns the stream's first value, or a
    forward pre-hook of the module whose code holds the first site's add and takes that value as an input (which
    one: :func:`hc_rewrite.structured.choose_starts`, from the rewrite's check run; saved in the plan). It hands the
    user's code a new stream value (the tensor itself is not changed), so nothing has to change the class of an
    object the user's code already holds, which ``torch.compile`` cannot trace. Where it finds no single candidate it changes nothing and
    the first site's entry hook marks the value instead."""

    def __init__(self, info: StreamInfo, where=None):
        self.info, self.where = info, where  # where: ["arg", i] / ["kw", name] the input was passed as, or None

    def _fits(self, v) -> bool:
        return _fits_stream(v, self.info) and not (_bound(v) and v._hc_info is self.info)

    def __call__(self, module, args, kwargs, *output):
        if not output and self.where is not None:  # the input the check run saw the stream in
            kind, key = self.where
            x = args[key] if kind == "arg" and key < len(args) else kwargs.get(key) if kind == "kw" else None
            if self._fits(x):
                sv = self._start(x)
                if kind == "arg":
                    return (*args[:key], sv, *args[key + 1:]), kwargs
                return args, {**kwargs, key: sv}
        value = output[0] if output else (args, kwargs)
        leaves, spec = pytree.tree_flatten(value)
        cands = [i for i, v in enumerate(leaves) if self._fits(v)]
        if len({id(leaves[i]) for i in cands}) != 1:
            return None
        sv = self._start(leaves[cands[0]])
        for i in cands:
            leaves[i] = sv
        return pytree.tree_unflatten(leaves, spec)

    def _start(self, x) -> "StreamValue":
        info = self.info
        plain = _alias(x) if isinstance(x, StreamValue) else x
        with _plain():
            w = None if info.variant.split else _widen(plain, info)
        return _wrap(plain, info, w, -1)


# ----------------------------------------------------------------------------- entry (pre)
class EntryHook:
    """Forward pre-hook of a site's branch entry module: the branch reads ``pre(W)`` instead of the stream.

    ``functional``: the names of the ops by which the branch reads the stream in the add's own code before this
    module (a functional entry): the module is then given those ops replayed on ``pre(W)`` (:class:`Derived`);
    with no entry module at all, the add opens the site (:meth:`open`)."""

    def __init__(self, info: StreamInfo, index: int, name: str, params: torch.nn.Module, extra: int,
                 functional=()):
        self.info, self.index, self.name, self.params, self.extra = info, index, name, params, extra
        self.functional = tuple(functional)
        # the Python names of those ops (torch.layer_norm, Tensor.__mul__, Tensor.mul_): an op of these names that
        # would otherwise be a stream-wise link (F.layer_norm) is the branch reading the stream here
        self.spellings = frozenset(s for f in self.functional for s in (f, f"__{f}__", f"__i{f}__", f"{f}_"))
        self.compiled = None  # (site_pre, site_post) compiled by compile_stream_ops, or None: eager

    def _describe(self) -> str:
        return f"site {self.name} (stream {self.info.id}, position {self.index})"

    def _derived(self, leaves) -> list:
        return [i for i, v in enumerate(leaves) if isinstance(v, Derived) and v._hc_arm.hook is self
                and not v._hc_arm.done]

    def _find(self, leaves):
        ours = [i for i, v in enumerate(leaves) if _bound(v) and v._hc_info is self.info]
        if ours:
            return ours[0]
        for i, v in enumerate(leaves):
            sv = _aliased(v, self.info) if isinstance(v, torch.Tensor) else None
            if sv is not None:  # an alias made by a wrapper: it carries the same stream
                _mark(v, sv._hc_info, sv._hc_w, sv._hc_index)
                return i
        if self.index != 0 or self.functional:
            raise StreamError(
                f"{self._describe()}: its input is not the residual stream it was rewritten for. The stream was "
                f"lost on the way from the previous site (last op that dropped it: {_LAST_DROP[0]}). Causes: "
                "reentrant activation checkpointing (use use_reentrant=False), code that detaches or copies the "
                "stream, or an op on the stream the rewrite does not carry")
        fits = [i for i, v in enumerate(leaves) if _fits_stream(v, self.info)]
        cands = [i for i in fits if not self._ours(leaves[i])]
        if not cands:  # a stream that starts from the last value of another of our streams (layouts alternate)
            cands = [i for i in fits if leaves[i]._hc_info is not self.info]
        if len({id(leaves[i]) for i in cands}) == 1:
            cands = cands[:1]  # one tensor passed twice (DeBERTa: hidden_states and query_states)
        if len(cands) != 1:
            raise StreamError(
                f"{self._describe()}: cannot tell which input of its entry module is the residual stream "
                f"({len(cands)} candidates of width {self.info.width})")
        return cands[0]

    def _ours(self, v) -> bool:
        """A stream value of this rewritten model (any of its streams)."""
        return _bound(v) and v._hc_info.owner is self.info.owner

    def __call__(self, module, args, kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        derived = self._derived(leaves) if self.functional else []
        if derived:
            x = leaves[derived[0]]._hc_arm.src
            direct = [i for i, v in enumerate(leaves) if v is x]
        else:
            direct = [self._find(leaves)]
            x = leaves[direct[0]]
        pending = getattr(x, "_hc_pending", None) if isinstance(x, StreamValue) else None
        if pending is None or pending.hook is not self:  # else a further entry module of the same site
            pending = self.open(x, module.training)
        for i in direct:
            leaves[i] = pending.branch_in
        memo: list = []
        for i in derived:
            leaves[i] = _replay(leaves[i], leaves[i]._hc_arm, pending.branch_in, memo)
        return pytree.tree_unflatten(leaves, spec)

    def open(self, x: torch.Tensor, training: bool = True) -> "_Pending":
        """Compute the site's coefficients and branch input from the stream value ``x`` (a plain tensor at the
        stream's start is made the stream value) and leave them on ``x`` for the add."""
        same_stream = _bound(x) and x._hc_info is self.info
        # the order check runs eagerly only: under compile a site's position would be a constant every block's
        # graph specialises on (one graph per block instead of one for all); the rewrite's check run and any eager
        # call still catch control flow that differs from the captured one
        if same_stream and not torch.compiler.is_compiling() and x._hc_index >= self.index:
            raise StreamError(f"{self._describe()}: reached a stream value that already passed position "
                              f"{x._hc_index} of its stream; the model's control flow differs from the captured one")
        if torch.is_grad_enabled() is False and x.requires_grad and training:
            raise StreamError(f"{self._describe()}: run under no_grad with an input that requires grad inside "
                              "training: reentrant activation checkpointing cannot carry the widened stream; "
                              "use use_reentrant=False")
        info = self.info
        with _plain():
            if same_stream:
                w = _wide_of(x) if info.variant.split else _tied(_wide_of(x), x)
            else:
                w = _widen(x, info)
                if TRACE.on:
                    TRACE.starts[info.id] = (TRACE.returned.get(id(x)), TRACE.received.get(id(x), ()))
                _mark(x, info, None if info.variant.split else w, -1)
            if RECORD.on:
                RECORD.calls.append((self, w))
            math = self.compiled[0] if self.compiled else site_pre
            branch_in, h_post, h_res = math(info.variant.name, info.sinkhorn_iters, w, *self.params.coeff_args())
            branch_in = _from_last(branch_in, info).to(x.dtype)
        pending = _Pending(self, w, h_post, h_res, branch_in, self.extra)
        x._hc_pending = pending
        if TRACE.on:
            TRACE.fired.append(self.name)
        return pending


class LoopEntryHook:
    """Forward pre-hook of a module that is the branch entry of several sites, one per call (ALBERT's shared layer,
    a block run ``k`` times per forward): it hands each call to the site whose stream position follows the
    position of the stream value it is given (``after``: position -> :class:`EntryHook`). A call at a position no
    site follows is left alone when the module also ran outside any site at capture (``passes``), and is a
    :class:`StreamError` otherwise (the block runs more often than it did at capture)."""

    def __init__(self, path: str, after: dict, passes: bool):
        self.path, self.after, self.passes = path, after, passes
        self.hooks = list(dict.fromkeys(after.values()))

    def _stream_value(self, leaves):
        infos = [h.info for h in self.hooks]
        for v in leaves:
            if isinstance(v, Derived) and not v._hc_arm.done and v._hc_arm.hook in self.hooks:
                return v._hc_arm.src
            if _bound(v) and any(v._hc_info is i for i in infos):
                return v
        return None

    def __call__(self, module, args, kwargs):
        leaves, _spec = pytree.tree_flatten((args, kwargs))
        x = self._stream_value(leaves)
        pending = getattr(x, "_hc_pending", None) if x is not None else None
        if pending is not None and pending.hook in self.hooks:
            return pending.hook(module, args, kwargs)
        if x is not None:
            where = (x._hc_info.id, x._hc_index)
            hook = self.after.get(where)
        else:  # the stream is not started yet: the first site of a stream marks it
            firsts = [h for (_sid, pos), h in self.after.items() if pos == -1]
            hook, where = (firsts[0] if len(firsts) == 1 else None), "its start"
        if hook is None:
            if self.passes:
                return None
            raise StreamError(
                f"'{self.path}' runs the branch of {len(self.hooks)} sites, one per call, and was called with the "
                f"stream at position {where}, which none of them follows: the module runs more often (or in "
                "another order) than it did when the model was rewritten. Rewrite it with the largest number of "
                "calls it makes (fewer calls work)")
        return hook(module, args, kwargs)


# ----------------------------------------------------------------------------- the site math
def site_pre(variant: str, iters: int, w, *coeff_args):
    """Coefficients and branch input of one site: ``(branch_in, h_post, h_res)`` (channels last)."""
    return variants.get(variant).site_pre(eager, w, coeff_args, iters)


def site_post(variant: str, w, y, h_post, h_res, *head):
    """The widened stream after a site and its reduction: ``(W', reduce(W'))`` (channels last); with ``head`` (the
    last site's head parameters, where the stream ends in a learned collapse) ``(W', end(W'))``."""
    kind = variants.get(variant)
    w_new = kind.site_post(eager, w, y, h_post, h_res)
    return w_new, (kind.end(eager, w_new, list(head)) if head else kind.reduce(eager, w_new))


# ----------------------------------------------------------------------------- the site add (post)
def _post(pending: _Pending, y: torch.Tensor, x: StreamValue, first: bool) -> StreamValue:
    info = pending.hook.info
    # the stream's last site, where it ends in a learned collapse (production mHC's head): the readers after it read
    # that, as plain tensors (in the graph form too, the head is what every reader after the last site reads)
    head = pending.hook.params.head_args() if pending.extra == 0 else []
    with _plain():
        yl = _to_last(y, info).to(pending.w.dtype)
        h_res = pending.h_res if first else None
        math = pending.hook.compiled[1] if pending.hook.compiled else site_post
        w_new, end = math(info.variant.name, pending.w, yl, pending.h_post, h_res, *head)
        narrow = _from_last(end, info).to(torch.promote_types(x.dtype, y.dtype))
    # the position is recorded eagerly only (for the order check): compiled, every block shares one graph; a stream
    # with looped or functional sites needs it (they choose by position)
    index = -1 if torch.compiler.is_compiling() and not info.indexed else pending.hook.index
    arm = getattr(x, "_hc_arm", None)
    if arm is not None and arm.hook is pending.hook:
        arm.done = True
    if first and TRACE.on:
        TRACE.added.append(pending.hook.name)
    if head:
        return narrow
    out = _wrap(narrow, info, None if info.variant.split else w_new, index)
    if pending.extra > 0:
        out._hc_pending = _Pending(pending.hook, w_new, pending.h_post, None, pending.branch_in, pending.extra - 1,
                                   continued=True)
    return out


def _add(func, args, kwargs):
    if len(args) < 2:
        return NotImplemented
    a, b = args[0], args[1]
    alpha = kwargs.get("alpha", 1)
    for x, y, x_first in ((a, b, True), (b, a, False)):
        pending = getattr(x, "_hc_pending", None) if isinstance(x, StreamValue) else None
        arm = y._hc_arm if isinstance(y, Derived) and not y._hc_arm.done and y._hc_arm.src is x else None
        if pending is None and arm is not None:  # a functional branch without a submodule: the add opens the site
            pending = arm.hook.open(x)
        if pending is None or not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(x.shape):
            continue
        if arm is not None and arm.hook is pending.hook:
            y = _replay(y, arm, pending.branch_in, [])
        if alpha != 1 and not x_first:
            return NotImplemented  # branch + alpha * skip: not a residual add (refused at analysis)
        if alpha != 1:
            with _plain():
                y = y * alpha
        first = not pending.continued
        x._hc_pending = None
        if func in _INPLACE_ADD and y is a:  # y.add_(x): y is overwritten below, but post saves it for backward
            with _plain():
                y = y.clone()
        out = _post(pending, y, x, first)
        if func in _INPLACE_ADD:  # a.add_(b) / a += b: the object the user code holds becomes the result
            target = a
            with _plain():  # through a plain alias: dynamo resets the class of a variable an in-place op mutates
                target.view_as(target).copy_(out)
            if not isinstance(out, StreamValue):  # the stream ended in its head: `target` holds a plain value now
                if isinstance(target, StreamValue):
                    target._hc_info = None
                return target
            if not isinstance(target, StreamValue) and (func is torch.Tensor.__iadd__ or torch.compiler.is_compiling()):
                # `y += x`: Python binds the name to what __iadd__ returns, no class change needed (under compile,
                # dynamo hands `+=` over as add_: a statement `y.add_(x)` then loses the stream, which the next
                # entry reports as a StreamError; the value of `y` is the site's output either way)
                return out
            _mark(target, out._hc_info, out._hc_w, out._hc_index)
            target._hc_pending = out._hc_pending
            return target
        return out
    return NotImplemented


# ----------------------------------------------------------------------------- stream-wise links
_LAST_DROP = ["none"]


def _link(func, args, kwargs, wide_fn, narrow_from_wide=False):
    """``func`` on a stream value: ``wide_fn(W, narrow)`` gives the new ``W``. The narrow result is ``func``'s
    own (equal to the reduction of the new ``W`` for the lifted ops), or, with ``narrow_from_wide``, that
    reduction (dropout: independent masks per copy). A split stream (Frac) needs no ``W``: the narrow value is the
    stream."""
    x = args[0] if args else None
    if not _bound(x) or x._hc_pending is not None:
        return NotImplemented
    info = x._hc_info
    with _plain():
        if info.variant.split:
            return _wrap(_call_plain(func, args, kwargs), info, None, x._hc_index)
        narrow = None if narrow_from_wide else _call_plain(func, args, kwargs)
        w_new = wide_fn(x._hc_w, narrow)
        if w_new is NotImplemented:
            return NotImplemented
        if narrow_from_wide:
            narrow = _from_last(info.variant.reduce(eager, w_new), info)
    return _wrap(narrow, info, w_new, x._hc_index)


def _dropout(func, args, kwargs):
    x = args[0] if args else None
    if not _bound(x):
        return NotImplemented
    p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
    training = kwargs.get("training", kwargs.get("train", args[2] if len(args) > 2 else True))
    if kwargs.get("inplace", args[3] if len(args) > 3 else False):
        raise StreamError("in-place dropout on a residual stream value is not supported")
    if not training or p == 0:
        return x
    return _link(func, args, kwargs, lambda w, _n: F.dropout(w, p, True), narrow_from_wide=True)


def _layer_norm(func, args, kwargs):
    x = args[0] if args else None
    if not _bound(x):
        return NotImplemented
    info = x._hc_info
    shape = kwargs.get("normalized_shape", args[1] if len(args) > 1 else None)
    if info.feature_dim != -1 or list(shape) != [info.width]:
        return NotImplemented
    weight = kwargs.get("weight", args[2] if len(args) > 2 else None)
    bias = kwargs.get("bias", args[3] if len(args) > 3 else None)
    eps = kwargs.get("eps", args[4] if len(args) > 4 else 1e-5)
    return _link(func, args, kwargs, lambda w, _n: ops.stream_layer_norm(w, weight, bias, float(eps), False))


def _relu(func, args, kwargs):
    if kwargs.get("inplace", False) or (len(args) > 1 and args[1] is True):
        args, kwargs = args[:1], {}
        func = torch.relu
    return _link(func, args, kwargs, lambda w, _n: ops.stream_relu(w, False))


def _cast(func, args, kwargs):
    return _link(func, args, kwargs, lambda w, n: w.to(device=n.device, dtype=n.dtype))


def _same(func, args, kwargs):
    return _link(func, args, kwargs, lambda w, _n: w)


def _view(func, args, kwargs):
    x = args[0] if args else None
    if not _bound(x) or x._hc_info.feature_dim != -1:
        return NotImplemented
    n_ = x._hc_info
    def wide(w, narrow):
        if narrow.dim() < 1 or narrow.shape[-1] != n_.width:
            return NotImplemented
        return w.reshape(*narrow.shape[:-1], *w.shape[-2:])
    return _link(func, args, kwargs, wide)


# ----------------------------------------------------------------------------- activation checkpointing under compile
#: the keyword options of ``checkpoint`` itself (``use_reentrant``, ``context_fn``, ``early_stop``, ...); every other
#: keyword goes to the checkpointed function
_CHECKPOINT_OPTIONS = frozenset(
    p.name for p in inspect.signature(torch.utils.checkpoint.checkpoint).parameters.values()
    if p.kind is p.KEYWORD_ONLY) | {"preserve_rng_state"}


def _checkpoint_eagerly(func, args, kwargs):
    return func(*args, **kwargs)


_checkpoint_eagerly = torch._dynamo.disable(_checkpoint_eagerly, reason=(
    "hc_rewrite: activation checkpointing of a region that takes a residual stream value, inside a compiled region, "
    "nested in another checkpointed region (or called outside the rewritten model's forward, which enters "
    "hc_rewrite's CheckpointMode): the region runs eagerly (a graph break). Dynamo would trace its body from "
    "StreamValue.__torch_function__, where subclass dispatch is off: the site adds would not be rewritten. "
    "Checkpoint the outer region only, or compile inside the checkpoint"))


def _checkpoint(func, args, kwargs):
    """``torch.utils.checkpoint.checkpoint`` on a stream value, handed to the stream value itself: only dynamo does
    that, when no :class:`CheckpointMode` took the call first (a region nested in a checkpointed region, where the
    mode is off while its handler runs; a compiled block called outside the rewritten model's forward). The body
    would be traced with subclass dispatch off, so the region runs eagerly instead: a graph break, the eager numbers
    (with ``fullgraph=True``, dynamo's error names the reason above)."""
    return _checkpoint_eagerly(func, args, kwargs)


class CheckpointMode(torch.overrides.TorchFunctionMode):
    """Activation checkpointing inside a compiled region, with the region's site adds rewritten.

    Dynamo turns ``torch.utils.checkpoint.checkpoint(fn, x)`` into a higher-order op and first offers the call to
    ``__torch_function__``: of a mode on the stack before a tensor subclass. A subclass's handler is traced with
    subclass dispatch off (so the body would not see the site adds); a mode's is not. This mode takes the call when
    an argument is a stream value, passes the stream values into the region as plain tensors (the narrow value and
    the widened ``W``), makes them stream values again inside the body, and hands the body's stream values out the
    same way: the region is traced as one with the user's code, the hooks and the site math, and checkpointed.
    Everything else passes through untouched (eager ``checkpoint`` never dispatches: the mode only acts while dynamo
    traces). The rewritten model's forward enters it (:func:`hc_rewrite.structured._rewritten_root_forward`)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.utils.checkpoint.checkpoint and any(_bound(v) for v in pytree.tree_leaves((args[1:], kwargs))):
            return _checkpoint_through(func, args, kwargs)
        return func(*args, **kwargs)


_SLOTS = 6  # per leaf: value, W, and a pending site's W, h_post, h_res, branch input


def _unwrap_streams(leaves) -> tuple:
    """``(flat, metas)``: each leaf as :data:`_SLOTS` tensors or ``None`` (a stream value as a plain alias, its widened
    stream and the tensors of a site it carries open: entry done, add to come) and its metadata as constants
    (``None`` for anything else; else its stream, position and the open site's hook, ``extra``, ``continued``)."""
    flat, metas = [], []
    for v in leaves:
        if not _bound(v):
            metas.append(None)
            flat += [v] + [None] * (_SLOTS - 1)
            continue
        p = v._hc_pending
        metas.append((v._hc_info, v._hc_index, None if p is None else (p.hook, p.extra, p.continued)))
        flat += [_alias(v), v._hc_w] + ([None] * 4 if p is None else [p.w, p.h_post, p.h_res, p.branch_in])
    return flat, metas


def _rewrap_streams(flat, metas) -> list:
    out = []
    for i, meta in enumerate(metas):
        value, w, pw, h_post, h_res, branch_in = flat[_SLOTS * i:_SLOTS * (i + 1)]
        if meta is None:
            out.append(value)
            continue
        info, index, open_site = meta
        sv = _wrap(value, info, w, index)
        if open_site is not None:
            hook, extra, continued = open_site
            sv._hc_pending = _Pending(hook, pw, h_post, h_res, branch_in, extra, continued)
        out.append(sv)
    return out


def _checkpoint_through(func, args, kwargs):
    """``checkpoint(fn, *args, **kwargs)`` (see :class:`CheckpointMode`): stream values cross the region's boundary as
    plain tensors and come back as stream values on both sides, a site left open on either side included (the
    branch's entry inside the region and its add after it, or the reverse)."""
    fn = args[0]
    options = {k: v for k, v in kwargs.items() if k in _CHECKPOINT_OPTIONS}
    inputs = (args[1:], {k: v for k, v in kwargs.items() if k not in _CHECKPOINT_OPTIONS})
    leaves, spec = pytree.tree_flatten(inputs)
    flat, metas = _unwrap_streams(leaves)

    def body(*flat_in):
        rewrapped = _rewrap_streams(list(flat_in), metas)
        call_args, call_kwargs = pytree.tree_unflatten(rewrapped, spec)
        out_leaves, out_spec = pytree.tree_flatten(fn(*call_args, **call_kwargs))
        out_flat, out_metas = _unwrap_streams(out_leaves)
        # the inputs' open sites after the call (one opened inside, or closed by an add inside)
        after_flat, after_metas = _unwrap_streams(rewrapped)
        return (tuple(out_flat), tuple(after_flat)), (out_spec, tuple(out_metas), tuple(after_metas))

    (out_flat, after_flat), (out_spec, out_metas, after_metas) = func(body, *flat, **options)
    for leaf, after in zip(leaves, _rewrap_streams(list(after_flat), after_metas)):
        if _bound(leaf):
            leaf._hc_pending = after._hc_pending
    return pytree.tree_unflatten(_rewrap_streams(list(out_flat), out_metas), out_spec)


_ADD_FUNCS = [torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__]
_INPLACE_ADD = {torch.Tensor.add_, torch.Tensor.__iadd__}
_INPLACE_OTHER = {
    torch.Tensor.mul_, torch.Tensor.__imul__, torch.Tensor.sub_, torch.Tensor.__isub__, torch.Tensor.div_,
    torch.Tensor.__itruediv__, torch.Tensor.copy_, torch.Tensor.clamp_, torch.Tensor.masked_fill_,
    torch.Tensor.zero_, torch.Tensor.fill_,
}
_HANDLERS = {f: _add for f in [*_ADD_FUNCS, *_INPLACE_ADD]}
_HANDLERS.update({f: _dropout for f in (F.dropout, torch.dropout)})
_HANDLERS.update({f: _layer_norm for f in (F.layer_norm, torch.layer_norm)})
_HANDLERS.update({f: _relu for f in (F.relu, torch.relu, torch.Tensor.relu, torch.Tensor.relu_, torch.relu_)})
_HANDLERS.update({f: _cast for f in (torch.Tensor.to, torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16,
                                     torch.Tensor.double, torch.Tensor.type_as)})
_HANDLERS.update({f: _same for f in (torch.Tensor.contiguous, torch.Tensor.clone, torch.Tensor.view_as)})
_HANDLERS[torch.utils.checkpoint.checkpoint] = _checkpoint
_HANDLERS.update({f: _view for f in (torch.Tensor.view, torch.Tensor.reshape, torch.reshape)})

class _Trace:
    """While ``on`` (the rewrite's check run only): names of the sites whose entry fired / whose add was rewritten;
    for each stream whose first value had to be marked, the module that returned that tensor object and the
    modules that took it as an input (``starts``: stream id -> (path or None, paths)), from ``returned`` /
    ``received`` (object id -> module path(s)), which :func:`hc_rewrite.structured.record_calls` fills."""

    def __init__(self):
        self.on = False
        self._clear()

    def _clear(self):
        self.fired, self.added, self.starts, self.returned, self.received, self.calls, self.keep = \
            [], [], {}, {}, {}, {}, []

    def __enter__(self):
        self._clear()
        self.on = True
        return self

    def __exit__(self, *exc):
        self.on = False
        self.keep = []


TRACE = _Trace()


class _Record:
    """While ``on`` (:mod:`hc_rewrite.diagnostics`): every site's entry, in call order, with the widened stream it
    read: ``calls`` = ``[(EntryHook, W), ...]``."""

    def __init__(self):
        self.on, self.calls = False, []

    def __enter__(self):
        self.on, self.calls = True, []
        return self

    def __exit__(self, *exc):
        self.on = False


RECORD = _Record()


def plain_outputs(out):
    """What the rewritten root hands the caller: its output with stream values unwrapped to plain tensors."""
    return pytree.tree_map_only(StreamValue, _alias, out)


def aliased_inputs(args, kwargs):
    """The caller's tensors, aliased: a stream that starts at an input and has to be marked marks the alias, never
    the caller's own tensor object."""
    return pytree.tree_map_only(torch.Tensor, _alias, (args, kwargs))
