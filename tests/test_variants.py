"""The variant registry (hc_rewrite.variants): what each variant declares is what the rest of the package uses,
and a new variant is one new class, with no other change (both forms of the rewrite, the spec, the report)."""
from __future__ import annotations

import pytest
import torch

import hc_rewrite
from hc_rewrite import kernels, variants
from hc_rewrite.cli import build_parser
from hc_rewrite.errors import SpecError
from hc_rewrite.ops import reference as R
from hc_rewrite.spec import make_spec
from hc_rewrite.variants.base import OpDef, Variant, eager
from hc_rewrite.variants.hc import HCParams


def test_the_registry():
    assert variants.NAMES == ("mhc", "frac", "hc")
    for name, v in variants.REGISTRY.items():
        assert v.name == name == v.params.variant and v.summary
        for op in (v.expand_op, v.reduce_op, v.coeff_op, v.pre_op, v.post_op):
            assert op.namespace == "hc_rewrite"
    with pytest.raises(SpecError, match="expected one of mhc, frac, hc"):
        variants.get("mHC")


@pytest.mark.parametrize("name", variants.NAMES)
def test_expand_then_reduce_is_the_stream(name):
    v = variants.get(name)
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    w = v.expand(eager, x, 4)
    assert w.shape == (2, 3, 4, v.row_width(4, 8))
    torch.testing.assert_close(v.reduce(eager, w), x)


def test_the_spec_asks_the_variants():
    with pytest.raises(SpecError, match="mhc needs n >= 2"):
        make_spec("mhc", 1)
    make_spec("hc", 1)
    spec = make_spec("frac", 3)
    with pytest.raises(SpecError, match="d % n = 2"):
        spec.check_width(32)
    spec.check_width(33)
    make_spec("mhc", 3).check_width(32)  # copies fit any width


def test_the_cli_offers_the_registered_variants():
    parser = build_parser()
    for command in ("report", "export-onnx"):
        sub = parser._subparsers._group_actions[0].choices.get(command)
        if sub is None:  # export-onnx needs the onnx extra
            continue
        (action,) = [a for a in sub._actions if a.dest == "variant"]
        assert tuple(action.choices) == variants.NAMES


def test_fused_ops_are_what_the_variants_declare():
    if not kernels.available():
        assert kernels.fused_ops() == {} and kernels.fused_combos() == {}
        return
    declared = {name for v in variants.all_variants() for name in v.fused_ops}
    assert {op.name().split("::")[1] for op in kernels.fused_ops()} == declared
    assert set(kernels.fused_combos()) == {n for v in variants.all_variants()
                                           for n in (v.fused_pre, v.fused_post_pre) if n}


# ----------------------------------------------------------------------------- a fourth variant
def _half_hc_coeffs(w, a_m, a_r, b, w_m=None, w_r=None, w_b=None):
    """HC's coefficients with the branch output weighted by ``b / 2 + 1 / 2`` (still 1 at init)."""
    h_pre, h_post, h_res = R.hc_coeffs(w, a_m, a_r, b, w_m, w_r, w_b)
    return h_pre, 0.5 * h_post + 0.5, h_res


class HalfHC(Variant):
    """A variant declared in one class: its own coefficient op, everything else as HC."""

    name = "half_hc"
    summary = "test variant"
    params = HCParams
    coeff_name, pre_name = "test_half_hc_coeffs", "stream_pre"
    own_ops = {"test_half_hc_coeffs": OpDef(
        "test_half_hc_coeffs(Tensor w, Tensor a_m, Tensor a_r, Tensor b, Tensor? w_m, Tensor? w_r, Tensor? w_b) "
        "-> (Tensor, Tensor, Tensor)", _half_hc_coeffs)}

    def new_params(self, spec, row_width, index, is_last, generator, **kw):
        return HCParams(spec.n, row_width, spec.dynamic, index=index, **kw)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.f, self.norm = torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)
        self.g = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(8, 8))

    def forward(self, x):
        x = x + self.f(x)
        return self.norm(x + self.g(x))


@pytest.mark.parametrize("form", ["graph", "module"])
def test_a_new_variant_is_one_class(form, monkeypatch, hx):
    monkeypatch.setitem(variants.REGISTRY, HalfHC.name, HalfHC())
    torch.manual_seed(0)
    model = Net().eval()
    x, x2 = torch.randn(2, 5, 8), torch.randn(3, 4, 8)
    new = hc_rewrite.rewrite(model, (x,), variant="half_hc", n=3, form=form)
    rep = new.hc_report
    assert (rep.variant, rep.n, len(rep.rewritten)) == ("half_hc", 3, 2)
    assert all(isinstance(m, HCParams) for m in new.hc.children())
    if form == "graph":
        assert hx.hc_targets(new).count("test_half_hc_coeffs") == 2
    with torch.no_grad():
        torch.testing.assert_close(new(x2), model(x2))  # exact at init
        for p in new.hc.parameters():
            p.add_(0.2)
        assert not torch.allclose(new(x2), model(x2))  # its connections act
