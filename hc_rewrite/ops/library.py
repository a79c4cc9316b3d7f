"""The stream ops as ``torch.ops.hc_rewrite.*`` operators.

Each op is registered ``CompositeImplicitAutograd`` with its reference implementation
(:mod:`hc_rewrite.ops.reference`): eager runs and differentiates the reference, ``torch.export`` and
the ONNX exporter decompose it into standard ATen ops, and ``torch.compile`` graphs keep it as one node
that the ``hc_rewrite`` backend can lower to a fused kernel.

Registered here: the ops every variant shares (the post, the stream-wise links) and the copy-stream ops of
mHC and HC (expand, reduce, pre). Each variant registers the ops only it uses (its coefficient op; Frac its
fraction ops) with :func:`define_op` (see :mod:`hc_rewrite.variants`).
"""
from __future__ import annotations

import torch

from . import reference as ref

lib = torch.library.Library("hc_rewrite", "DEF")

ops = torch.ops.hc_rewrite


def define_op(name: str, schema: str, impl) -> None:
    """Register ``torch.ops.hc_rewrite.<name>`` (``CompositeImplicitAutograd``: ``impl`` is its math) once."""
    if hasattr(ops, name):
        return
    lib.define(schema)
    lib.impl(name, impl, "CompositeImplicitAutograd")


_SHARED = {
    "expand_stream": ("expand_stream(Tensor x, int n, float spread=0.0) -> Tensor", ref.expand_stream),
    "reduce_stream": ("reduce_stream(Tensor w) -> Tensor", ref.reduce_stream),
    "stream_pre": ("stream_pre(Tensor w, Tensor h_pre) -> Tensor", ref.stream_pre),
    "stream_post": ("stream_post(Tensor w, Tensor y, Tensor h_post, Tensor? h_res) -> Tensor", ref.stream_post),
    "stream_layer_norm": (
        "stream_layer_norm(Tensor w, Tensor? weight, Tensor? bias, float eps, bool frac) -> Tensor",
        ref.stream_layer_norm,
    ),
    "stream_relu": ("stream_relu(Tensor w, bool frac) -> Tensor", ref.stream_relu),
}

for _name, (_schema, _impl) in _SHARED.items():
    define_op(_name, _schema, _impl)
