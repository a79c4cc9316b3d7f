"""Shared fixtures of the core test suite.

* ``zoo_model(name)``: one build per session of a ``hc_rewrite.zoo`` model (eval mode).
* ``rewritten(name, variant, dynamic)``: one ``hc_rewrite.rewrite(..., n=4)`` per session and key, with a
  snapshot of the caller's model taken just before the rewrite. The cached module is shared: a test that
  changes it must use ``fresh_rewritten`` (which restores its state and mode afterwards).
* ``toys``: small hand-written ``nn.Module`` nets for the graph-pass tests.
* ``hx``: the helpers of ``tests/helpers.py`` (``main_output``, ``rel_err``, ``inputs``, ``hc_targets``, seeds).
"""
from __future__ import annotations

import logging
import os
import types
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import hc_rewrite  # noqa: E402
from hc_rewrite.zoo import ZOO  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
logging.getLogger("transformers").setLevel(logging.ERROR)
try:  # silence transformers' own logger (config warnings, weight-loading bars)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
except Exception:  # pragma: no cover - transformers is a test dependency
    pass

from .helpers import (  # noqa: E402
    BATCH, CAPTURE_SEED, EQUIV_MODELS, FRESH_SEED, SEQ, VARIANTS, hc_targets, inputs, main_output, rel_err,
    snapshot,
)

HELPERS = types.SimpleNamespace(
    main_output=main_output, rel_err=rel_err, inputs=inputs, hc_targets=hc_targets, snapshot=snapshot,
    CAPTURE_SEED=CAPTURE_SEED, FRESH_SEED=FRESH_SEED, VARIANTS=VARIANTS, EQUIV_MODELS=EQUIV_MODELS,
)


@pytest.fixture(scope="session")
def hx():
    """The helpers of :mod:`tests.helpers` as one namespace, for the graph-pass tests."""
    return HELPERS


# Tiny models: intra-op threads only cost here, and on a shared CPU they make every forward up to ~100x
# slower (threads spin waiting for each other). The core and pass tests run single-threaded
# (HC_TEST_THREADS overrides); other test modules keep torch's setting.
_SINGLE_THREAD = ("test_core_", os.sep + "passes" + os.sep)


@pytest.fixture(autouse=True)
def _test_threads(request):
    path = str(request.node.fspath)
    if not any(key in path for key in _SINGLE_THREAD):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("HC_TEST_THREADS", "1")))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ----------------------------------------------------------------------------- zoo fixtures
@pytest.fixture(scope="session")
def zoo_model():
    cache: dict = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            cache[name] = ZOO[name].build()
        return cache[name]

    return get


class Rewritten(types.SimpleNamespace):
    """``model`` (the caller's, shared), ``before`` (its state_dict just before rewrite), ``new``,
    ``args``/``kwargs`` (capture inputs)."""


@pytest.fixture(scope="session")
def rewritten(zoo_model):
    cache: dict = {}

    def get(name: str, variant: str, dynamic: bool) -> Rewritten:
        key = (name, variant, dynamic)
        if key not in cache:
            model = zoo_model(name)
            args, kwargs = inputs(name, CAPTURE_SEED)
            before = snapshot(model)
            new = hc_rewrite.rewrite(model, args, kwargs, variant=variant, n=4, dynamic=dynamic, form="graph")
            cache[key] = Rewritten(model=model, before=before, new=new, args=args, kwargs=kwargs,
                                   init_state=snapshot(new))
        return cache[key]

    return get


@pytest.fixture
def fresh_rewritten(rewritten):
    """Like ``rewritten`` but the test may train / perturb the module: its state, its mode and its
    gradients are restored when the test ends."""
    used = []

    def get(name: str, variant: str, dynamic: bool) -> Rewritten:
        r = rewritten(name, variant, dynamic)
        used.append(r)
        return r

    yield get
    for r in used:
        with torch.no_grad():
            r.new.load_state_dict(r.init_state)
        r.new.zero_grad(set_to_none=True)
        r.new.eval()


# ----------------------------------------------------------------------------- toy nets
class PreNormMLP(nn.Module):
    """``h = h + drop(mlp(ln(h)))`` x L, then a head: a pre-norm residual stream of L sites."""

    def __init__(self, d=32, layers=3, p=0.0, d_in=16):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)) for _ in range(layers)
        )
        self.drop = nn.Dropout(p)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        h = self.inp(x)
        for norm, mlp in zip(self.norms, self.mlps):
            h = h + self.drop(mlp(norm(h)))
        return self.head(h)


class PostNormNet(nn.Module):
    """``h = LN(h + tanh(f(h)))`` x L: a post-norm stream whose sites are linked by LayerNorms."""

    def __init__(self, d=32, layers=2, d_in=16):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.f = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))

    def forward(self, x):
        h = self.inp(x)
        for f, norm in zip(self.f, self.norms):
            h = norm(h + torch.tanh(f(h)))
        return h


class NotResidualNet(nn.Module):
    """Adds that are NOT residual connections: position-embedding add (broadcast), RoPE-like
    ``q*cos + rot(q)*sin``, bias add, eps add, tanh-GELU's ``x + 0.044715*x**3`` and ``1 + tanh``."""

    def __init__(self, d=32, seq=8):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.1)
        self.q = nn.Linear(d, d)
        self.bias = nn.Parameter(torch.randn(d) * 0.1)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        h = x + self.pos  # position embedding
        q = self.q(h)
        half = q.shape[-1] // 2
        cos, sin = torch.cos(h), torch.sin(h)
        rot = torch.cat([-q[..., half:], q[..., :half]], dim=-1)
        q = q * cos + rot * sin  # RoPE-like
        q = q + self.bias  # bias add
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6)  # eps add
        g = 0.5 * q * (1.0 + torch.tanh(0.7978845608 * (q + 0.044715 * q ** 3)))  # GELU (tanh)
        return self.out(g)


class ScaledSkipNet(nn.Module):
    """``torch.add(f(x), x, alpha=0.5)``: the skip is scaled, a site that must be refused."""

    def __init__(self, d=32, d_in=16):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.f = nn.Linear(d, d)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        h = self.inp(x)
        h = torch.add(self.f(h), h, alpha=0.5)
        return self.head(h)


class NonDominatedNet(nn.Module):
    """Block 2's branch reads the stream value from before block 1 directly (a dense skip):
    ``h2 = h1 + g(h1 + h0)``; block 2's skip does not dominate its branch."""

    def __init__(self, d=32, d_in=16):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.f = nn.Linear(d, d)
        self.g = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        h0 = self.inp(x)
        h1 = h0 + torch.tanh(self.f(h0))
        h2 = h1 + torch.tanh(self.g(h1 * torch.sigmoid(h0)))
        h3 = h2 + torch.tanh(self.k(h2))
        return self.head(h3)


class TwoTowerNet(nn.Module):
    """Two independent residual streams (separate inputs), concatenated at the end."""

    def __init__(self, d=32, d_in=16):
        super().__init__()
        self.a_in, self.b_in = nn.Linear(d_in, d), nn.Linear(d_in, d)
        self.a = nn.ModuleList(nn.Linear(d, d) for _ in range(2))
        self.b = nn.ModuleList(nn.Linear(d, d) for _ in range(2))
        self.head = nn.Linear(2 * d, 4)

    def forward(self, x, z):
        ha, hb = self.a_in(x), self.b_in(z)
        for f in self.a:
            ha = ha + torch.relu(f(ha))
        for f in self.b:
            hb = hb + torch.relu(f(hb))
        return self.head(torch.cat([ha, hb], dim=-1))


class PlainMLP(nn.Module):
    def __init__(self, d=32, d_in=16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, d), nn.ReLU(), nn.Linear(d, 4))

    def forward(self, x):
        return self.net(x)


TOYS = types.SimpleNamespace(
    PreNormMLP=PreNormMLP, PostNormNet=PostNormNet, NotResidualNet=NotResidualNet,
    ScaledSkipNet=ScaledSkipNet, NonDominatedNet=NonDominatedNet, TwoTowerNet=TwoTowerNet,
    PlainMLP=PlainMLP,
)


@pytest.fixture(scope="session")
def toys():
    return TOYS


@pytest.fixture
def make_toy():
    """``make_toy(cls, **kw)`` -> (model in eval mode, capture input, fresh input) with fixed seeds."""

    def make(cls, *, seed=0, d_in=16, **kw):
        torch.manual_seed(seed)
        model = cls(**kw).eval()
        g = torch.Generator().manual_seed(100 + seed)
        x = torch.randn(BATCH, SEQ, kw.get("d", 32) if cls is NotResidualNet else d_in, generator=g)
        x2 = torch.randn(BATCH, SEQ, x.shape[-1], generator=g)
        return model, x, x2

    return make
