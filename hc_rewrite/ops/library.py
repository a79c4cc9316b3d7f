"""The stream ops as ``torch.ops.hc_rewrite.*`` operators.

Each op is registered ``CompositeImplicitAutograd`` with its reference implementation
(:mod:`hc_rewrite.ops.reference`): eager runs and differentiates the reference, ``torch.export`` and
the ONNX exporter decompose it into standard ATen ops, and ``torch.compile`` graphs keep it as one node
that the ``hc_rewrite`` backend can lower to a fused kernel.
"""
from __future__ import annotations

import torch

from . import reference as ref

lib = torch.library.Library("hc_rewrite", "DEF")

_SCHEMAS = {
    "expand_stream": "expand_stream(Tensor x, int n, float spread=0.0) -> Tensor",
    "reduce_stream": "reduce_stream(Tensor w) -> Tensor",
    "split_fractions": "split_fractions(Tensor x, int m) -> Tensor",
    "merge_fractions": "merge_fractions(Tensor w) -> Tensor",
    "mhc_coeffs": (
        "mhc_coeffs(Tensor w, Tensor? phi, Tensor? alpha, Tensor b_pre, Tensor b_post, Tensor? b_res, "
        "float eps, int iters) -> (Tensor, Tensor, Tensor)"
    ),
    "hc_coeffs": (
        "hc_coeffs(Tensor w, Tensor a_m, Tensor a_r, Tensor b, Tensor? w_m, Tensor? w_r, Tensor? w_b) "
        "-> (Tensor, Tensor, Tensor)"
    ),
    "frac_coeffs": (
        "frac_coeffs(Tensor w, Tensor y, Tensor a, Tensor b, Tensor? w_y, Tensor? w_a, Tensor? w_b) "
        "-> (Tensor, Tensor, Tensor)"
    ),
    "stream_pre": "stream_pre(Tensor w, Tensor h_pre) -> Tensor",
    "frac_pre": "frac_pre(Tensor w, Tensor y) -> Tensor",
    "stream_post": "stream_post(Tensor w, Tensor y, Tensor h_post, Tensor? h_res) -> Tensor",
    "stream_layer_norm": (
        "stream_layer_norm(Tensor w, Tensor? weight, Tensor? bias, float eps, bool frac) -> Tensor"
    ),
    "stream_relu": "stream_relu(Tensor w, bool frac) -> Tensor",
}


def _mhc_coeffs(w, phi, alpha, b_pre, b_post, b_res, eps, iters):
    h_pre, h_post, h_res = ref.mhc_coeffs(w, phi, alpha, b_pre, b_post, b_res, eps, iters)
    if h_res is None:  # schema outputs are tensors; an empty one stands for "no mixing"
        h_res = h_post.new_empty(0)
    return h_pre, h_post, h_res


_IMPLS = {
    "expand_stream": ref.expand_stream,
    "reduce_stream": ref.reduce_stream,
    "split_fractions": lambda x, m: ref.split_fractions(x, m).clone(),
    "merge_fractions": lambda w: ref.merge_fractions(w).clone(),
    "mhc_coeffs": _mhc_coeffs,
    "hc_coeffs": ref.hc_coeffs,
    "frac_coeffs": ref.frac_coeffs,
    "stream_pre": ref.stream_pre,
    "frac_pre": ref.frac_pre,
    "stream_post": ref.stream_post,
    "stream_layer_norm": ref.stream_layer_norm,
    "stream_relu": ref.stream_relu,
}

for _name, _schema in _SCHEMAS.items():
    lib.define(_schema)
    lib.impl(_name, _IMPLS[_name], "CompositeImplicitAutograd")

ops = torch.ops.hc_rewrite
