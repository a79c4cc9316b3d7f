"""Fused Triton kernels (``hc_rewrite.kernels``) against the reference math (``hc_rewrite.ops.reference``).

Where the kernels run:

* with CUDA: compiled kernels, in this process (plus the ``gpu``-marked ``torch.compile`` tests);
* without CUDA but with triton installed: triton's CPU interpreter. ``TRITON_INTERPRET=1`` has to be set
  before triton is first imported in a process (triton decorates its own ``tl.*`` helpers at import
  time), and another test module may already have imported it, so :func:`test_interpreter` re-runs this
  file in a child pytest process with ``TRITON_INTERPRET=1``; in the parent the kernel tests skip;
* without triton: everything skips.

Every test draws fresh random inputs, fills the kernels' output buffers with NaN before they run
(``_common.POISON``), and checks fp32 and bf16 forwards and fp32 gradients against the reference
differentiated in fp64 (the reference casts to fp32 internally; :func:`fp64_reference` lifts that).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import zlib

import pytest
import torch
from torch import nn

from hc_rewrite.ops import reference as ref
from hc_rewrite.variants import NAMES as VARIANTS

# the interpreter evaluates sigmoid(x) = 1 / (1 + exp(-x)) in numpy: exp overflows to inf for very negative
# logits, which gives the right 0 (a GPU does the same silently)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
CHILD = os.environ.get("HC_KERNELS_TEST_CHILD") == "1"
IN_PROCESS = HAS_TRITON and (CUDA or CHILD)
DEV = "cuda" if CUDA else "cpu"

kernels = pytest.mark.skipif(
    not IN_PROCESS,
    reason="no triton" if not HAS_TRITON else "CPU: runs in the interpreter child process (test_interpreter)",
)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="needs CUDA and triton")

# bf16: the reference rounds intermediates (each product, the matmul) to bf16 and the kernels round once,
# so both are within a few bf16 ulps of the largest term: absolute tolerance relative to the output scale.
BF16 = {"atol": 2e-2, "rtol": 2e-2, "scaled": True}
F32 = {"atol": 2e-5, "rtol": 2e-5}


def test_interpreter():
    """CPU only: run the kernel tests of this file under ``TRITON_INTERPRET=1`` in a child process."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if CUDA or CHILD:
        pytest.skip("the kernel tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1", HC_KERNELS_TEST_CHILD="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


_IMPORT_CHECK = """
import sys
sys.modules["triton"] = None  # triton cannot be imported in this process
import torch, hc_rewrite
import hc_rewrite.kernels as k
from hc_rewrite.passes.pipeline import lower
assert not [m for m in sys.modules if m.startswith("hc_rewrite.kernels.")], "a kernel module was imported"
assert k.available() is False
assert k.fused_ops() == {} and k.fused_combos() == {} and k._load() is None

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.f, self.g = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        x = x + self.f(x)
        return x + self.g(x)

x = torch.randn(2, 3, 8)
net = Net().eval()
gm = hc_rewrite.rewrite(net, (x,), variant="mhc", n=4, form="graph")
before = gm.code
assert lower(gm, everywhere=True, decompose=False) == 0 and gm.code == before  # the reference ops stay ...
assert torch.allclose(gm(x), net(x), atol=1e-6)  # ... and compute the model
print("ok")
"""


def test_import_without_triton_is_safe():
    """In a fresh process where triton cannot be imported: ``hc_rewrite`` and ``hc_rewrite.kernels`` import (no
    kernel module is loaded), the package reports no kernels, and the lowering leaves a rewritten graph as it is."""
    proc = subprocess.run([sys.executable, "-c", _IMPORT_CHECK], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-3000:] + proc.stderr[-3000:]


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def _fixed_inputs(request):
    """Fixed random inputs per test (seeded by the test's id), the same in every process and order."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _poison():
    if not IN_PROCESS:
        yield
        return
    from hc_rewrite.kernels import _common

    _common.POISON = True
    yield
    _common.POISON = False


@contextlib.contextmanager
def fp64_reference():
    """Make the reference's ``.float()`` casts keep fp64 tensors, so it can serve as an fp64 oracle."""
    orig = torch.Tensor.float
    torch.Tensor.float = lambda self, *a, **k: self if self.dtype == torch.float64 else orig(self, *a, **k)
    try:
        yield
    finally:
        torch.Tensor.float = orig


def fused(name):
    from hc_rewrite import kernels as k

    k._load()
    return getattr(torch.ops.hc_fused, name).default


def rnd(*shape, dtype=torch.float32, scale=1.0, requires_grad=False):
    return (scale * torch.randn(*shape, device=DEV)).to(dtype).requires_grad_(requires_grad)


def close(a, b, tol):
    assert not torch.isnan(a).any(), "NaN in the output: an element was never written"
    tol = dict(tol)
    if tol.pop("scaled", False):
        tol["atol"] *= max(1.0, b.float().abs().max().item())
    torch.testing.assert_close(a.float(), b.float(), **tol)


def grads_match(outs, leaves, ref_fn, floor=5e-5, factor=10.0):
    """fp32 gradients of ``outs`` w.r.t. ``leaves`` against ``ref_fn`` on fp64 copies (same cotangents).

    The error allowed is relative to the largest gradient entry, ``floor`` plus ``factor`` times the
    error of the fp32 reference itself (some entries are ill-conditioned in fp32: saturated sigmoids,
    sharp Sinkhorn; a wrong formula is off by O(1))."""
    pairs = [(o, torch.randn_like(o)) for o in outs if o is not None and o.numel() and o.requires_grad]
    got = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
    l32 = [x.detach().requires_grad_() for x in leaves]
    r32 = [o for o in ref_fn(*l32) if o is not None]
    base = torch.autograd.grad(r32, l32, [g for _, g in pairs], allow_unused=True)
    with fp64_reference():
        l64 = [x.detach().double().requires_grad_() for x in leaves]
        routs = [o for o in ref_fn(*l64) if o is not None]
        assert len(routs) == len(pairs)
        want = torch.autograd.grad(routs, l64, [g.double() for _, g in pairs], allow_unused=True)
    for i, (a, r, b) in enumerate(zip(got, base, want)):
        if b is None:
            assert a is None or not a.abs().any(), i
            continue
        assert a is not None and not torch.isnan(a).any(), i
        scale = b.abs().max().clamp_min(1e-6)
        err = ((a.double() - b).abs().max() / scale).item()
        err_ref = ((r.double() - b).abs().max() / scale).item()
        assert err <= floor + factor * err_ref, f"gradient {i}: relative error {err:.2e} (fp32 reference {err_ref:.2e})"


def mhc_params(n, C, has_res=True, dynamic=True):
    from hc_rewrite.variants.mhc import MHCParams

    s = MHCParams(n, C, dynamic, has_res=has_res, device=DEV)
    with torch.no_grad():  # move away from the init so every term matters
        for p in s.parameters():
            p.add_(0.3 * torch.randn_like(p))
        if dynamic:
            s.alpha.mul_(30.0)
    return [None if p is None else p.detach().requires_grad_() for p in s.coeff_args()]


def hcfrac_params(frac, n, C, dynamic=True):
    s1 = rnd(n, n) if frac else rnd(n)
    ps = [s1, rnd(n, n), rnd(n)]
    if dynamic:
        ps += [rnd(C, n, scale=3.0), rnd(C, n, scale=3.0), rnd(C, scale=3.0)] if frac else \
              [rnd(C, scale=3.0), rnd(C, n, scale=3.0), rnd(C, scale=3.0)]
    else:
        ps += [None, None, None]
    return [None if p is None else p.requires_grad_() for p in ps]


LEAD = (2, 3)


# ----------------------------------------------------------------------------- registration
@kernels
def test_fused_ops_have_the_reference_schemas():
    from hc_rewrite.kernels import fused_combos, fused_ops

    mapping = fused_ops()
    assert len(mapping) == 6
    for ref_op, op in mapping.items():
        a, b = ref_op._schema, op._schema
        assert a.name.split("::")[1] == b.name.split("::")[1]
        norm = lambda t: str(t).replace("SymInt", "int")  # noqa: E731  (inferred schemas say SymInt)
        assert [(x.name, norm(x.type)) for x in a.arguments] == [(x.name, norm(x.type)) for x in b.arguments]
        assert [norm(x.type) for x in a.returns] == [norm(x.type) for x in b.returns]
    assert set(fused_combos()) == {"mhc_pre", "hc_pre", "frac_pre_coeffs", "mhc_post_pre"}


@kernels
@pytest.mark.parametrize("name", ["stream_post", "mhc_pre", "mhc_post_pre", "hc_pre", "frac_pre_coeffs"])
def test_opcheck(name):
    n, C = 4, 16
    w, y, hp, hr = rnd(3, n, C), rnd(3, C), torch.rand(3, n, device=DEV), torch.rand(3, n, n, device=DEV)
    args = {
        "stream_post": (w, y, hp, hr),
        "mhc_pre": (w, *mhc_params(n, C), 1e-6, 20),
        "mhc_post_pre": (w, y, hp, hr, *mhc_params(n, C), 1e-6, 20),
        "hc_pre": (w, *hcfrac_params(False, n, C)),
        "frac_pre_coeffs": (w, *hcfrac_params(True, n, C)),
    }[name]
    # the AOT-dispatch checks trace the kernel launch, which only a compiled kernel supports
    utils = None if CUDA else ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(fused(name), args, **({} if utils is None else {"test_utils": utils}))


# ----------------------------------------------------------------------------- post / pre
POST_CASES = {
    "mhc": lambda n, C: (rnd(*LEAD, n, C), rnd(*LEAD, C), rnd(*LEAD, n).sigmoid(), rnd(*LEAD, n, n).softmax(-2)),
    "no_res": lambda n, C: (rnd(*LEAD, n, C), rnd(*LEAD, C), rnd(*LEAD, n).sigmoid(), None),
    "static": lambda n, C: (rnd(*LEAD, n, C), rnd(*LEAD, C), rnd(n), rnd(n, n)),
    "frac": lambda n, C: (rnd(*LEAD, n, C), rnd(*LEAD, n * C), rnd(*LEAD, n), rnd(*LEAD, n, n)),
}


@kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(POST_CASES))
def test_stream_post_forward(case, dtype):
    w, y, hp, hr = POST_CASES[case](4, 40)
    w, y = w.to(dtype), y.to(dtype)
    close(fused("stream_post")(w, y, hp, hr), ref.stream_post(w, y, hp, hr), F32 if dtype == torch.float32 else BF16)


@kernels
@pytest.mark.parametrize("n,C,static,dtype", [(4, 40, False, torch.float32), (4, 40, False, torch.bfloat16),
                                              (3, 300, False, torch.float32), (4, 40, True, torch.bfloat16)])
def test_pre_forward(n, C, static, dtype):
    w = rnd(*LEAD, n, C, dtype=dtype)
    hp = rnd(n) if static else rnd(*LEAD, n)
    y = rnd(n, n) if static else rnd(*LEAD, n, n)
    tol = F32 if dtype == torch.float32 else BF16
    close(fused("stream_pre")(w, hp), ref.stream_pre(w, hp), tol)
    close(fused("frac_pre")(w, y), ref.frac_pre(w, y), tol)


@kernels
@pytest.mark.parametrize("case", ["mhc", "static", "frac"])  # no_res: dW = dW' (covered by test_lowered_graph)
def test_stream_post_gradcheck_fp64(case):
    args = [None if a is None else a.double().requires_grad_() for a in POST_CASES[case](3, 6)]
    assert torch.autograd.gradcheck(fused("stream_post"), args, fast_mode=True)


@kernels
@pytest.mark.parametrize("static", [False, True])
def test_pre_gradcheck_fp64(static):
    n, C = 3, 6
    w = rnd(2, n, C, dtype=torch.float64, requires_grad=True)
    hp = rnd(*((n,) if static else (2, n)), dtype=torch.float64, requires_grad=True)
    y = rnd(*((n, n) if static else (2, n, n)), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fused("stream_pre"), (w, hp), fast_mode=True)
    assert torch.autograd.gradcheck(fused("frac_pre"), (w, y), fast_mode=True)


# ----------------------------------------------------------------------------- mHC
def _mhc_ref(w, phi, alpha, b_pre, b_post, b_res):
    return ref.mhc_coeffs(w, phi, alpha, b_pre, b_post, b_res, 1e-6, 20)


@kernels
@pytest.mark.parametrize("n,C,has_res,dtype", [(4, 40, True, torch.float32), (4, 40, True, torch.bfloat16),
                                               (4, 136, False, torch.float32), (3, 24, True, torch.bfloat16)])
def test_mhc_forward(n, C, has_res, dtype):
    ps = mhc_params(n, C, has_res)
    w = rnd(*LEAD, n, C, dtype=dtype)
    want = _mhc_ref(w, *ps)
    got = fused("mhc_coeffs")(w, *ps, 1e-6, 20)
    for a, b in zip(got, want):
        if b is None:
            assert a.numel() == 0
        else:
            close(a, b, {"atol": 2e-5, "rtol": 1e-4})  # fp32 coefficients, whatever the stream dtype
    tol = F32 if dtype == torch.float32 else BF16
    branch, h_pre, h_post, h_res, _, _ = fused("mhc_pre")(w, *ps, 1e-6, 20)
    close(branch, ref.stream_pre(w, want[0]), tol)
    close(h_post, want[1], {"atol": 2e-5, "rtol": 1e-4})
    # post of a previous site fused with this site's pre
    w0, y, hp0, hr0 = POST_CASES["mhc"](n, C)
    w0, y = w0.to(dtype), y.to(dtype)
    out = fused("mhc_post_pre")(w0, y, hp0, hr0, *ps, 1e-6, 20)
    close(out[0], ref.stream_post(w0, y, hp0, hr0), tol)
    # the next coefficients from the kernel's own new stream (in bf16 the two streams differ by
    # rounding, which the sharp gates of this test amplify)
    c1 = _mhc_ref(out[0], *ps)
    close(out[1], ref.stream_pre(out[0], c1[0]), tol)
    for a, b in zip(out[2:5], c1):
        if b is not None:
            close(a, b, {"atol": 2e-5, "rtol": 1e-4})


@kernels
def test_mhc_static():
    ps = mhc_params(4, 8, dynamic=False)
    w = rnd(*LEAD, 4, 8)
    for a, b in zip(fused("mhc_coeffs")(w, *ps, 1e-6, 20), _mhc_ref(w, *ps)):
        close(a, b, F32)
    out = fused("mhc_pre")(w, *ps, 1e-6, 20)
    close(out[0], ref.stream_pre(w, _mhc_ref(w, *ps)[0]), F32)
    grads_match(fused("mhc_coeffs")(w, *ps, 1e-6, 20), [p for p in ps if p is not None], lambda *p: _mhc_ref(w.to(p[0].dtype), None, None, *p))


@kernels
@pytest.mark.parametrize("n,C,has_res", [(4, 72, True), (4, 24, False), (3, 16, True), (2, 16, True)])
def test_mhc_gradients(n, C, has_res):
    ps = mhc_params(n, C, has_res)
    w = rnd(*LEAD, n, C, requires_grad=True)
    leaves = [w] + [p for p in ps if p is not None]
    fill = (lambda p: list(p) + [None]) if not has_res else list

    grads_match(fused("mhc_coeffs")(w, *ps, 1e-6, 20), leaves, lambda w_, *p: _mhc_ref(w_, *fill(p)))

    def pre_ref(w_, *p):
        h = _mhc_ref(w_, *fill(p))
        return (ref.stream_pre(w_, h[0]),) + tuple(h)
    grads_match(fused("mhc_pre")(w, *ps, 1e-6, 20)[:4], leaves, pre_ref)

    w0, y, hp0, hr0 = [a.requires_grad_() for a in POST_CASES["mhc"](n, C)]
    def post_pre_ref(w0_, y_, hp_, hr_, *p):
        w1 = ref.stream_post(w0_, y_, hp_, hr_)
        return (w1,) + pre_ref(w1, *p)
    out = fused("mhc_post_pre")(w0, y, hp0, hr0, *ps, 1e-6, 20)
    grads_match(out[:5], [w0, y, hp0, hr0] + leaves[1:], post_pre_ref)


@kernels
def test_mhc_bf16_backward():
    """bf16 stream: gradients against the fp64 reference on the same (bf16-valued) inputs."""
    ps = mhc_params(4, 40)
    w = rnd(*LEAD, 4, 40, dtype=torch.bfloat16, requires_grad=True)
    outs = fused("mhc_pre")(w, *ps, 1e-6, 20)[:4]
    cot = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, [w] + ps, cot)
    with fp64_reference():
        l64 = [x.detach().double().requires_grad_() for x in [w] + ps]
        h = _mhc_ref(*l64)
        want = torch.autograd.grad((ref.stream_pre(l64[0], h[0]),) + tuple(h), l64, [c.double() for c in cot])
    assert got[0].dtype == torch.bfloat16
    for a, b in zip(got, want):
        close(a, b, BF16)


# ----------------------------------------------------------------------------- HC / Frac
@kernels
@pytest.mark.parametrize("frac", [False, True])
@pytest.mark.parametrize("n,C,dynamic,dtype", [(4, 40, True, torch.float32), (4, 40, True, torch.bfloat16),
                                               (3, 136, True, torch.float32), (4, 8, False, torch.bfloat16)])
def test_hc_frac_forward(frac, n, C, dynamic, dtype):
    ps = hcfrac_params(frac, n, C, dynamic)
    w = (rnd(*LEAD, n, C) + 0.5).to(dtype)
    rc = ref.frac_coeffs if frac else ref.hc_coeffs
    want = rc(w, *ps)
    got = fused("frac_coeffs" if frac else "hc_coeffs")(w, *ps)
    for a, b in zip(got, want):
        close(a, b, {"atol": 2e-6, "rtol": 2e-6})  # dynamic terms are 0.01 * tanh: absolute error tiny
    out = fused("frac_pre_coeffs" if frac else "hc_pre")(w, *ps)
    close(out[0], (ref.frac_pre if frac else ref.stream_pre)(w, want[0]),
          F32 if dtype == torch.float32 else BF16)
    for a, b in zip(out[1:4], want):
        close(a, b, {"atol": 2e-6, "rtol": 2e-6})


@kernels
@pytest.mark.parametrize("frac", [False, True])
@pytest.mark.parametrize("n,C", [(4, 72), (3, 16)])
def test_hc_frac_gradients(frac, n, C):
    ps = hcfrac_params(frac, n, C)
    w = rnd(*LEAD, n, C, requires_grad=True)
    rc = ref.frac_coeffs if frac else ref.hc_coeffs
    rp = ref.frac_pre if frac else ref.stream_pre
    leaves = [w] + ps
    grads_match(fused("frac_coeffs" if frac else "hc_coeffs")(w, *ps), leaves, rc)

    def pre_ref(*a):
        h = rc(*a)
        return (rp(a[0], h[0]),) + tuple(h)
    grads_match(fused("frac_pre_coeffs" if frac else "hc_pre")(w, *ps)[:4], leaves, pre_ref)


@kernels
def test_many_token_blocks():
    """Enough tokens for several programs of every kernel (and row splits in the backward), ragged ends."""
    n, C, T = 4, 24, 70
    ps = mhc_params(n, C)
    w = rnd(T, n, C, requires_grad=True)
    leaves = [w] + ps

    def pre_ref(w_, *p):
        h = _mhc_ref(w_, *p)
        return (ref.stream_pre(w_, h[0]),) + tuple(h)
    grads_match(fused("mhc_pre")(w, *ps, 1e-6, 20)[:4], leaves, pre_ref)
    hps = hcfrac_params(False, n, C)
    grads_match(fused("hc_coeffs")(w, *hps), [w] + hps, ref.hc_coeffs)
    y, hp, hr = rnd(T, C, requires_grad=True), rnd(T, n, requires_grad=True), rnd(T, n, n, requires_grad=True)
    grads_match([fused("stream_post")(w, y, hp, hr)], [w, y, hp, hr], lambda *a: (ref.stream_post(*a),))


# ----------------------------------------------------------------------------- graph pass
class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.n1, self.n2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.attn, self.f1, self.f2 = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.f2(nn.functional.gelu(self.f1(self.n2(x))))


class _Net(nn.Module):
    def __init__(self, d, layers=2):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(d) for _ in range(layers))
        self.norm = nn.RMSNorm(d)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.norm(x)


def _rewritten(variant, d=32, layers=1):
    import hc_rewrite

    x = torch.randn(2, 5, d, device=DEV)
    gm = hc_rewrite.rewrite(_Net(d, layers).to(DEV), (x,), variant=variant, n=4, form="graph")
    with torch.no_grad():
        for p in gm.hc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return gm, x


@kernels
@pytest.mark.parametrize("variant,fusions,swaps", [("mhc", 3, 1), ("hc", 2, 2), ("frac", 2, 2)])
def test_lowered_graph(variant, fusions, swaps):
    """The lowering stage of the pipeline (fusion, then single-op swaps) on a rewritten graph of two sites: the
    kernels run it (compiled on CUDA, interpreted on CPU) with the outputs and gradients of the reference ops.
    mHC: coefficients + pre of each site fused (2), the first post with the next pre (1), the last post swapped;
    HC / Frac: coefficients + pre fused (2), both posts swapped."""
    from hc_rewrite import variants
    from hc_rewrite.passes.pipeline import lower

    gm, x = _rewritten(variant)
    out0 = gm(x)
    g0 = torch.autograd.grad(out0.square().sum(), list(gm.parameters()))
    assert lower(gm, everywhere=True, decompose=False) == fusions + swaps
    left = {str(n.target).split(".")[1] for n in gm.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("hc_rewrite.")}
    v = variants.get(variant)
    assert left == {v.expand_name, v.reduce_name}  # every op with a kernel is lowered
    out1 = gm(x)
    g1 = torch.autograd.grad(out1.square().sum(), list(gm.parameters()))
    close(out1, out0, {"atol": 1e-5, "rtol": 1e-5})
    for a, b in zip(g1, g0):
        close(a, b, {"atol": 1e-4, "rtol": 1e-4})


# ----------------------------------------------------------------------------- traced graphs
TRACE_CASES = {  # op -> (kernels of the inference graph, kernels of the joint forward + backward graph)
    "mhc_coeffs": ({"_mhc_kernel": 1}, {"_mhc_kernel": 2, "_proj_bwd_kernel": 1}),  # backward recomputes
    "mhc_pre": ({"_mhc_kernel": 1}, {"_mhc_kernel": 1, "_mix_bwd_kernel": 1, "_proj_bwd_kernel": 1}),
    "mhc_post_pre": ({"_mhc_kernel": 1}, {"_mhc_kernel": 1, "_mix_bwd_kernel": 2, "_proj_bwd_kernel": 1}),
    "hc_pre": ({"_hcfrac_kernel": 1}, {"_hcfrac_kernel": 1, "_mix_bwd_kernel": 1, "_proj_bwd_kernel": 1}),
    "frac_pre_coeffs": ({"_hcfrac_kernel": 1}, {"_hcfrac_kernel": 1, "_mix_bwd_kernel": 1, "_proj_bwd_kernel": 1}),
    "stream_post": ({"_mix_fwd_kernel": 1}, {"_mix_fwd_kernel": 1, "_mix_bwd_kernel": 1}),
}


@pytest.mark.skipif(not HAS_TRITON or CHILD, reason="needs triton, compiled mode (not the interpreter)")
@pytest.mark.parametrize("name", list(TRACE_CASES))
def test_traced_graphs_hold_the_kernels(name, monkeypatch):
    """What torch.compile sees: AOT autograd decomposes the ops into their triton kernels (traced on meta
    tensors, no GPU needed): one kernel per fused forward, and the backward kernels of the design."""
    from torch._functorch.aot_autograd import aot_function
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    from hc_rewrite import kernels as k

    for mod in k._load():
        if hasattr(mod, "use_triton"):
            monkeypatch.setattr(mod, "use_triton", lambda *t: True)
    n, C, T = 4, 64, 32
    w, y = torch.randn(T, n, C, device="meta", dtype=torch.bfloat16), torch.randn(T, C, device="meta", dtype=torch.bfloat16)
    hp, hr = torch.rand(T, n, device="meta"), torch.rand(T, n, n, device="meta")
    on_meta = lambda ps: [p.detach().to("meta") for p in ps]  # noqa: E731
    args = {
        "mhc_coeffs": (w, *on_meta(mhc_params(n, C)), 1e-6, 20),
        "mhc_pre": (w, *on_meta(mhc_params(n, C)), 1e-6, 20),
        "mhc_post_pre": (w, y, hp, hr, *on_meta(mhc_params(n, C)), 1e-6, 20),
        "hc_pre": (w, *on_meta(hcfrac_params(False, n, C))),
        "frac_pre_coeffs": (w, *on_meta(hcfrac_params(True, n, C))),
        "stream_post": (w, y, hp, hr),
    }[name]

    class Done(Exception):
        pass

    def kernels_of(gm, *_a, **_k):
        counts = {}
        for node in gm.graph.nodes:
            if node.op == "call_function" and "triton_kernel_wrapper" in str(node.target):
                kname = kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__
                counts[kname] = counts.get(kname, 0) + 1
        raise Done(counts)

    got = []
    for grad in (False, True):
        a = [x.detach().requires_grad_(grad) if isinstance(x, torch.Tensor) else x for x in args]
        with pytest.raises(Done) as info:
            aot_function(lambda *a_: fused(name)(*a_), fw_compiler=kernels_of, partition_fn=kernels_of)(*a)
        got.append(info.value.args[0])
    assert tuple(got) == TRACE_CASES[name]


# ----------------------------------------------------------------------------- GPU only
@gpu
@needs_cuda
@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_fused_graph_matches_eager(variant):
    """``torch.compile(backend="hc_rewrite")`` on CUDA: its lowering puts the fused kernels in the graph it hands
    Inductor, and the compiled model gives eager's outputs and gradients."""
    from hc_rewrite.backend import hc_rewrite_backend

    gm, x = _rewritten(variant, d=64, layers=2)
    out0 = gm(x)
    g0 = torch.autograd.grad(out0.square().sum(), list(gm.parameters()))
    lowered = []

    def spy(graph, example_inputs, **kw):
        compiled_fn = hc_rewrite_backend(graph, example_inputs, **kw)
        lowered.append({str(n.target).split(".")[0] for n in graph.graph.nodes if n.op == "call_function"})
        return compiled_fn

    torch._dynamo.reset()
    compiled = torch.compile(gm, backend=spy, fullgraph=True)
    out1 = compiled(x)
    assert lowered and all("hc_fused" in ns for ns in lowered)
    g1 = torch.autograd.grad(out1.square().sum(), list(gm.parameters()))
    close(out1, out0, {"atol": 1e-4, "rtol": 1e-4})
    for a, b in zip(g1, g0):
        close(a, b, {"atol": 1e-3, "rtol": 1e-3})


@gpu
@needs_cuda
def test_compiled_op_in_bf16():
    ps = mhc_params(4, 256)
    w = rnd(8, 128, 4, 256, dtype=torch.bfloat16, requires_grad=True)
    f = torch.compile(lambda w_: fused("mhc_pre")(w_, *ps, 1e-6, 20)[0].float().square().sum())
    g = torch.autograd.grad(f(w), [w])[0]
    e = torch.autograd.grad(ref.stream_pre(w, _mhc_ref(w, *ps)[0]).float().square().sum(), [w])[0]
    close(g, e, {"atol": 5e-2, "rtol": 5e-2})
