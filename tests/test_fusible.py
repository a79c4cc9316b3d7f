"""hc_rewrite.ops.fusible: every fusible form computes what the reference op computes (values and gradients of
every input) on fresh random inputs: per-token (dynamic) and static coefficients, fp32 and fp64, any leading dims."""
import pytest
import torch

from hc_rewrite.ops import fusible
from hc_rewrite.ops import reference as ref
from hc_rewrite.ops.library import ops

from .helpers import CountingBackend


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(g, *shape, dtype=torch.float32, scale=1.0, offset=0.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype).requires_grad_(True)


def _inputs(name, lead, n, c, dynamic, dtype, g):
    """Arguments of op ``name`` for a ``[*lead, n, c]`` stream, random (not the init values)."""
    w = _rand(g, *lead, n, c, dtype=dtype)
    tok = lead if dynamic else ()
    r = lambda *s, **kw: _rand(g, *s, dtype=dtype, **kw)  # noqa: E731
    if name == "stream_post":
        y = r(*lead, c) if dynamic else r(*lead, n * c)  # a copy-stream branch output, or a Frac one (n * c wide)
        h_res = r(*tok, n, n) if dynamic or n % 2 else None  # None: the last site (no mixing)
        return (w, y, r(*tok, n), h_res)
    if name == "frac_pre":
        return (w, r(*tok, n, n))
    if name in ("hc_coeffs", "frac_coeffs"):
        static = (r(n), r(n, n), r(n)) if name == "hc_coeffs" else (r(n, n), r(n, n), r(n))
        dyn = (r(c, scale=0.3), r(c, n, scale=0.3), r(c, scale=0.3)) if name == "hc_coeffs" else \
            (r(c, n, scale=0.3), r(c, n, scale=0.3), r(c, scale=0.3))
        return (w, *static, *(dyn if dynamic else (None, None, None)))
    if name == "mhc_coeffs":
        has_res = dynamic or n % 2  # None: the last site (no H_res)
        k = 2 * n + (n * n if has_res else 0)
        dyn = (r(n * c, k, scale=0.3), r(3 if has_res else 2)) if dynamic else (None, None)
        return (w, *dyn, r(n), r(n), r(n, n) if has_res else None, 1e-6, 7)
    if name == "split_fractions":
        return (r(*lead, n * c), n)
    if name == "merge_fractions":
        return (w,)
    raise AssertionError(name)


def _grads(out, args):
    outs = out if isinstance(out, tuple) else (out,)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    probe = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view(o.shape)).sum() for o in outs)
    grads = torch.autograd.grad(probe, leaves, allow_unused=True)  # static coefficients do not read the stream
    return [torch.zeros_like(a) if d is None else d for a, d in zip(leaves, grads)]


@pytest.mark.parametrize("name", sorted(fusible.FUSIBLE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead,n,c,dynamic", [((2, 5), 4, 16, True), ((7,), 3, 8, False), ((1, 2, 3), 2, 12, True)])
def test_fusible_form_matches_the_reference_op(name, dtype, lead, n, c, dynamic):
    g = _gen(hash((name, lead, n, c, dynamic)) % 2**31)
    args = _inputs(name, lead, n, c, dynamic, dtype, g)
    want = getattr(ops, name).default(*args)
    got = fusible.FUSIBLE[name](*args)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-12}
    torch.testing.assert_close(got, want, **tol)
    for a, b in zip(_grads(got, args), _grads(want, args)):
        torch.testing.assert_close(a, b, **tol)


def test_unrolled_matmul_broadcasts_like_matmul():
    g = _gen(1)
    for a_shape, b_shape in (((4, 4), (3, 4, 8)), ((3, 4, 4), (3, 4, 8)), ((2, 1, 3, 3), (2, 5, 3, 6))):
        a, b = torch.randn(*a_shape, generator=g), torch.randn(*b_shape, generator=g)
        torch.testing.assert_close(fusible.unrolled_matmul(a, b), torch.matmul(a, b))


@pytest.mark.parametrize("lead", [(7,), (2, 3, 5)])
def test_column_matmul_is_matmul(lead):
    """:func:`fusible.column_matmul` (one reduction per column forward, the narrow products backward) gives
    ``x @ w`` and its gradients for any leading dims (fp64)."""
    g = _gen(len(lead))
    x, w = _rand(g, *lead, 24, dtype=torch.float64), _rand(g, 24, 6, dtype=torch.float64)
    got, want = fusible.column_matmul(x, w), x @ w
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(_grads(got, [x, w]), _grads(want, [x, w]), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("project", ["centered_ln_project", "column_ln_project"])
@pytest.mark.parametrize("offset,bound", [(0.0, 2e-6), (10.0, 2e-5)])
def test_centered_projection_precision(offset, bound, project):
    """``rstd * (x @ W - mean * sum_rows(W))`` cancels the mean after the product: its fp32 error grows with
    ``|mean| / std`` of a row (against the fp64 truth). Streams whose rows are offset by 10 standard deviations
    keep it within 2e-5 of the output scale; the coefficients it feeds are ``0.01 * tanh(.)``."""
    g = _gen(2)
    x = torch.randn(512, 256, generator=g) + offset
    w = torch.randn(256, 6, generator=g) / 16
    truth = ref.ln_project(x.double(), w.double())
    err = (getattr(fusible, project)(x, w).double() - truth).abs().max() / truth.abs().max()
    assert err < bound


@pytest.mark.parametrize("name", ["hc_coeffs", "frac_coeffs", "mhc_coeffs"])
def test_fusible_coefficients_under_autocast(name):
    """Under bf16 autocast the projections run in bf16 (as the reference's do) and the gradients reach every input
    in its own dtype: the narrow product's backward gets a bf16 gradient and fp32 saved inputs."""
    g = _gen(3)
    args = _inputs(name, (2, 5), 4, 16, True, torch.float32, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fusible.FUSIBLE[name](*args)
        want = getattr(ops, name).default(*args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad(sum(o.float().sum() for o in got), leaves, allow_unused=True)
    assert all(d is None or (d.dtype == a.dtype and torch.isfinite(d).all()) for a, d in zip(leaves, grads))


@pytest.mark.parametrize("tokens", [1, 16, 37])
def test_tiled_sinkhorn_any_token_count(tokens):
    """Sinkhorn on tiles of 16 tokens equals the reference for token counts that fill the last tile or not
    (values and gradients, fp64)."""
    g = _gen(tokens)
    logits = _rand(g, tokens, 4, 4, dtype=torch.float64, scale=3.0)
    got, want = fusible.tiled_sinkhorn(logits, 9), ref.sinkhorn_log(logits, 9)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(_grads(got, [logits]), _grads(want, [logits]), atol=1e-12, rtol=1e-12)


def test_tiled_sinkhorn_compiles_with_dynamic_token_counts():
    """Under ``torch.compile(dynamic=True)`` one graph serves token counts that are and are not multiples of the
    tile (no guard on the padding; tokens are at least 2 tiles, so none on a single tile), with the reference's
    values."""
    torch._dynamo.reset()
    backend = CountingBackend()
    f = torch.compile(lambda z: fusible.tiled_sinkhorn(z, 5), dynamic=True, backend=backend)
    g = _gen(4)
    for tokens in (37, 48, 5):
        z = torch.randn(tokens, 3, 3, generator=g)
        torch.testing.assert_close(f(z), ref.sinkhorn_log(z, 5), atol=1e-6, rtol=1e-6)
    assert backend.graphs == 1
