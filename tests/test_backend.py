"""The ``hc_rewrite`` torch.compile backend (hc_rewrite.backend). Its lowering passes have their own tests
(tests/passes/test_fuse_stream_ops.py, tests/passes/test_lower_stream_ops.py, tests/passes/test_pipeline.py).

Compile tests run Inductor's C++ backend on CPU: a machine without a usable C++ compiler fails them (they must
compile something to prove anything). They are few and small (Inductor on a busy 2-core machine is slow): a toy
net (hc), gpt2 (mhc, dynamic shapes) and llama (frac), each compared with eager for outputs and gradients.
"""
from __future__ import annotations

import importlib
import shutil

import pytest
import torch
from torch import nn

import hc_rewrite
import hc_rewrite.backend as hcb
from hc_rewrite import variants
from hc_rewrite.errors import BackendError
from hc_rewrite.passes.lower_stream_ops import stream_op_nodes

RTOL = 1e-4


# ----------------------------------------------------------------------------- helpers
class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class Toy(nn.Module):
    def __init__(self, d=32, layers=2):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _toy(variant="hc", n=2):
    torch.manual_seed(0)
    net = Toy().eval()
    x = torch.randn(2, 8, 32)
    return net, x, hc_rewrite.rewrite(net, (x,), variant=variant, n=n, form="graph")


def _perturb(model, seed=0):
    """Move the connection parameters off their init, so every one of them gets a real gradient."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.hc.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def _loss(out):
    if not isinstance(out, torch.Tensor):
        out = out["logits"] if "logits" in out else out[0]
    return out, out.float().square().mean()


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_against_eager(model, compiled, args, kwargs):
    """Forward + backward with ``compiled`` and with ``model`` (same parameters); outputs and grads agree."""
    model.zero_grad(set_to_none=True)
    out_c, loss_c = _loss(compiled(*args, **kwargs))
    loss_c.backward()
    grads_c = _grads(model)
    model.zero_grad(set_to_none=True)
    out_e, loss_e = _loss(model(*args, **kwargs))
    loss_e.backward()
    grads_e = _grads(model)
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(out_c, out_e, rtol=RTOL, atol=RTOL * out_e.abs().max().item())
    assert set(grads_c) == set(grads_e) and any(n.startswith("hc.") for n in grads_e)
    scale = max(g.abs().max().item() for g in grads_e.values())
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_c[name], g, rtol=RTOL, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")


def _backend_error(excinfo_value) -> BackendError | None:
    """The BackendError inside what Dynamo raised (it wraps backend errors in BackendCompilerFailed)."""
    seen, e = set(), excinfo_value
    while e is not None and id(e) not in seen:
        if isinstance(e, BackendError):
            return e
        seen.add(id(e))
        e = getattr(e, "inner_exception", None) or e.__cause__ or e.__context__
    return None


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def inductor_cpu():
    """Inductor's CPU backend needs a C++ compiler: without one these tests fail (with this message), they do
    not skip. A toolchain error inside a compile fails the test the same way."""
    from torch._inductor import config

    cxx = config.cpp.cxx[-1] if isinstance(config.cpp.cxx, tuple) else config.cpp.cxx
    if cxx and shutil.which(cxx) is None:
        pytest.fail(f"no C++ compiler ({cxx}) for Inductor's CPU backend: install one (e.g. g++) to run the "
                    "compile tests")


# ----------------------------------------------------------------------------- registration, errors
def test_backend_name_resolves():
    from importlib.metadata import entry_points

    eps = entry_points(group="torch_dynamo_backends")
    assert "hc_rewrite" in eps.names, "entry point missing: is the package installed (pip install -e .)?"
    assert eps["hc_rewrite"].value == "hc_rewrite.backend:hc_rewrite_backend"
    assert torch._dynamo.lookup_backend("hc_rewrite") is hcb.hc_rewrite_backend
    assert "hc_rewrite" in torch._dynamo.list_backends()
    assert hcb.register() is False  # already known: registering again is a no-op, not an error
    importlib.reload(hcb)  # a second import does not raise "duplicate name"
    assert callable(torch._dynamo.lookup_backend("hc_rewrite"))


def test_backend_through_entry_point_only():
    """A fresh registry that knows the name only from the entry point loads it without a duplicate error."""
    from torch._dynamo.backends import registry

    saved_fns, saved_backends = dict(registry._COMPILER_FNS), dict(registry._BACKENDS)
    try:
        registry._COMPILER_FNS.pop("hc_rewrite", None)
        registry._BACKENDS.pop("hc_rewrite", None)
        if hasattr(registry._discover_entrypoint_backends, "cache_clear"):
            registry._discover_entrypoint_backends.cache_clear()
        registry._discover_entrypoint_backends()
        assert registry._BACKENDS.get("hc_rewrite") is not None
        assert hcb.register() is False  # defers to the entry point
        assert registry.lookup_backend("hc_rewrite") is hcb.hc_rewrite_backend
    finally:
        registry._COMPILER_FNS.clear(), registry._COMPILER_FNS.update(saved_fns)
        registry._BACKENDS.clear(), registry._BACKENDS.update(saved_backends)


def test_plain_model_raises_backend_error_naming_the_fix():
    torch.manual_seed(0)
    net = Toy().eval()
    with pytest.raises(Exception) as excinfo:
        torch.compile(net, backend="hc_rewrite")(torch.randn(2, 8, 32))
    err = _backend_error(excinfo.value)
    assert err is not None, f"expected a BackendError, got {type(excinfo.value).__name__}: {excinfo.value}"
    for text in ("hc_rewrite.rewrite(model, example_inputs", 'torch.compile(model, backend="hc_rewrite")'):
        assert text in str(err) and text in str(excinfo.value)
    with pytest.raises(BackendError, match=r"hc_rewrite\.rewrite\(model, example_inputs"):
        hcb.compile(net)  # the helper checks up front


def test_unknown_option_is_an_error():
    _, x, model = _toy()
    with pytest.raises(Exception) as excinfo:
        torch.compile(model, backend="hc_rewrite", options={"no_such_option": 1})(x)
    err = _backend_error(excinfo.value)
    assert err is not None and "no_such_option" in str(err)


def test_cpu_graph_gets_no_kernels_and_the_fusible_forms():
    """On CPU no kernel goes in: the graph handed on calls the reference stream ops, except those with a fusible
    form (hc_rewrite.ops.fusible), which it calls instead; ``decompose=False`` keeps them all."""
    from hc_rewrite.ops import fusible

    _, x, model = _toy("mhc", n=4)
    for decompose in (True, False):
        seen = []

        def recording(gm, example_inputs, **kw):
            compiled = hcb.hc_rewrite_backend(gm, example_inputs,
                                              options={"compiler": "eager", "decompose": decompose})
            seen.append(({str(n.target) for n in stream_op_nodes(gm)},
                         {n.target for n in gm.graph.nodes if n.op == "call_function"}))
            return compiled

        torch._dynamo.reset()
        compiled = torch.compile(model, backend=recording, fullgraph=True)
        torch.testing.assert_close(compiled(x), model(x))
        assert len(seen) == 1
        ops, targets = seen[0]
        assert {"hc_rewrite.stream_pre.default", "hc_rewrite.expand_stream.default"} <= ops  # no fusible form
        assert not any(str(t).startswith("hc_fused") for t in targets)
        for name in ("mhc_coeffs", "stream_post"):
            assert (f"hc_rewrite.{name}.default" in ops) == (not decompose)
            assert (fusible.FUSIBLE[name] in targets) == decompose
    torch._dynamo.reset()


@pytest.mark.parametrize("variant", variants.NAMES)
def test_fused_lowering_traces_through_aot_autograd(variant):
    """``fuse="all"`` lowers on CPU too (the fused ops fall back to the reference math there): the
    hc_fused ops must trace under AOTAutograd (fake tensors, joint graph) and give eager's gradients."""
    pytest.importorskip("triton")
    from hc_rewrite.kernels import fused_ops

    assert fused_ops(), "triton is installed, so hc_rewrite.kernels must provide fused ops"
    _, x, model = _toy(variant, n=2 if variant == "hc" else 4)
    _perturb(model)
    seen = []

    def recording(gm, example_inputs, **kw):
        compiled = hcb.hc_rewrite_backend(gm, example_inputs, options={"fuse": "all", "compiler": "aot_eager"})
        seen.append({str(n.target).split(".")[0] for n in gm.graph.nodes if n.op == "call_function"})
        return compiled

    _check_against_eager(model, torch.compile(model, backend=recording, fullgraph=True), (x,), {})
    assert len(seen) == 1 and "hc_fused" in seen[0]


def test_bad_options():
    _, x, model = _toy()
    for options, text in (({"compiler": "tvm"}, "compiler"), ({"fuse": "sometimes"}, "fuse"),
                          ({"compiler": "eager", "max_autotune": True}, "max_autotune")):
        torch._dynamo.reset()
        with pytest.raises(Exception) as excinfo:
            torch.compile(model, backend="hc_rewrite", options=options)(x)
        err = _backend_error(excinfo.value)
        assert err is not None and text in str(err), options


# ----------------------------------------------------------------------------- Inductor on CPU
def test_toy_compiled_matches_eager(inductor_cpu):
    _, x, model = _toy("hc", n=2)
    _perturb(model)
    compiled = torch.compile(model, backend="hc_rewrite", fullgraph=True, options={"fuse": True})
    _check_against_eager(model, compiled, (x,), {})


@pytest.mark.slow
def test_gpt2_mhc_fullgraph_grads_and_bounded_recompiles(inductor_cpu):
    from hc_rewrite.zoo import ZOO

    entry = ZOO["gpt2"]
    gen = torch.Generator().manual_seed(0)
    _, kwargs = entry.inputs(batch=2, seq=8, generator=gen)
    # sinkhorn_iters=4 (not 20): the graph is 4x smaller and compiles 3x faster; the ops are the same
    model = hc_rewrite.rewrite(entry.build(), (), kwargs, variant="mhc", n=4, sinkhorn_iters=4, form="graph")
    _perturb(model)
    compiles = []

    def counting(gm, example_inputs, **kw):
        compiles.append(gm)
        return hcb.hc_rewrite_backend(gm, example_inputs, **kw)

    compiled = torch.compile(model, backend=counting, fullgraph=True)
    ids = kwargs["input_ids"]
    torch._dynamo.mark_dynamic(ids, 0)
    torch._dynamo.mark_dynamic(ids, 1)
    _check_against_eager(model, compiled, (), {"input_ids": ids})
    # the sweep runs with grad enabled, like the first call (grad mode is guarded on)
    for batch in (2, 3, 5):
        for seq in (5, 8, 13):
            _, kw = entry.inputs(batch=batch, seq=seq, generator=gen)
            got, expected = compiled(**kw).logits, model(**kw).logits
            torch.testing.assert_close(got, expected, rtol=RTOL, atol=RTOL * expected.abs().max().item())
    assert 1 <= len(compiles) <= 2, f"{len(compiles)} compiles for 3 batch sizes x 3 sequence lengths"
    assert stream_op_nodes(compiles[0]), "the backend saw no hc_rewrite op"


@pytest.mark.slow
def test_llama_frac_fullgraph_grads(inductor_cpu):
    from hc_rewrite.zoo import ZOO

    entry = ZOO["llama"]
    _, kwargs = entry.inputs(batch=2, seq=8, generator=torch.Generator().manual_seed(0))
    model = hc_rewrite.rewrite(entry.build(), (), kwargs, variant="frac", n=4, form="graph")
    _perturb(model)
    compiled = torch.compile(model, backend="hc_rewrite", fullgraph=True)
    _check_against_eager(model, compiled, (), kwargs)
