"""A compiled rewritten model computes the rewritten function, never the original's compiled code.

A rewritten model shares its classes (and so its code objects) with the original; dynamo reuses any compiled frame
whose guards pass and, by default, installs no guard on an empty hook dict. Before the fix, compiling the original
first made the compiled rewritten model return the original's outputs (and train none of its connection
parameters). Every case here compares compiled outputs with the eager ones, with the connection parameters moved
off their init (at init both functions are equal and nothing could be seen).

The mechanism (``structured.pin_forward``) acts at dynamo's guard level, before any backend sees a graph: the whole
matrix (variant x static/dynamic x order x whole model / per block, as a pairwise covering array) runs on
``aot_eager``; Inductor and the ``hc_rewrite`` backend run the cases of the issue (original compiled first, whole
model and per block).
"""
from __future__ import annotations

import copy

import pytest
import torch

import hc_rewrite
from hc_rewrite.zoo import ZOO

from .helpers import assert_pairwise_cover, moved_copy, rel_err

TOL = 1e-5


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return ZOO["llama"].build().eval()


@pytest.fixture(scope="module")
def ids(llama):
    return torch.randint(0, llama.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def rewritten(llama, ids):
    cache = {}

    def get(variant, dynamic=True, n=4):
        key = (variant, dynamic, n)
        if key not in cache:
            cache[key] = hc_rewrite.rewrite(llama, (ids,), variant=variant, n=n, dynamic=dynamic)
        return moved_copy(cache[key], seed=len(cache))

    return get


RUNS = [0]  # calls of compiled graphs: a compiled model that ran none of them proves nothing


_BACKENDS: dict = {}


def counting(backend: str, options=None):
    """``backend`` (a registered name), each compiled graph counting its calls in :data:`RUNS`. One object per
    name and options: dynamo reuses compiled code only under the backend that compiled it, so both models must get
    the same object, as both get the same string in a user's code (a new wrapper per call would hide the bug)."""
    key = (backend, repr(options))
    if key not in _BACKENDS:
        _BACKENDS[key] = _counting(backend, options)
    return _BACKENDS[key]


def _counting(backend: str, options=None):
    inner = torch._dynamo.lookup_backend(backend)

    def compile_fn(gm, example_inputs):
        fn = inner(gm, example_inputs, options=options) if options else inner(gm, example_inputs)

        def run(*args):
            RUNS[0] += 1
            return fn(*args)
        return run

    return compile_fn


def compiled(model, scope, backend, options=None):
    """``torch.compile`` of the whole model, or ``layer.compile()`` on every decoder layer (as torchtitan does)."""
    backend = counting(backend, options)
    if scope == "whole":
        return torch.compile(model, backend=backend)
    for layer in model.model.layers:
        layer.compile(backend=backend)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def check_both(original, new, ids, scope, backend, order, options=None):
    """Compile both models in ``order``; each compiled model gives its own eager output."""
    ref = {"original": logits(original, ids), "rewritten": logits(new, ids)}
    assert rel_err(ref["rewritten"], ref["original"]) > 1e-3  # the moved connections make a difference
    torch._dynamo.reset()
    models = {"original": original, "rewritten": new}
    for name in order:
        before = RUNS[0]
        got = logits(compiled(models[name], scope, backend, options), ids)
        assert RUNS[0] > before, f"{name}: no compiled graph ran"
        assert rel_err(got, ref[name]) <= TOL, f"compiled {name} ({scope}, {backend}, order {order})"


ORDERS = [("original", "rewritten"), ("rewritten", "original")]


#: variant x static/dynamic x scope x order, as a pairwise covering array: every pair of values of any two of the four
#: factors occurs in some case (6 cases instead of the 24 of the full product; the pin acts at dynamo's guard level,
#: whatever the variant, so a failure needs at most two factors to meet). The test below checks the cover.
MATRIX = [
    ("mhc", True, "whole", ORDERS[0]), ("mhc", False, "block", ORDERS[1]),
    ("frac", True, "block", ORDERS[0]), ("frac", False, "whole", ORDERS[1]),
    ("hc", True, "whole", ORDERS[1]), ("hc", False, "block", ORDERS[0]),
]


@pytest.mark.parametrize("variant,dynamic,scope,order", MATRIX, ids=[
    f"{v}-{'dynamic' if d else 'static'}-{s}-{o[0]}-first" for v, d, s, o in MATRIX])
def test_each_compiled_model_computes_its_own_function(llama, ids, rewritten, variant, dynamic, scope, order):
    check_both(copy.deepcopy(llama), rewritten(variant, dynamic), ids, scope, "aot_eager", order)


def test_the_matrix_covers_every_pair_of_factors():
    """The covering array above holds every pair of values of any two factors (what the 6 cases stand for)."""
    assert_pairwise_cover(MATRIX, [("mhc", "frac", "hc"), (True, False), ("whole", "block"), tuple(ORDERS)])


@pytest.mark.parametrize("scope", ["whole", "block"])
# the original holds no stream op: the hc_rewrite backend compiles it only when told so (both get the same option,
# so both share one backend and the original's compiled code could be reused, as with the other backends)
@pytest.mark.parametrize("backend,options", [("inductor", None), ("hc_rewrite", {"require_hc_ops": False})])
def test_inductor_and_our_backend_after_the_original(llama, ids, rewritten, backend, options, scope):
    check_both(copy.deepcopy(llama), rewritten("mhc"), ids, scope, backend, ORDERS[0], options)


def test_the_issue_flow_compile_call_then_rewrite(llama, ids):
    """As a user would: compile the original and call it, rewrite it, compile the rewritten model."""
    torch._dynamo.reset()
    original = copy.deepcopy(llama)
    logits(torch.compile(original, backend="aot_eager"), ids)
    new = moved_copy(hc_rewrite.rewrite(original, (ids,), variant="hc", n=4, dynamic=True))
    ref = logits(new, ids)
    assert rel_err(logits(torch.compile(new, backend="aot_eager"), ids), ref) <= TOL


@pytest.mark.parametrize("scope", ["whole", "block"])
def test_two_rewritten_models_with_different_plans(llama, ids, rewritten, scope):
    """Same class, other variant and other n: neither runs the other's compiled code."""
    a, b = rewritten("mhc", True, 4), rewritten("frac", False, 2)
    ref_a, ref_b = logits(a, ids), logits(b, ids)
    torch._dynamo.reset()
    assert rel_err(logits(compiled(a, scope, "aot_eager"), ids), ref_a) <= TOL
    assert rel_err(logits(compiled(b, scope, "aot_eager"), ids), ref_b) <= TOL
    c = rewritten("mhc", True, 2)  # same variant, other n
    assert rel_err(logits(compiled(c, scope, "aot_eager"), ids), logits(c, ids)) <= TOL


def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()
    named = ((k.removeprefix("_orig_mod."), p) for k, p in model.named_parameters())
    return {k: p.grad for k, p in named if k.startswith("hc.")}


@pytest.mark.parametrize("variant,scope", [("mhc", "whole"), ("mhc", "block"), ("frac", "block"), ("hc", "whole")])
def test_training_after_the_original_trains_the_connections(llama, ids, rewritten, variant, scope):
    """A compiled training step of the original first; then every connection parameter of the compiled rewritten
    model gets the gradient eager gives it."""
    torch._dynamo.reset()
    original = compiled(copy.deepcopy(llama).train(), scope, "aot_eager")
    original(ids, labels=ids).loss.backward()
    new = rewritten(variant).train()
    ref = _grads(copy.deepcopy(new), ids)
    got = _grads(compiled(new, scope, "aot_eager"), ids)
    assert ref.keys() == got.keys() and ref
    for k in ref:
        assert got[k] is not None, k
        assert rel_err(got[k], ref[k]) <= 1e-4, k


def test_strip_unpins_what_attach_pinned(llama, ids, rewritten):
    from hc_rewrite.structured import strip

    new = rewritten("mhc")
    pinned = [n for n, m in new.named_modules() if "forward" in m.__dict__]
    assert "" in pinned and len(pinned) > 1  # the root and every entry module
    plain = strip(new)
    assert not [n for n, m in plain.named_modules() if "forward" in m.__dict__]
    assert rel_err(logits(plain, ids), logits(llama, ids)) <= TOL  # the original function again
