"""remove_metadata_asserts: ``aten._assert_tensor_metadata`` nodes go, nothing else; export's ``_guards_fn`` stays."""
import pytest
import torch
import torch.nn as nn

from hc_rewrite.capture import capture
from hc_rewrite.passes import remove_metadata_asserts

ASSERT = torch.ops.aten._assert_tensor_metadata.default


class CastNet(nn.Module):
    """``x.to(float32)`` and ``.to(float64)`` make torch.export emit metadata asserts."""

    def __init__(self):
        super().__init__()
        self.f = nn.Linear(16, 16)

    def forward(self, x):
        h = x.to(torch.float32)
        h = h + self.f(h)
        return h.to(torch.float64)


def _guards(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]


def _asserts(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == ASSERT]


def _others(gm):
    return [(n.op, str(n.target), n.name) for n in gm.graph.nodes
            if not (n.op == "call_module" and n.target == "_guards_fn") and n.target != ASSERT]


def test_asserts_removed_guards_and_everything_else_kept():
    torch.manual_seed(0)
    model = CastNet().eval()
    x = torch.randn(2, 16)
    gm = capture(model, (x,)).gm
    guards, asserts = _guards(gm), _asserts(gm)
    assert len(guards) == 1 and hasattr(gm, "_guards_fn")
    assert len(asserts) == 2
    add = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.add.Tensor)
    assert any(u.target == ASSERT for u in add.users)  # the assert is one more reader of the stream value
    kept_before = _others(gm)
    x2 = torch.randn(3, 16, generator=torch.Generator().manual_seed(7))
    ref = model(x2)

    removed = remove_metadata_asserts(gm)

    assert removed == 2
    assert len(_guards(gm)) == 1 and _asserts(gm) == []
    assert hasattr(gm, "_guards_fn")
    assert _others(gm) == kept_before  # every other node kept, in order
    assert all(u.target != ASSERT for u in add.users) and len(add.users) == 1
    assert "_assert_tensor_metadata" not in gm.code
    gm.graph.lint()
    out = gm(x2)
    assert out.dtype == torch.float64
    assert torch.equal(out, ref)


def test_idempotent_and_prenorm_numbers(toys, make_toy):
    model, x, x2 = make_toy(toys.PreNormMLP)
    gm = capture(model, (x,)).gm
    assert len(_guards(gm)) == 1
    n_asserts = len(_asserts(gm))
    n_before = len(gm.graph.nodes)
    assert remove_metadata_asserts(gm) == n_asserts
    assert len(gm.graph.nodes) == n_before - n_asserts
    assert remove_metadata_asserts(gm) == 0  # nothing left to remove
    assert len(gm.graph.nodes) == n_before - n_asserts
    assert len(_guards(gm)) == 1
    torch.testing.assert_close(gm(x2), model(x2), rtol=0, atol=0)


def test_symbolic_trace_graph_untouched(toys, make_toy, monkeypatch):
    """A graph captured by the symbolic_trace fallback has no guards: the pass removes nothing."""
    import hc_rewrite.capture as cap

    def no_export(*a, **k):
        raise RuntimeError("export disabled for this test")

    monkeypatch.setattr(cap, "_export", no_export)
    model, x, x2 = make_toy(toys.PreNormMLP)
    captured = capture(model, (x,))
    assert captured.method == "torch.fx.symbolic_trace"
    gm = captured.gm
    code = gm.code
    nodes = [(n.op, str(n.target)) for n in gm.graph.nodes]
    assert remove_metadata_asserts(gm) == 0
    assert [(n.op, str(n.target)) for n in gm.graph.nodes] == nodes
    assert gm.code == code
    assert torch.equal(gm(x2), model(x2))


@pytest.mark.parametrize("zoo_name", ["llama"])
def test_real_model_asserts_removed(zoo_name, zoo_model, hx):
    """A real HF model: every metadata assert goes, the guards stay, the outputs do not change."""
    inputs, main_output = hx.inputs, hx.main_output
    model = zoo_model(zoo_name)
    args, kwargs = inputs(zoo_name, 0)
    gm = capture(model, args, kwargs).gm
    n_guards, n_asserts = len(_guards(gm)), len(_asserts(gm))
    assert n_guards + n_asserts >= 1
    a2, k2 = inputs(zoo_name, 1234)
    k2 = dict(k2, use_cache=False)
    with torch.no_grad():
        before = main_output(gm(*a2, **k2))
        removed = remove_metadata_asserts(gm)
        after = main_output(gm(*a2, **k2))
    assert removed == n_asserts
    assert len(_guards(gm)) == n_guards and _asserts(gm) == []
    assert torch.equal(before, after)


def test_graph_form_refuses_a_call_its_capture_specialised():
    """A Python branch on the batch size, captured at batch 2: the graph form raises at batch 5 (the guard
    export recorded), it does not take the captured branch; the module form runs the original's branch."""
    import hc_rewrite
    from tests.test_structured import ShapeBranchNet

    torch.manual_seed(0)
    model = ShapeBranchNet().eval()
    flat = hc_rewrite.rewrite(model, (torch.randn(2, 5, 8),), variant="mhc", form="graph")
    x5 = torch.randn(5, 5, 8)
    with pytest.raises(AssertionError, match="Guard failed"):
        flat(x5)
    new = hc_rewrite.rewrite(model, (torch.randn(2, 5, 8),), variant="mhc")
    with torch.no_grad():
        torch.testing.assert_close(new(x5), model(x5), rtol=1e-5, atol=1e-6)
