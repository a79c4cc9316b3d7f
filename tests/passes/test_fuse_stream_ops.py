"""fuse_stream_ops: each variant's coefficient op + pre op become its ``fused_pre`` op, and (mHC, dynamic) the post
of a site + the next site's fused pre become ``fused_post_pre``; outputs and gradients do not change.

Off CUDA the fused ops compute the reference math, so these tests check the rewiring of the graph (which output of
a fused op feeds which reader); the kernels' own numbers are tests/test_kernels.py's (Triton interpreter)."""
from collections import Counter

import pytest
import torch
import torch.fx as fx

import hc_rewrite
from hc_rewrite import kernels, variants
from hc_rewrite.passes import fuse_stream_ops

SITES = 3  # PreNormMLP's default depth


def _graph(variant, dynamic, make_toy, toys):
    model, x, x2 = make_toy(toys.PreNormMLP)
    gm = hc_rewrite.rewrite(model, (x,), variant=variant, n=4, dynamic=dynamic, form="graph")
    with torch.no_grad():  # off the init, so every coefficient and every output of a fused op matters
        for p in gm.hc.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
    return gm, x2


def _ops(gm) -> Counter:
    return Counter(".".join(str(n.target).split(".")[:2]) for n in gm.graph.nodes
                   if n.op == "call_function" and str(n.target).startswith("hc_"))


def _run(gm, x):
    gm.zero_grad(set_to_none=True)
    out = gm(x)
    out.square().sum().backward()
    return out.detach(), {k: p.grad.clone() for k, p in gm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("variant", variants.NAMES)
def test_fuses_each_site_and_keeps_the_numbers(variant, dynamic, make_toy, toys):
    v = variants.get(variant)
    gm, x = _graph(variant, dynamic, make_toy, toys)
    ref = lambda name: f"hc_rewrite.{name}"  # noqa: E731
    assert _ops(gm) == Counter({ref(v.expand_name): 1, ref(v.coeff_name): SITES, ref(v.pre_name): SITES,
                                ref(v.post_name): SITES, ref(v.reduce_name): 1})
    out0, grads0 = _run(gm, x)
    code = gm.code

    fused = fuse_stream_ops(gm)

    if not kernels.available():  # no hc_fused ops: the graph is left as it is
        assert fused == 0 and gm.code == code
        return
    # mHC's post + next pre needs the dynamic form (phi is not optional in its schema); HC / Frac have none
    post_pre = SITES - 1 if (v.fused_post_pre and dynamic) else 0
    assert fused == SITES + post_pre
    expected = Counter({ref(v.expand_name): 1, f"hc_fused.{v.fused_pre}": SITES - post_pre,
                        ref(v.post_name): SITES - post_pre, ref(v.reduce_name): 1})
    if post_pre:
        expected[f"hc_fused.{v.fused_post_pre}"] = post_pre
    assert _ops(gm) == expected
    gm.graph.lint()
    out1, grads1 = _run(gm, x)
    torch.testing.assert_close(out1, out0, rtol=1e-6, atol=1e-6)
    assert grads1.keys() == grads0.keys() and any(k.startswith("hc.") for k in grads0)
    for k, g in grads0.items():
        torch.testing.assert_close(grads1[k], g, rtol=1e-5, atol=1e-6, msg=k)
    assert fuse_stream_ops(gm) == 0  # nothing left to fuse


def _coeff_pre(w, a_m, a_r, b):
    c = torch.ops.hc_rewrite.hc_coeffs.default(w, a_m, a_r, b, None, None, None)
    h_pre = c[0]
    return torch.ops.hc_rewrite.stream_pre.default(w, h_pre), c[1], h_pre


@pytest.mark.skipif(not kernels.available(), reason="the fusion needs the hc_fused ops (triton)")
def test_h_pre_read_elsewhere_is_not_fused():
    """The fused op reads the stream once for the coefficients and the pre: when ``h_pre`` has another reader
    the chain stays as it is."""
    gm = fx.symbolic_trace(_coeff_pre)
    code = gm.code
    assert fuse_stream_ops(gm) == 0 and gm.code == code

    gm = fx.symbolic_trace(lambda w, a_m, a_r, b: _coeff_pre(w, a_m, a_r, b)[:2])
    assert fuse_stream_ops(gm) == 1
    assert [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "hc_" in str(n.target)] == [
        "hc_fused.hc_pre.default"]
    w, a_m, a_r, b = torch.randn(2, 3, 4, 8), torch.randn(4), torch.randn(4, 4), torch.randn(4)
    want = _coeff_pre(w, a_m, a_r, b)[:2]
    for got, exp in zip(gm(w, a_m, a_r, b), want):
        torch.testing.assert_close(got, exp)
