"""Acceptance 6: the reference math of hc_rewrite.ops.reference and the function-preserving init of each
variant's parameter module (hc_rewrite.variants)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hc_rewrite import variants
from hc_rewrite.ops import ops
from hc_rewrite.ops import reference as R
from hc_rewrite.spec import make_spec
from hc_rewrite.variants.frac import FracParams
from hc_rewrite.variants.hc import HCParams
from hc_rewrite.variants.mhc import MHCParams

FAST = settings(max_examples=25, deadline=None, derandomize=True, database=None)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _coeffs(module, w):
    """Coefficients of a site's parameter module for the widened stream ``w``: its variant's coefficient op
    (registered with the reference math), as the rewrite calls it."""
    return variants.get(module.variant).coefficients(variants.eager, w, module.coeff_args(), 20)


def _make_params(variant, n, dynamic, width, index, is_last, generator):
    return variants.get(variant).make_params(make_spec(variant, n, dynamic), width, index, is_last, generator=generator)


# ----------------------------------------------------------------------------- Sinkhorn
@pytest.mark.parametrize("n,iters", [(4, 20), (6, 20), (8, 20), (16, 20), (2, 100), (3, 100)])
def test_sinkhorn_doubly_stochastic(n, iters):
    """Columns sum to 1 to rounding (the last step normalises columns); rows to the convergence of the
    iterations: 20 (the default) for n >= 4. For n = 2, 3 a draw of unit-normal logits with an extreme
    cross ratio converges slower (rows off by up to ~1e-2 after 20 iterations in ~0.3% of draws), so
    those are checked with 100 iterations."""
    logits = torch.randn(256, n, n, generator=_gen(n))
    s = R.sinkhorn_log(logits, iters)
    assert s.shape == logits.shape and s.dtype == torch.float32
    assert (s >= 0).all()
    assert (s.sum(-2) - 1).abs().max() <= 1e-6  # columns: the last normalisation
    assert (s.sum(-1) - 1).abs().max() <= 1e-3  # rows: converged


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sinkhorn_huge_logits_stay_finite(dtype):
    logits = (torch.randn(64, 4, 4, generator=_gen(1)) * 1e4).to(dtype)
    logits[0] = 1e4  # constant
    logits[1] = -1e4
    logits[2, 0, 0] = 1e4
    s = R.sinkhorn_log(logits)
    assert s.dtype == torch.float32  # computed in fp32 whatever the input
    assert torch.isfinite(s).all()
    assert (s >= 0).all()
    assert (s.sum(-2) - 1).abs().max() <= 1e-6
    torch.testing.assert_close(s[0], torch.full((4, 4), 0.25))


def test_sinkhorn_of_the_init_bias_is_diagonal_dominant():
    site = MHCParams(4, 8, dynamic=False)
    h = R.sinkhorn_log(site.b_res.detach())
    torch.testing.assert_close(torch.diagonal(h), torch.full((4,), 0.9), atol=1e-6, rtol=0)
    torch.testing.assert_close(h, h.T)


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("has_res", [True, False])
def test_mhc_coeffs_shapes_static_vs_dynamic(has_res):
    n, c = 4, 6
    w = torch.randn(2, 5, n, c, generator=_gen(0))
    dyn = MHCParams(n, c, dynamic=True, has_res=has_res, generator=_gen(1))
    sta = MHCParams(n, c, dynamic=False, has_res=has_res)
    assert dyn.phi.shape == (n * c, 2 * n + (n * n if has_res else 0))
    assert dyn.alpha.shape == ((3,) if has_res else (2,))
    assert sta.phi is None and sta.alpha is None
    h_pre, h_post, h_res = _coeffs(dyn, w)
    assert h_pre.shape == (2, 5, n) and h_post.shape == (2, 5, n)
    assert (h_res.shape == (2, 5, n, n)) if has_res else h_res is None
    s_pre, s_post, s_res = _coeffs(sta, w)
    assert s_pre.shape == (n,) and s_post.shape == (n,)
    assert (s_res.shape == (n, n)) if has_res else s_res is None
    for h in (h_pre, s_pre):
        assert ((h > 0) & (h < 1)).all()
    for h in (h_post, s_post):
        assert ((h > 0) & (h < 2)).all()
    # static coefficients broadcast: the same site math for every token
    torch.testing.assert_close(R.stream_pre(w, s_pre), R.stream_pre(w, s_pre.expand(2, 5, n)))


def test_hc_and_frac_coeffs_shapes():
    n, c = 4, 8
    w = torch.randn(3, n, c, generator=_gen(0))
    for dynamic in (True, False):
        h_pre, h_post, h_res = _coeffs(HCParams(n, c, dynamic), w)
        lead = (3,) if dynamic else ()
        assert h_pre.shape == lead + (n,) and h_post.shape == lead + (n,) and h_res.shape == lead + (n, n)
        y, b, a = _coeffs(FracParams(n, c, dynamic), w)
        assert y.shape == lead + (n, n) and b.shape == lead + (n,) and a.shape == lead + (n, n)


def test_registered_ops_match_reference():
    n, c = 4, 6
    x = torch.randn(2, 3, c, generator=_gen(0))
    w = torch.randn(2, 3, n, c, generator=_gen(1))
    site = MHCParams(n, c, dynamic=True, has_res=False, generator=_gen(2))
    torch.testing.assert_close(ops.expand_stream(x, n), R.expand_stream(x, n))
    torch.testing.assert_close(ops.expand_stream(x, n, 0.5), R.expand_stream(x, n, 0.5))
    torch.testing.assert_close(ops.reduce_stream(w), R.reduce_stream(w))
    torch.testing.assert_close(ops.split_fractions(x, 3), R.split_fractions(x, 3))
    torch.testing.assert_close(ops.merge_fractions(w), R.merge_fractions(w))
    params = site.coeff_args()
    got = ops.mhc_coeffs(w, *params, 1e-6, 20)
    ref = R.mhc_coeffs(w, *params, 1e-6, 20)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])
    assert ref[2] is None and got[2].numel() == 0  # "no mixing" is an empty tensor in the op schema


# ----------------------------------------------------------------------------- stream ends
@FAST
@given(n=st.integers(1, 6), c=st.integers(1, 9), seed=st.integers(0, 10_000))
def test_expand_reduce_split_merge_inverse(n, c, seed):
    x = torch.randn(2, 3, c * n, generator=_gen(seed))
    w = R.expand_stream(x, n)
    assert w.shape == (2, 3, n, c * n) and w.is_contiguous()
    torch.testing.assert_close(R.reduce_stream(w), x, rtol=1e-6, atol=0)  # mean of n copies: rounding
    spread = R.expand_stream(x, n, 0.5)  # mHC: copies 1.5 x / 0.5 x in pairs, same mean
    assert spread.shape == w.shape and _off_pairs(spread, x) <= 1e-6 * x.abs().max().item()
    torch.testing.assert_close(R.reduce_stream(spread), x, rtol=1e-6, atol=1e-6)
    assert (n >= 2) == (not torch.equal(spread, w))
    f = R.split_fractions(x, n)
    assert f.shape == (2, 3, n, c)
    assert torch.equal(R.merge_fractions(f), x)


# ----------------------------------------------------------------------------- function preservation
def _pair_deviation(x, n, g, scale):
    """A widened stream ``1 x + D`` with ``D`` in the span of the pair differences ``e_2k - e_2k+1``: the
    kind of stream an mHC init produces (and keeps)."""
    w = x.unsqueeze(-2).repeat_interleave(n, dim=-2)
    for k in range(n // 2):
        d = torch.randn(x.shape, generator=g) * scale
        w[..., 2 * k, :] += d
        w[..., 2 * k + 1, :] -= d
    return w


def _off_pairs(w, x):
    """How far ``w - 1 x`` is from the pair-difference span: pair sums and the lone copy must vanish."""
    n = w.shape[-2]
    d = w - x.unsqueeze(-2)
    bad = [d[..., 2 * k, :] + d[..., 2 * k + 1, :] for k in range(n // 2)]
    if n % 2:
        bad.append(d[..., n - 1, :])
    return torch.stack(bad).abs().max().item() if bad else 0.0


@FAST
@given(n=st.integers(2, 6), c=st.integers(1, 12), dynamic=st.booleans(), is_last=st.booleans(),
       scale=st.sampled_from([1e-3, 1.0, 100.0]), seed=st.integers(0, 10_000))
def test_mhc_site_is_exact_on_every_init_stream(n, c, dynamic, is_last, scale, seed):
    """At init, for every stream ``1 x + D`` with the copies' deviations ``D`` in the pair-difference
    span: the branch reads exactly ``x`` (through a non-uniform H_pre for n >= 3), and the site output
    is ``1 (x + y) + D'`` with ``D'`` in the same span, so the next site is exact too."""
    g = _gen(seed)
    site = _make_params("mhc", n, dynamic, c, 0, is_last, g)
    x = torch.randn(4, c, generator=g) * scale
    y = torch.randn(4, c, generator=g) * scale
    w = _pair_deviation(x, n, g, scale)
    h_pre, h_post, h_res = _coeffs(site, w)
    torch.testing.assert_close(R.stream_pre(w, h_pre), x, rtol=1e-5, atol=1e-6 * scale)
    out = R.stream_post(w, y, h_post, h_res)
    assert out.shape == w.shape
    torch.testing.assert_close(out.mean(-2), x + y, rtol=1e-5, atol=1e-5 * scale)
    assert _off_pairs(out, x + y) <= 1e-5 * scale
    torch.testing.assert_close(h_pre.sum(-1), torch.ones(h_pre.shape[:-1]), rtol=0, atol=1e-6)
    torch.testing.assert_close(h_post.mean(-1), torch.ones(h_post.shape[:-1]), rtol=0, atol=1e-6)
    if h_res is not None:
        torch.testing.assert_close(h_res.sum(-2), torch.ones(h_res.shape[:-1]), rtol=0, atol=1e-6)
        torch.testing.assert_close(h_res.sum(-1), torch.ones(h_res.shape[:-1]), rtol=0, atol=1e-6)
    assert not torch.allclose(h_post, torch.ones_like(h_post))  # the copies move apart
    assert torch.allclose(h_pre, torch.full_like(h_pre, 1.0 / n)) == (n <= 2)  # tilted from n = 3


@FAST
@given(n=st.integers(1, 8))
def test_pair_pattern_and_contrast(n):
    """The two init patterns: pair differences (zero sum) and a contrast orthogonal to all of them."""
    p, c = torch.tensor(R.pair_pattern(n)), torch.tensor(R.pair_contrast(n))
    assert p.sum() == 0 and abs(c.sum().item()) < 1e-6
    for k in range(n // 2):
        assert p[2 * k] == 1 and p[2 * k + 1] == -1 and c[2 * k] == c[2 * k + 1]
    assert (c.abs().max().item() == pytest.approx(1.0)) == (n >= 3)


@FAST
@given(n=st.integers(1, 6), c=st.integers(1, 12), dynamic=st.booleans(), index=st.integers(0, 7),
       seed=st.integers(0, 10_000))
def test_hc_site_identical_copies_stay_identical(n, c, dynamic, index, seed):
    g = _gen(seed)
    site = _make_params("hc", n, dynamic, c, index, False, g)
    x = torch.randn(4, c, generator=g)
    y = torch.randn(4, c, generator=g)
    w = R.expand_stream(x, n)
    h_pre, h_post, h_res = _coeffs(site, w)
    torch.testing.assert_close(R.stream_pre(w, h_pre), x, rtol=0, atol=0)
    out = R.stream_post(w, y, h_post, h_res)
    torch.testing.assert_close(out, R.expand_stream(x + y, n), rtol=0, atol=0)
    assert torch.equal(out, out[..., :1, :].expand_as(out))


@FAST
@given(m=st.integers(1, 6), c=st.integers(1, 8), dynamic=st.booleans(), seed=st.integers(0, 10_000))
def test_frac_site_identity_at_init(m, c, dynamic, seed):
    g = _gen(seed)
    d = m * c
    site = _make_params("frac", m, dynamic, d, 0, False, g)
    assert site.width == c
    x = torch.randn(4, d, generator=g)
    y = torch.randn(4, d, generator=g)
    w = R.split_fractions(x, m)
    h_pre, h_post, h_res = _coeffs(site, w)
    assert torch.equal(R.frac_pre(w, torch.eye(m)), x)
    torch.testing.assert_close(R.frac_pre(w, h_pre), x, rtol=0, atol=0)
    out = R.merge_fractions(R.stream_post(w, y, h_post, h_res))
    torch.testing.assert_close(out, x + y, rtol=0, atol=0)


@FAST
@given(n=st.integers(1, 5), c=st.integers(2, 12), seed=st.integers(0, 10_000))
def test_stream_layer_norm_keeps_the_mean(n, c, seed):
    g = _gen(seed)
    w = torch.randn(3, n, c, generator=g)
    weight, bias = torch.randn(c, generator=g), torch.randn(c, generator=g)
    out = R.stream_layer_norm(w, weight, bias, 1e-5, False)
    ref = torch.nn.functional.layer_norm(w.mean(-2), (c,), weight, bias, 1e-5)
    torch.testing.assert_close(out.mean(-2), ref, rtol=1e-5, atol=1e-5)
    same = R.expand_stream(w[:, 0], n)  # identical copies: the per-copy LayerNorm
    torch.testing.assert_close(R.stream_layer_norm(same, weight, bias, 1e-5, False),
                               torch.nn.functional.layer_norm(same, (c,), weight, bias, 1e-5),
                               rtol=1e-5, atol=1e-5)
    x = torch.randn(3, n * c, generator=g)
    wf, bf = torch.randn(n * c, generator=g), torch.randn(n * c, generator=g)
    frac = R.stream_layer_norm(R.split_fractions(x, n), wf, bf, 1e-5, True)
    torch.testing.assert_close(R.merge_fractions(frac),
                               torch.nn.functional.layer_norm(x, (n * c,), wf, bf, 1e-5))


# ----------------------------------------------------------------------------- gradients
def _mhc_chain_inputs(dtype, has_res=True):
    g = _gen(0)
    n, c = 3, 4
    k = 2 * n + (n * n if has_res else 0)

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    alpha = torch.tensor([0.5, 0.4, 0.3][: 3 if has_res else 2], dtype=dtype, requires_grad=True)
    return (t(2, n, c), t(2, c), t(n * c, k, scale=0.3), alpha, t(n), t(n),
            t(n, n) if has_res else None)


def _mhc_chain(w, y, phi, alpha, b_pre, b_post, b_res):
    h_pre, h_post, h_res = R.mhc_coeffs(w, phi, alpha, b_pre, b_post, b_res, 1e-6, 20)
    x = R.stream_pre(w, h_pre)
    return R.stream_post(w, y * torch.tanh(x), h_post, h_res)  # the branch depends on its input


def test_stream_pre_post_gradcheck_float64():
    g = _gen(1)
    n, c = 3, 4

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    def f(w, y, h_pre, h_post, h_res):
        return R.stream_post(w, y * torch.tanh(R.stream_pre(w, h_pre)), h_post, h_res)

    assert torch.autograd.gradcheck(f, (t(2, n, c), t(2, c), t(2, n), t(2, n), t(2, n, n)))
    assert torch.autograd.gradcheck(lambda w, y, hp, hq: f(w, y, hp, hq, None), (t(2, n, c), t(2, c), t(n), t(n)))


@pytest.mark.parametrize("has_res", [True, False])
def test_mhc_chain_gradient_fp32_accuracy(has_res):
    """mhc_coeffs + stream_pre + stream_post: analytic gradients agree with finite differences to the
    fp32 accuracy the coefficients are computed in."""
    inputs = [a for a in _mhc_chain_inputs(torch.float64, has_res) if a is not None]

    def f(*args):
        full = list(args) if has_res else list(args) + [None]
        return _mhc_chain(*full)

    assert torch.autograd.gradcheck(f, tuple(inputs), eps=1e-3, atol=1e-3, rtol=1e-2)


def test_mhc_chain_gradcheck_float64():
    inputs = _mhc_chain_inputs(torch.float64)
    out = _mhc_chain(*inputs)
    assert out.dtype == torch.float64
    assert R.sinkhorn_log(inputs[-1]).dtype == torch.float64
    assert torch.autograd.gradcheck(_mhc_chain, inputs)


def test_hc_and_frac_chain_gradients():
    g = _gen(2)
    n, c = 3, 4

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()

    def hc(w, y, a_m, a_r, b, w_m, w_r, w_b):
        h_pre, h_post, h_res = R.hc_coeffs(w, a_m, a_r, b, w_m, w_r, w_b)
        return R.stream_post(w, y * torch.tanh(R.stream_pre(w, h_pre)), h_post, h_res)

    def frac(w, y, yy, a, b, w_y, w_a, w_b):
        h_pre, h_post, h_res = R.frac_coeffs(w, yy, a, b, w_y, w_a, w_b)
        return R.stream_post(w, y * torch.tanh(R.frac_pre(w, h_pre)), h_post, h_res)

    tol = dict(eps=1e-3, atol=1e-3, rtol=1e-2, fast_mode=True)  # coefficients in fp32
    assert torch.autograd.gradcheck(hc, (t(2, n, c), t(2, c), t(n), t(n, n), t(n), t(c, scale=5.0),
                                         t(c, n, scale=5.0), t(c, scale=5.0)), **tol)
    assert torch.autograd.gradcheck(frac, (t(2, n, c), t(2, n * c), t(n, n), t(n, n), t(n),
                                           t(c, n, scale=5.0), t(c, n, scale=5.0), t(c, scale=5.0)), **tol)
