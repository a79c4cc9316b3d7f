"""hc_rewrite.ops.cpu_sinkhorn: the C++ Sinkhorn kernel builds here, equals the reference (values and gradients,
both of its paths, any token count and layout), and is what a compiled mHC model runs on the CPU: once forward and
once backward per site, its output kept for backward rather than recomputed."""
from __future__ import annotations

import copy

import pytest
import torch

import hc_rewrite
from benchmarks.e2e import GPTStack
from hc_rewrite.ops import cpu_sinkhorn, fusible
from hc_rewrite.ops import reference as ref

from .helpers import CountingBackend, moved_copy, rel_err


def _logits(tokens, n, scale, seed, adjacent):
    """fp64 logits ``[tokens, n, n]`` and their fp32 copy, a slice of a wider matrix as the projection hands it
    (``adjacent``: tokens adjacent in memory, the narrow product's layout; else rows of contiguous tokens)."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(tokens, 2 * n + n * n + 1, generator=g, dtype=torch.float64) * scale
    if adjacent:
        wide = wide.t().contiguous().t()
    cols = slice(2 * n, 2 * n + n * n)
    return wide[:, cols].reshape(tokens, n, n), wide.float()[:, cols].reshape(tokens, n, n)


def _check(z64, z32, iters, atol):
    z64 = z64.detach().requires_grad_(True)
    want = ref.sinkhorn_log(z64, iters)
    probe = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want_grad = torch.autograd.grad(want, z64, probe)[0]
    z32 = z32.detach().requires_grad_(True)
    got = cpu_sinkhorn.sinkhorn(z32, iters)
    got_grad = torch.autograd.grad(got, z32, probe.float())[0]
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=0)
    torch.testing.assert_close(got_grad.double(), want_grad, atol=atol * max(1.0, want_grad.abs().max().item()),
                               rtol=0)


def test_kernel_builds():
    """No compiler, no kernel: that is a failure here, not a skip (the tiled form would hide it)."""
    assert cpu_sinkhorn.available()


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("tokens", [1, 15, 16, 37])
@pytest.mark.parametrize("adjacent", [True, False])
def test_matches_the_reference(n, tokens, adjacent):
    """Logits within the kernel's linear range (its fast path) and far beyond it (the log-space path); token counts
    below, at and past one vector; both layouts."""
    for scale, seed in ((1.5, n * 100 + tokens), (40.0, n * 100 + tokens + 1)):
        z64, z32 = _logits(tokens, n, scale, seed, adjacent)
        _check(z64, z32, 20, atol=5e-6)


def test_a_tile_with_both_paths_and_infinite_logits():
    """One token out of range sends its whole tile down the log-space path; ``-inf`` logits (not a whole row or
    column) are zero entries there as in the reference; other tiles stay on the linear path."""
    z64, _ = _logits(40, 4, 1.0, 7, adjacent=False)
    z64 = z64.clone()
    z64[3] *= 80.0
    z64[20, 0, 1] = float("-inf")
    _check(z64, z64.float(), 20, atol=5e-6)
    assert torch.isfinite(cpu_sinkhorn.sinkhorn(z64.float(), 20)).all()


def test_other_dtypes_run_the_reference():
    z64, _ = _logits(9, 3, 2.0, 3, adjacent=True)
    torch.testing.assert_close(cpu_sinkhorn.sinkhorn(z64, 7), ref.sinkhorn_log(z64, 7), atol=0, rtol=0)


def test_fusible_sinkhorn_picks_the_kernel_for_fp32_cpu(monkeypatch):
    calls = []
    z32 = torch.randn(5, 4, 4)
    run = cpu_sinkhorn._run
    monkeypatch.setattr(cpu_sinkhorn, "_run", lambda *a: calls.append(a) or run(*a))
    fusible.sinkhorn(z32, 5)
    fusible.sinkhorn(z32.double(), 5)  # fp64: the tiled form
    assert len(calls) == 1


def test_compiles_with_dynamic_token_counts():
    """Under ``torch.compile(dynamic=True)`` one graph serves every token count (the fake output's strides are
    symbolic in it), with the reference's values."""
    torch._dynamo.reset()
    backend = CountingBackend("inductor")
    f = torch.compile(lambda z: cpu_sinkhorn.sinkhorn(z * 1.0, 5), dynamic=True, backend=backend)
    g = torch.Generator().manual_seed(4)
    for tokens in (37, 48, 5):
        z = torch.randn(2, tokens, 3, 3, generator=g)
        torch.testing.assert_close(f(z), ref.sinkhorn_log(z, 5), atol=1e-6, rtol=1e-6)
    assert backend.graphs == 1


def test_compiled_mhc_model_runs_the_kernel_once_each_way_per_site():
    """Plain ``torch.compile`` of a rewritten mHC model: every site with ``H_res`` runs the kernel once forward and
    once backward (the output is saved, not recomputed), with eager's values and gradients."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32)
    new = moved_copy(hc_rewrite.rewrite(GPTStack(32, 2), (x,), variant="mhc", n=4), 1)
    twin = copy.deepcopy(new)
    calls = {"forward": 0, "backward": 0}
    orig = cpu_sinkhorn._run

    def counting(logits, grad, iters):
        calls["forward" if grad is None else "backward"] += 1
        return orig(logits, grad, iters)

    torch._dynamo.reset()
    compiled = torch.compile(new, fullgraph=True)
    probe = torch.randn(compiled(x).shape)  # compiled first: count one step
    cpu_sinkhorn._run = counting
    try:
        out = compiled(x)
        (out * probe).sum().backward()
    finally:
        cpu_sinkhorn._run = orig
    want = twin(x)
    (want * probe).sum().backward()
    sites = sum(1 for m in new.modules() if getattr(m, "b_res", None) is not None)
    assert sites > 0 and calls == {"forward": sites, "backward": sites}
    assert rel_err(out, want) <= 1e-5
    grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (twin, new)]
    assert rel_err(*grads) <= 1e-5
