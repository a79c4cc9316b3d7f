"""Acceptance 5: bad input gets a clear error, raised before any (slow) capture where it can be, and
changes nothing."""
import pytest
import torch
import torch.nn as nn

import hc_rewrite
import hc_rewrite.api as api
from hc_rewrite import CaptureError, HCRewriteError, NoResidualStreamError, SpecError


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before, training=False):
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert model.training == training


@pytest.fixture
def no_capture(monkeypatch):
    """Fail the test if the capture is reached."""

    def forbidden(*a, **k):
        pytest.fail("capture() was called: the spec error must be raised before capturing")

    monkeypatch.setattr(api, "capture", forbidden)


@pytest.fixture(scope="module")
def bert():
    """A width-32 HF model (hidden_size=32 in its config)."""
    from hc_rewrite.zoo import ZOO

    model = ZOO["bert"].build()
    args, kwargs = ZOO["bert"].inputs(2, 8, torch.Generator().manual_seed(0))
    return model, args, kwargs


SPEC_CASES = [
    (dict(variant="foo", n=4), ["'foo'", "mhc", "frac", "hc"]),
    (dict(variant="MHC", n=4), ["'MHC'"]),
    (dict(variant="mhc", n=0), ["n must be >= 1", "n=0"]),
    (dict(variant="hc", n=-1), ["n must be >= 1", "n=-1"]),
    (dict(variant="frac", n=0), ["n=0"]),
    (dict(variant="mhc", n=1), ["mhc needs n >= 2"]),
    (dict(variant="hc", n=2.0), ["n must be an int", "float"]),
    (dict(variant="hc", n=True), ["n must be an int", "bool"]),
    (dict(variant="frac", n=3), ["frac", "n=3", "d=32", "not divisible by 3"]),  # 32 % 3 != 0
]


@pytest.mark.parametrize("entry", ["rewrite", "report"])
@pytest.mark.parametrize("spec,words", SPEC_CASES, ids=[
    "unknown-variant", "variant-case", "n=0", "n=-1", "frac-n=0", "mhc-n=1", "n-float", "n-bool", "frac-32%3",
])
def test_spec_errors_before_capture(spec, words, entry, bert, no_capture):
    model, args, kwargs = bert
    before = _state(model)
    fn = getattr(hc_rewrite, entry)
    with pytest.raises(SpecError) as info:
        fn(model, args, kwargs, **spec)
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, HCRewriteError)
    for w in words:
        assert w in str(err), (w, str(err))
    _assert_unchanged(model, before)


def test_frac_width_checked_on_the_stream_without_config(toys, make_toy):
    """No config to read the width from: the stream's width is checked after capture, before rewriting."""
    model, x, _ = make_toy(toys.PreNormMLP, d=30)
    before = _state(model)
    with pytest.raises(SpecError, match=r"d=30 is not divisible by 4") as info:
        hc_rewrite.rewrite(model, (x,), variant="frac", n=4, form="graph")
    assert "residual stream 0" in str(info.value)
    _assert_unchanged(model, before)
    # the same width is fine for n=3 (30 % 3 == 0) and for mhc with n=4
    assert len(hc_rewrite.rewrite(model, (x,), variant="frac", n=3, form="graph").hc_report.rewritten) == 3
    assert len(hc_rewrite.rewrite(model, (x,), variant="mhc", n=4, form="graph").hc_report.rewritten) == 3


@pytest.mark.parametrize("options,word", [
    (dict(sinkhorn_iter=5), "sinkhorn_iter"),
    (dict(expansion=4), "expansion"),
    (dict(seed=0, foo=1), "foo"),
])
def test_unknown_options(options, word, toys, make_toy, no_capture):
    model, x, _ = make_toy(toys.PreNormMLP)
    for fn in (hc_rewrite.rewrite, hc_rewrite.report):
        with pytest.raises(ValueError, match=word) as info:
            fn(model, (x,), variant="mhc", n=4, **options)
        assert isinstance(info.value, SpecError)
        assert "unknown option" in str(info.value)


def test_bad_option_value(toys, make_toy, no_capture):
    model, x, _ = make_toy(toys.PreNormMLP)
    with pytest.raises(SpecError, match="sinkhorn_iters must be >= 1"):
        hc_rewrite.rewrite(model, (x,), sinkhorn_iters=0, form="graph")


class DataDependent(nn.Module):
    """Python control flow on a tensor's value: torch.export cannot guard on it, symbolic_trace cannot
    branch on a proxy."""

    def __init__(self):
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x):
        h = self.f(x)
        if h.sum().item() > 0:
            return h + self.f(h)
        return h - self.f(h)


def test_uncapturable_model():
    torch.manual_seed(0)
    model = DataDependent().eval()
    x = torch.randn(2, 8)
    before = _state(model)
    with pytest.raises(CaptureError) as info:
        hc_rewrite.rewrite(model, (x,), form="graph")
    err = info.value
    assert isinstance(err, RuntimeError) and isinstance(err, HCRewriteError)
    msg = str(err)
    assert "DataDependent" in msg
    assert "torch.export (non-strict)" in msg and "torch.fx.symbolic_trace" in msg  # every path tried
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip().startswith(("torch.export", "torch.fx"))]
    assert len(lines) == 2 and all(":" in ln for ln in lines)  # each with why it failed
    _assert_unchanged(model, before)
    with pytest.raises(CaptureError):
        hc_rewrite.report(model, (x,), form="graph")


def test_capture_of_a_non_module():
    from hc_rewrite.capture import capture

    with pytest.raises(CaptureError, match="expected an nn.Module, got function"):
        capture(lambda x: x + 1, (torch.randn(2),))


@pytest.mark.parametrize("thing", [lambda x: x + x.sin(), "model"], ids=["function", "string"])
def test_rewrite_of_a_non_module(thing):
    with pytest.raises(CaptureError, match="nn.Module"):
        hc_rewrite.rewrite(thing, (torch.randn(2, 4),), form="graph")


def test_no_residual_stream(toys, make_toy):
    model, x, _ = make_toy(toys.PlainMLP)
    before = _state(model)
    with pytest.raises(NoResidualStreamError) as info:
        hc_rewrite.rewrite(model, (x,), variant="hc", n=2, form="graph")
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, HCRewriteError)
    assert "no residual stream" in str(err) and "PlainMLP" in str(err)
    rep = err.report
    assert isinstance(rep, hc_rewrite.RewriteReport)
    assert rep.sites == [] and rep.streams == [] and rep.new_parameters == 0
    assert (rep.model, rep.variant, rep.n) == ("PlainMLP", "hc", 2)
    _assert_unchanged(model, before)
    # report() describes the same thing instead of raising
    rep2 = hc_rewrite.report(model, (x,), variant="hc", n=2, form="graph")
    assert rep2.to_dict() == rep.to_dict()
    assert "0 residual site(s)" in str(rep2)


def test_only_non_residual_adds(toys, make_toy):
    model, x, _ = make_toy(toys.NotResidualNet)
    rep = hc_rewrite.report(model, (x,), form="graph")
    assert rep.sites == [] and rep.streams == []
    with pytest.raises(NoResidualStreamError):
        hc_rewrite.rewrite(model, (x,), form="graph")


def test_every_site_refused_reports_why(toys, make_toy):
    model, x, _ = make_toy(toys.ScaledSkipNet)
    with pytest.raises(NoResidualStreamError) as info:
        hc_rewrite.rewrite(model, (x,), form="graph")
    rep = info.value.report
    assert len(rep.sites) == 1 and rep.rewritten == [] and len(rep.refused) == 1
    assert "alpha=0.5" in rep.refused[0].reason
    assert "alpha=0.5" in str(info.value)  # the message carries the report
    assert hc_rewrite.report(model, (x,), form="graph").refused[0].reason == rep.refused[0].reason


@pytest.fixture
def bert_graph_form(rewritten):
    """Rewritten before ``no_capture`` is set up (fixtures it depends on come first): order-independent."""
    return rewritten("bert", "mhc", True)


def test_rewriting_a_rewritten_module_is_refused(bert_graph_form, no_capture):
    r = bert_graph_form
    with pytest.raises(ValueError, match="already rewritten"):
        hc_rewrite.rewrite(r.new, r.args, r.kwargs, variant="hc", form="graph")
