"""decompose_stream_ops: every stream op with a fusible form (hc_rewrite.ops.fusible) is called in that form, the
others stay; outputs and gradients do not change. Compiled on the CPU by Inductor (the CI machine's compiler),
the fusible forms leave no batched matmul (the per-token ``n x n`` products of the reference) in the code, and the
compiled step gives eager's numbers."""
import re
from collections import Counter

import pytest
import torch

import hc_rewrite
import hc_rewrite.backend  # noqa: F401
from hc_rewrite import variants
from hc_rewrite.ops import fusible
from hc_rewrite.passes import decompose_stream_ops


def _graph(variant, make_toy, toys, dynamic=True, n=4, **options):
    model, x, x2 = make_toy(toys.PreNormMLP)
    gm = hc_rewrite.rewrite(model, (x,), variant=variant, n=n, dynamic=dynamic, form="graph", **options)
    with torch.no_grad():  # off the init, so every coefficient matters
        for p in gm.hc.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    return gm, x2


def _targets(gm) -> Counter:
    return Counter(getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes
                   if n.op == "call_function" and (str(n.target).startswith("hc_rewrite.")
                                                    or n.target in fusible.FUSIBLE.values()))


def _step(model, gm, x):
    gm.zero_grad(set_to_none=True)
    out = model(x)
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in gm.parameters()]


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("variant", variants.NAMES)
def test_swaps_the_ops_with_a_fusible_form(variant, dynamic, make_toy, toys):
    v = variants.get(variant)
    gm, x = _graph(variant, make_toy, toys, dynamic)
    before = _targets(gm)
    out0, grads0 = _step(gm, gm, x)

    count = decompose_stream_ops(gm)

    after = _targets(gm)
    swapped = {name.split(".")[0] for name in before} & set(fusible.FUSIBLE)
    assert count == sum(c for name, c in before.items() if name.split(".")[0] in swapped)
    for name, c in before.items():
        op = name.split(".")[0]
        if op in swapped:  # called in its fusible form now, as often as before
            assert name not in after and after[fusible.FUSIBLE[op].__name__] == c
        else:
            assert after[name] == c
    assert {"stream_post", v.coeff_name} <= swapped
    out1, grads1 = _step(gm, gm, x)
    torch.testing.assert_close(out1, out0, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads1, grads0):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert decompose_stream_ops(gm) == 0  # nothing left to swap


@pytest.mark.parametrize("variant", variants.NAMES)
def test_inductor_on_cpu_calls_no_batched_matmul(variant, make_toy, toys):
    """The reason for the pass: compiled with the backend on the CPU, the reference's ``[T, n, n] @ [T, n, C]``
    products are batched matmuls Inductor hands to a library; the fusible forms leave none, and the compiled
    forward and backward give eager's numbers. (Sinkhorn iterations cut to 3: the compile time.)"""
    from torch._inductor.utils import run_and_get_code

    options = {"sinkhorn_iters": 3} if variant == "mhc" else {}
    gm, x = _graph(variant, make_toy, toys, **options)
    out0, grads0 = _step(gm, gm, x)
    calls = {False: Counter({"bmm": 1})}  # the reference (one variant checks it: the compile time)
    for decompose in ((False, True) if variant == "frac" else (True,)):
        torch._dynamo.reset()
        compiled = torch.compile(gm, backend="hc_rewrite", options={"decompose": decompose})
        (out1, grads1), code = run_and_get_code(lambda: _step(compiled, gm, x))
        calls[decompose] = Counter(m for src in code for m in re.findall(r"extern_kernels\.(\w+)\(", src))
        torch.testing.assert_close(out1, out0, atol=1e-5, rtol=1e-5)
        for a, b in zip(grads1, grads0):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()
    assert calls[False]["bmm"] > 0, calls  # the reference: the mixing and its gradient
    assert calls[True]["bmm"] == 0, calls
