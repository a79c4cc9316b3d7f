"""restore_dropout_modules: functional ``aten.dropout(x, p, train=False)`` -> ``nn.Dropout(p)`` submodules."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hc_rewrite.capture import capture
from hc_rewrite.passes import remove_metadata_asserts, restore_dropout_modules

DROPOUT_OPS = {torch.ops.aten.dropout.default, torch.ops.aten.dropout_.default}


class FunctionalDropNet(nn.Module):
    """``F.dropout(x, p, self.training)`` (functional form) next to a module dropout."""

    def __init__(self):
        super().__init__()
        self.f = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        h = F.dropout(self.f(x), 0.2, self.training)
        return self.drop(h) + x


def _aten_dropouts(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in DROPOUT_OPS]


def _dropout_modules(gm):
    return [n for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Dropout)]


def test_functional_dropout_becomes_modules(toys, make_toy):
    model, x, x2 = make_toy(toys.PreNormMLP, p=0.25)
    gm = capture(model, (x,)).gm
    remove_metadata_asserts(gm)
    before = _aten_dropouts(gm)
    assert len(before) == 3
    assert all(n.args[1] == 0.25 and n.args[2] is False for n in before)  # eval mode baked in
    names = [n.name for n in before]
    users = [sorted(u.name for u in n.users) for n in before]

    assert restore_dropout_modules(gm) == 3

    assert _aten_dropouts(gm) == []
    mods = _dropout_modules(gm)
    assert [n.name for n in mods] == names  # captured names kept: reports refer to them
    assert [sorted(u.name for u in n.users) for n in mods] == users
    for n in mods:
        assert n.target == f"_dropout.{n.name}"
        assert gm.get_submodule(n.target).p == 0.25
    assert "aten.dropout" not in gm.code
    gm.graph.lint()

    gm.eval()
    assert torch.equal(gm(x2), model(x2))
    gm.train()
    assert all(m.training for m in gm._dropout.children())
    torch.manual_seed(1)
    a = gm(x2)
    b = gm(x2)
    assert not torch.allclose(a, b)  # stochastic in train mode
    assert not torch.allclose(a, model(x2))
    gm.eval()
    assert torch.equal(gm(x2), gm(x2))
    assert torch.equal(gm(x2), model(x2))


def test_functional_and_module_dropout_probabilities():
    torch.manual_seed(0)
    model = FunctionalDropNet().eval()
    x = torch.randn(4, 16)
    gm = capture(model, (x,)).gm
    ps = sorted(n.args[1] for n in _aten_dropouts(gm))
    assert ps == [0.2, 0.3]
    assert restore_dropout_modules(gm) == 2
    assert _aten_dropouts(gm) == []
    assert sorted(gm.get_submodule(n.target).p for n in _dropout_modules(gm)) == [0.2, 0.3]
    x2 = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    gm.eval()
    assert torch.equal(gm(x2), model(x2))
    # in train mode the restored dropout drops: the fraction of zeros of the dropped value is ~p
    gm.train()
    big = torch.randn(4096, 16, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(5)
    out = gm(big) - big  # = drop(F.dropout(f(x)))
    frac_zero = (out == 0).float().mean().item()
    expected = 1 - (1 - 0.2) * (1 - 0.3)
    assert abs(frac_zero - expected) < 0.03


def test_captured_in_train_mode_keeps_train_switch(toys, make_toy):
    model, x, x2 = make_toy(toys.PreNormMLP, p=0.5)
    model.train()
    gm = capture(model, (x,)).gm
    assert gm.training
    assert model.training  # the caller's model keeps its mode
    assert restore_dropout_modules(gm) == 3
    gm.train()
    torch.manual_seed(0)
    assert not torch.allclose(gm(x2), gm(x2))
    gm.eval()
    model.eval()
    assert torch.equal(gm(x2), model(x2))


def test_no_dropout_no_change(toys, make_toy):
    model, x, x2 = make_toy(toys.PostNormNet)
    gm = capture(model, (x,)).gm
    code = gm.code
    assert restore_dropout_modules(gm) == 0
    assert not hasattr(gm, "_dropout")
    assert gm.code == code
    assert torch.equal(gm(x2), model(x2))


def test_restored_dropout_starts_in_the_module_mode(toys, make_toy):
    model, x, x2 = make_toy(toys.PreNormMLP, p=0.25)
    gm = capture(model, (x,)).gm
    assert not gm.training
    restore_dropout_modules(gm)
    assert all(m.training == gm.training for m in gm._dropout.children())
    assert torch.equal(gm(x2), model(x2))  # numbers unchanged by the pass itself
