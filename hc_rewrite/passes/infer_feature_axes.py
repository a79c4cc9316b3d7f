"""Infer each residual site's feature axis from what its branch does to the stream.

Before: sites found by :func:`~hc_rewrite.passes.find_residual_sites`, layout unknown::

    x:[B, T, C] -> transpose(1, 2) -> conv1d(...)            # wav2vec2's positional conv: a token stream
    x:[B, C, H, W] -> view(B, C, H*W) -> transpose -> linear  # attention block of a U-Net: channels first
    x:[B, C, H, W] -> conv2d(groups=C) -> permute -> layer_norm(C) -> linear   # ConvNeXt: channels first

After: every site has ``channel_first`` set (``[B, C, ...]``, feature axis 1) or not (feature axis last); a site
whose axis cannot be told gets ``reason`` set. The graph is unchanged.

The axis is the one the branch *contracts* or *normalises* first. Each dimension of the skip is followed forward
through the branch: layout ops (permute / transpose / view / reshape / unsqueeze / slicing / broadcasting
elementwise ops, depthwise convolutions and pooling, which act on every channel alike) move or merge the
dimensions; the first op that mixes values across one of them casts a vote:

* ``linear`` / ``mm`` / ``matmul`` / ``bmm`` / attention: the contracted dimension (last of the left operand,
  second-to-last of the right one; the last of a query / key);
* a (non-depthwise) convolution, ``group_norm``, ``batch_norm``, ``instance_norm``: the channel dimension (1);
* a single-dimension ``mean`` / ``var`` (RMSNorm's mean of squares; also token pooling): that dimension;
* normalisation ops name the axis they normalise: ``layer_norm`` / ``rms_norm`` over one dimension, and ``group_norm`` /
  ``batch_norm`` / ``instance_norm`` (dimension 1).

Contractions stop the walk (what comes after no longer carries the skip's dimensions); norms do not. The axis
the branch normalises wins when there is one (MLP-Mixer's token mixing normalises over C, then contracts the
tokens); otherwise every first contraction must name the same axis. A site is channels-last when that axis is
the last one, channels-first when it is dimension 1 of a rank >= 3 stream. When no op of the branch is one
the walk reads, the last dim (dim 1 with a convolution in the branch) is taken if its size is static (a
dynamic capture leaves batch, sequence and image sizes symbolic). No vote and no static guess, votes for several
dimensions, any other dimension, or a feature axis whose size depends on the input (a sequence length) is
refused with the reason. Dimensions that no op ever mixes (batch, and positions outside attention) cast no vote;
the width of the connection is the size of the voted axis.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..graph_utils import CONV_TARGETS, LAYER_NORM_TARGETS, POOL_TARGETS, hint, is_conv, val
from ..sites import Site

aten = torch.ops.aten

_MM_LIKE = {  # target -> (position of the left operand, position of the right operand)
    aten.mm.default: (0, 1), aten.bmm.default: (0, 1), aten.matmul.default: (0, 1),
    aten.addmm.default: (1, 2), aten.baddbmm.default: (1, 2), aten.addbmm.default: (1, 2),
    torch.matmul: (0, 1), torch.bmm: (0, 1), torch.mm: (0, 1), operator.matmul: (0, 1),
}
_LINEAR = {aten.linear.default, torch.nn.functional.linear}
_EINSUM = {aten.einsum.default, torch.einsum}
_RMS_NORMS = {aten.rms_norm.default, getattr(torch.nn.functional, "rms_norm", None)} - {None}
_SDPA = {aten.scaled_dot_product_attention.default, torch.nn.functional.scaled_dot_product_attention}
_CHANNEL_NORMS = {
    aten.group_norm.default, aten.native_group_norm.default, aten.batch_norm.default,
    aten._native_batch_norm_legit_no_training.default, aten._native_batch_norm_legit.default,
    aten.native_batch_norm.default, aten.instance_norm.default, aten.cudnn_batch_norm.default,
    torch.nn.functional.group_norm, torch.nn.functional.batch_norm, torch.nn.functional.instance_norm,
}
_REDUCTIONS = {
    aten.mean.dim, aten.sum.dim_IntList, aten.var.correction, aten.var.dim, aten.std.correction, aten.std.dim,
    aten.amax.default, aten.amin.default, aten.softmax.int, aten._softmax.default, aten.log_softmax.int,
}
#: single-dimension reductions that vote like contractions (RMSNorm's mean of squares, token pooling)
_NORM_REDUCTIONS = {aten.mean.dim, aten.var.correction, aten.var.dim, aten.std.correction, aten.std.dim}
_POOLS = POOL_TARGETS | {aten.max_pool2d_with_indices.default, aten.upsample_nearest2d.vec,
                         aten.upsample_bilinear2d.vec}
_PERMUTE = {aten.permute.default}
_TRANSPOSE = {aten.transpose.int, aten.swapaxes.default, aten.swapdims.default}
_VIEW = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
         aten.unflatten.int}
_UNSQUEEZE = {aten.unsqueeze.default}
_SQUEEZE = {aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default}
_SELECT = {aten.select.int}
#: ops that keep every dimension where it is (the output is the same shape or the same rank, sliced / padded /
#: rolled along some dimensions): elementwise math, casts, slicing, padding, concatenation
_SAME_RANK = {
    aten.slice.Tensor, aten.narrow.default, aten.pad.default, aten.constant_pad_nd.default, aten.roll.default,
    aten.expand.default, aten.repeat.default, aten.flip.default, aten.index_select.default,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self, aten.where.ScalarOther,
    aten.where.ScalarSelf, aten.clamp.default, aten.contiguous.default, aten.clone.default, aten.alias.default,
    aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.type_as.default,
    aten.dropout.default, aten.native_dropout.default, aten.detach.default, aten.lift_fresh_copy.default,
}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.tensor_split.sections}
_ELEMENTWISE_PACKAGES = ("add", "sub", "mul", "div", "neg", "pow", "rsqrt", "sqrt", "exp", "log", "tanh",
                         "sigmoid", "relu", "gelu", "silu", "hardswish", "hardsigmoid", "hardtanh", "leaky_relu",
                         "elu", "mish", "softplus", "abs", "sign", "erf", "sin", "cos", "reciprocal", "square",
                         "clamp_min", "clamp_max", "maximum", "minimum", "relu6", "logical_not",
                         "bitwise_not", "eq", "ne", "lt", "le", "gt", "ge", "floor", "ceil", "round")


def _is_elementwise(target) -> bool:
    if not isinstance(target, torch._ops.OpOverload):
        return target in (operator.add, operator.sub, operator.mul, operator.truediv, operator.neg)
    name = target._schema.name.split("::")[-1].rstrip("_")
    return name in _ELEMENTWISE_PACKAGES


def _rank(node) -> int | None:
    v = val(node) if isinstance(node, fx.Node) else None
    shape = getattr(v, "shape", None)
    return None if shape is None else len(shape)


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _view_map(src_shape, dst_shape, dims: list) -> list:
    """How ``view(src -> dst)`` moves dimensions: groups of source dims whose sizes multiply to a group of
    destination dims (compared at the example's sizes) map onto each other; each destination dim gets the union
    of its group's stream dims."""
    src = [hint(s) for s in src_shape]
    dst = [hint(s) for s in dst_shape]
    out = [frozenset() for _ in dst]
    i = j = 0
    while i < len(src) or j < len(dst):
        gi, gj = [i] if i < len(src) else [], [j] if j < len(dst) else []
        if not gi:  # trailing size-1 dims of the destination
            j += 1
            continue
        if not gj:
            i += 1
            continue
        pi, pj = src[i], dst[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(src):
                pi *= src[i]
                gi.append(i)
                i += 1
            elif j < len(dst):
                pj *= dst[j]
                gj.append(j)
                j += 1
            else:
                break
        merged = frozenset().union(*(dims[k] for k in gi))
        for k in gj:
            out[k] = merged
    return out


def _broadcast(node: fx.Node, state: dict) -> list | None:
    """Dims of an elementwise op's output: the union of its tensor inputs' dims, right-aligned."""
    rank = _rank(node)
    if rank is None:
        return None
    out = [frozenset() for _ in range(rank)]
    for a in node.all_input_nodes:
        dims = state.get(a)
        if dims is None:
            continue
        off = rank - len(dims)
        for k, d in enumerate(dims):
            if 0 <= k + off < rank:
                out[k + off] = out[k + off] | d
    return out


class _Walk:
    """Forward walk of the skip's dimensions through the branch region, collecting votes."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.votes: set = set()  # dims the branch contracts first
        self.norms: set = set()  # dims the branch normalises over

    def vote(self, dims: frozenset, norm: bool = False) -> None:
        if len(dims) == 1:  # a contraction over several merged stream dims says nothing about one of them
            (self.norms if norm else self.votes).add(next(iter(dims)))

    def step(self, node: fx.Node, state: dict) -> list | None:
        """The stream dims carried by ``node``'s output (None: the walk stops here)."""
        args = node.args
        if node.op == "call_module":
            return self._module(node, state)
        if node.op == "call_method":
            return self._method(node, state)
        if node.op != "call_function":
            return None
        t = node.target
        first = args[0] if args and isinstance(args[0], fx.Node) else None
        if t is aten.cat.default:
            return _broadcast(node, state)
        dims = state.get(first) if first is not None else None
        if t in _LINEAR:
            if dims is not None:
                self.vote(dims[-1])
            return None
        if t in _MM_LIKE:
            left, right = _MM_LIKE[t]
            for pos, axis in ((left, -1), (right, -2)):
                operand = state.get(args[pos]) if len(args) > pos and isinstance(args[pos], fx.Node) else None
                if operand:
                    self.vote(operand[axis] if len(operand) >= 2 else operand[-1])
            return None
        if t in _SDPA:
            for pos in (0, 1):
                if len(args) > pos and args[pos] in state:
                    self.vote(state[args[pos]][-1])
            return None
        if t in CONV_TARGETS:
            if dims is None:
                return None
            weight = val(args[1]) if len(args) > 1 and isinstance(args[1], fx.Node) else None
            groups = _conv_groups(node)
            channels = hint(val(first).shape[1])
            if weight is not None and groups == channels and hint(weight.shape[0]) == channels:
                return list(dims)  # depthwise: mixes positions, every channel alike
            self.vote(dims[1])
            return None
        if dims is None:
            return _broadcast(node, state) if _is_elementwise(t) else None
        if t in _EINSUM:
            self._einsum(node, state)
            return None
        if t in LAYER_NORM_TARGETS or t in _RMS_NORMS:
            normalized = args[1] if len(args) > 1 else node.kwargs.get("normalized_shape")
            if normalized is not None and len(normalized) == 1:
                self.vote(dims[-1], norm=True)
            return list(dims)
        if t in _CHANNEL_NORMS:
            self.vote(dims[1], norm=True)
            return list(dims)
        if t in _REDUCTIONS:
            reduced = args[1] if len(args) > 1 else node.kwargs.get("dim")
            if isinstance(reduced, int):
                reduced = [reduced]
            if t in _NORM_REDUCTIONS and reduced is not None and len(reduced) == 1:
                # a contraction, not a norm: the same op pools tokens (x + f(x.mean(1))) and starts RMSNorm
                self.vote(dims[_dim(reduced[0], len(dims))])
            keep = t in (aten.softmax.int, aten._softmax.default, aten.log_softmax.int) or (
                len(args) > 2 and args[2] is True) or node.kwargs.get("keepdim")
            return list(dims) if keep else None
        if t in _POOLS:
            return list(dims)
        if t in _PERMUTE:
            return [dims[_dim(p, len(dims))] for p in args[1]]
        if t in _TRANSPOSE:
            a, b = _dim(args[1], len(dims)), _dim(args[2], len(dims))
            out = list(dims)
            out[a], out[b] = out[b], out[a]
            return out
        if t in _VIEW:
            return _view_map(val(first).shape, val(node).shape, dims)
        if t in _UNSQUEEZE:
            out = list(dims)
            out.insert(_dim(args[1], len(dims) + 1), frozenset())
            return out
        if t in _SQUEEZE:
            shape = val(node).shape
            return _view_map(val(first).shape, shape, dims)
        if t in _SELECT:
            out = list(dims)
            del out[_dim(args[1], len(dims))]
            return out
        if t in _SPLITS or t is operator.getitem:
            return list(dims)  # the pieces of a split keep the dims of the whole
        if t in _SAME_RANK or _is_elementwise(t):
            return _broadcast(node, state)
        return None

    def _einsum(self, node: fx.Node, state: dict) -> None:
        """``einsum(eq, operands)``: each stream-derived operand votes for its letters that the output drops."""
        eq, operands = node.args[0], node.args[1]
        if "..." in eq or "->" not in eq:
            return
        ins, out = eq.replace(" ", "").split("->")
        for letters, x in zip(ins.split(","), operands):
            dims = state.get(x) if isinstance(x, fx.Node) else None
            if dims is None or len(letters) != len(dims):
                continue
            for k, letter in enumerate(letters):
                if letter not in out:
                    self.vote(dims[k])

    def _module(self, node: fx.Node, state: dict):
        """symbolic_trace graphs: modules called by name."""
        mod = self.gm.get_submodule(node.target)
        x = node.args[0] if node.args else None
        dims = state.get(x)
        if dims is None:
            return None
        nn = torch.nn
        if isinstance(mod, nn.Linear):
            self.vote(dims[-1])
            return None
        if isinstance(mod, nn.modules.conv._ConvNd):
            if mod.groups == mod.in_channels == mod.out_channels:
                return list(dims)
            self.vote(dims[1])
            return None
        if isinstance(mod, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
            if len(mod.normalized_shape) == 1:
                self.vote(dims[-1], norm=True)
            return list(dims)
        if isinstance(mod, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
            self.vote(dims[1], norm=True)
            return list(dims)
        if isinstance(mod, (nn.Dropout, nn.Identity, nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
                            nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd)):
            return list(dims)
        return None

    def _method(self, node: fx.Node, state: dict):
        x = node.args[0] if node.args else None
        dims = state.get(x)
        if dims is None:
            return None
        name = node.target
        if name in ("permute",):
            perm = node.args[1] if isinstance(node.args[1], (tuple, list)) else node.args[1:]
            return [dims[_dim(p, len(dims))] for p in perm]
        if name in ("transpose",):
            a, b = _dim(node.args[1], len(dims)), _dim(node.args[2], len(dims))
            out = list(dims)
            out[a], out[b] = out[b], out[a]
            return out
        if name in ("view", "reshape", "flatten"):
            return _view_map(val(x).shape, val(node).shape, dims)
        if name in ("contiguous", "clone", "float", "to", "type_as", "relu", "sigmoid", "tanh"):
            return list(dims)
        if name in ("matmul",):
            self.vote(dims[-1])
            return None
        if name in ("mean", "sum", "var", "std", "softmax"):
            d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if isinstance(d, int) and name in ("mean", "var", "std"):
                self.vote(dims[_dim(d, len(dims))])
            return list(dims) if name == "softmax" or node.kwargs.get("keepdim") else None
        return _broadcast(node, state) if name in ("add", "sub", "mul", "div", "pow") else None


def _conv_groups(node: fx.Node) -> int:
    """``groups`` of a convolution node, whatever its overload."""
    if node.target in (aten.convolution.default, aten._convolution.default):
        return node.args[8] if len(node.args) > 8 else 1
    if "groups" in node.kwargs:
        return node.kwargs["groups"]
    return node.args[6] if len(node.args) > 6 else 1


def feature_axis_votes(site: Site, gm: fx.GraphModule, order: dict | None = None) -> tuple[set, set]:
    """``(normalised, contracted)``: the stream dims (indices into the skip's shape) that the branches of
    ``site`` normalise over, and those they contract first. ``order``: graph positions (computed if absent)."""
    order = order or {n: i for i, n in enumerate(gm.graph.nodes)}
    rank = _rank(site.skip)
    walk = _Walk(gm)
    state = {site.skip: [frozenset({d}) for d in range(rank)]}
    for node in sorted(site.region, key=order.__getitem__):  # graph order is a topological order
        if node in state:
            continue
        if not any(i in state for i in node.all_input_nodes):
            continue
        try:
            dims = walk.step(node, state)
        except (TypeError, IndexError, ValueError, AttributeError):
            dims = None  # an op spelled in a way the walk does not read: it carries nothing on
        if dims is not None and (len(dims) == (_rank(node) or 0) or isinstance(val(node), (list, tuple))):
            state[node] = dims
    return walk.norms, walk.votes


def infer_feature_axes(gm: fx.GraphModule, sites: list[Site]) -> list[Site]:
    """Set ``channel_first`` on every site, or ``reason`` where its feature axis cannot be told (see module
    docstring). Sites already refused are left alone. Returns ``sites``."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for site in sites:
        if site.reason:
            continue
        rank = _rank(site.skip)
        norms, contracted = feature_axis_votes(site, gm, order)
        # a norm names the feature axis even when the branch then contracts another one (MLP-Mixer's token
        # mixing: LayerNorm over C, then Linear layers over the tokens)
        votes = norms if len(norms) == 1 else norms | contracted
        if not votes:  # no op the walk reads: the one static dim among the last and (with a conv) the second
            votes = _static_guess(site, gm, rank)
        if not votes:
            site.reason = ("cannot tell the stream's feature axis: no op of the branch contracts or normalises "
                           "one dimension of the skip " + _shape(site.skip) + " and its size does not tell")
            continue
        if len(votes) > 1:
            names = ", ".join(str(d) for d in sorted(votes))
            site.reason = (f"ambiguous feature axis: the branch contracts or normalises dimensions {names} of the "
                           f"skip {_shape(site.skip)}")
            continue
        axis = votes.pop()
        if axis == rank - 1:
            site.channel_first = False
        elif axis == 1 and rank >= 3:
            site.channel_first = True
        else:
            site.reason = (f"the branch contracts dimension {axis} of the skip {_shape(site.skip)}: only a last "
                           "(channels-last) or second (channels-first) feature axis can be widened")
            continue
        size = val(site.skip).shape[axis]
        if not isinstance(size, int) and not _is_static(size):
            site.reason = (f"the feature axis (dimension {axis}) of the skip {_shape(site.skip)} has a size that "
                           "depends on the input: it is a sequence or image dimension, not a hidden size")
    return sites


def _static_guess(site: Site, gm: fx.GraphModule, rank: int) -> set:
    """Where the walk found no vote (an op it does not read comes first): the last dim, or dim 1 when the branch
    holds a convolution, provided its size is static (under a dynamic capture, batch, sequence and image dims
    are symbolic and hidden sizes are not). Empty when that dim is input-sized."""
    conv = rank >= 3 and any(is_conv(n, gm) for n in site.region)
    axis = 1 if conv else rank - 1
    size = val(site.skip).shape[axis]
    return {axis} if isinstance(size, int) or _is_static(size) else set()


def _is_static(size) -> bool:
    try:
        return len(size.node.expr.free_symbols) == 0
    except AttributeError:
        return True


def _shape(node: fx.Node) -> str:
    return "[" + ", ".join(str(d) for d in val(node).shape) + "]"
