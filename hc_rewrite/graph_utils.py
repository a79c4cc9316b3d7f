"""Small helpers over FX graphs: op classes, shapes, module paths."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

aten = torch.ops.aten

#: Every spelling of a residual add, at ATen level (torch.export) and at torch level (symbolic_trace).
ADD_TARGETS = {
    aten.add.Tensor, aten.add_.Tensor, operator.add, operator.iadd, torch.add, torch.Tensor.add,
    torch.Tensor.add_,
}
ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}

#: Ops that make a branch a "real computation" (a learned or mixing transform, not an elementwise tweak).
COMPUTE_TARGETS = {
    aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.matmul.default,
    aten.linear.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
    aten.convolution.default, aten.conv_transpose1d.default, aten.conv_transpose2d.input,
    aten.scaled_dot_product_attention.default, aten.einsum.default, aten._convolution.default,
    aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding, aten.conv_transpose3d.input,
    torch.matmul, torch.bmm, torch.mm, torch.einsum, torch.nn.functional.linear,
    torch.nn.functional.conv1d, torch.nn.functional.conv2d,
    torch.nn.functional.scaled_dot_product_attention,
}

#: Stream-wise ops that carry a residual stream from one site to the next unchanged in kind.
CAST_TARGETS = {
    aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.clone.default,
    aten.contiguous.default, aten.alias.default,
}
LAYER_NORM_TARGETS = {aten.layer_norm.default, torch.nn.functional.layer_norm}
RELU_TARGETS = {aten.relu.default, aten.relu_.default, torch.relu, torch.nn.functional.relu}
VIEW_TARGETS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
CONV_TARGETS = {
    aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
    aten._convolution.default, torch.nn.functional.conv1d, torch.nn.functional.conv2d,
    # string padding ("same" / "valid", EfficientNet style) is another overload
    aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding, torch.nn.functional.conv3d,
    aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input,
}
#: Ops that mix values over positions, every channel alike: computation, not an elementwise tweak (PoolFormer's
#: token mixer ``pool(x) - x``)
POOL_TARGETS = {
    aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default, aten.max_pool1d.default,
    aten.max_pool2d.default, aten.max_pool3d.default, aten.adaptive_avg_pool1d.default,
    aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool3d.default, torch.nn.functional.avg_pool2d,
    torch.nn.functional.max_pool2d, torch.nn.functional.adaptive_avg_pool2d,
}


def val(node: fx.Node):
    """The example value (FakeTensor) of a node, from torch.export or ShapeProp metadata."""
    v = node.meta.get("val")
    if v is None:
        v = node.meta.get("tensor_meta")
    return v


def carries_data(node: fx.Node) -> bool:
    """False for nodes whose value is a size (``sym_size`` and friends): reading a tensor's shape is not
    reading its values, so such edges do not count as dataflow in the residual analysis."""
    v = val(node)
    return not isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))


def data_inputs(node: fx.Node) -> list:
    """The inputs of ``node`` that carry data (see :func:`carries_data`)."""
    return [i for i in node.all_input_nodes if carries_data(i)]


def data_users(node: fx.Node) -> list:
    """The users of ``node`` that read its data (none if ``node`` itself is a size)."""
    return list(node.users) if carries_data(node) else []


def shape_key(node) -> tuple | None:
    """Hashable shape of a tensor-valued node (symbolic sizes compared by name), else None."""
    if not isinstance(node, fx.Node):
        return None
    v = val(node)
    shape = getattr(v, "shape", None)
    if shape is None:
        return None
    return tuple(str(d) for d in shape)


def hint(size) -> int:
    """The example's value of a (possibly symbolic) size."""
    if isinstance(size, int):
        return size
    node = getattr(size, "node", None)
    value = getattr(node, "hint", None)
    if value is None:
        from torch.fx.experimental.symbolic_shapes import hint_int

        return hint_int(size)
    return int(value)


def same_shape(a, b) -> bool:
    """Whether two tensor-valued nodes have the same shape. Symbolic sizes that differ in spelling
    (``(s1//4)*(s2//4)`` and a longer expression of the same value) are equal when their example values are:
    this is only asked of the operands of an add, and an add of two different sizes that are not 1 fails, so
    equal example values cannot turn into a broadcast at other shapes without the original model failing too."""
    va, vb = (val(x) if isinstance(x, fx.Node) else None for x in (a, b))
    sa, sb = getattr(va, "shape", None), getattr(vb, "shape", None)
    if sa is None or sb is None or len(sa) != len(sb):
        return False
    return all(str(x) == str(y) or hint(x) == hint(y) for x, y in zip(sa, sb))


def is_float_tensor(node) -> bool:
    v = val(node) if isinstance(node, fx.Node) else None
    dt = getattr(v, "dtype", None)
    return dt is not None and dt.is_floating_point


def width(node: fx.Node, feature_dim: int = -1) -> int:
    """Static size of the feature dim of a node (the last dim, or dim 1 for channel-first conv streams)."""
    return int(val(node).shape[feature_dim])


def is_conv(node: fx.Node, gm: fx.GraphModule | None = None) -> bool:
    if node.op == "call_function":
        return node.target in CONV_TARGETS
    if node.op == "call_module" and gm is not None:
        return isinstance(gm.get_submodule(node.target), torch.nn.modules.conv._ConvNd)
    return False


def is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in ADD_TARGETS
    return node.op == "call_method" and node.target in ADD_METHODS


def add_alpha(node: fx.Node):
    """The ``alpha`` of ``add(a, b, alpha=...)`` (1 when absent)."""
    if len(node.args) > 2:
        return node.args[2]
    return node.kwargs.get("alpha", 1)


def is_compute(node: fx.Node, gm: fx.GraphModule | None = None) -> bool:
    if node.op == "call_function":
        return node.target in COMPUTE_TARGETS or node.target in POOL_TARGETS
    if node.op == "call_module" and gm is not None:
        mod = gm.get_submodule(node.target)
        if isinstance(mod, (torch.nn.modules.pooling._AvgPoolNd, torch.nn.modules.pooling._MaxPoolNd,
                            torch.nn.modules.pooling._AdaptiveAvgPoolNd)):
            return True
        return any(True for _ in mod.parameters(recurse=True))
    return node.op == "call_method" and node.target in {"matmul", "mm", "bmm"}


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost original nn.Module a node was traced in ('' for the root)."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return _clean_path(path)
    if node.op == "call_module":
        return str(node.target)
    return ""


def _clean_path(path: str) -> str:
    # torch.export writes paths like "L__self__.transformer.h.0" or "transformer.h.0"; keep the latter form.
    for prefix in ("L['self'].", "L__self__."):
        if path.startswith(prefix):
            path = path[len(prefix):]
    return path.replace("getattr(", "").replace(")", "")


def topo_index(graph: fx.Graph) -> dict:
    return {node: i for i, node in enumerate(graph.nodes)}
