"""hc_rewrite.production against the production modules in ``transformers`` themselves (DeepSeek-V4, GLM-5-Next,
Hunyuan V4), random weights, fp32: coefficients, collapsed branch input, site output and head, forward and
gradients; and the parameter mapping between their layout and ours."""
from __future__ import annotations

import pytest
import torch
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as dsv4
from transformers.models.glm5_next import modeling_glm5_next as glm5
from transformers.models.hy_v4 import modeling_hy_v4 as hyv4

from hc_rewrite import production
from hc_rewrite.ops import reference as ref
from hc_rewrite.variants.mhc import MHCParams

N, D = 4, 8


def _randomise(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return module


def _stream(seed=1, dtype=torch.float32):
    """A widened stream ``[2, 3, N, D]`` that requires grad and a branch output ``[2, 3, D]``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(2, 3, N, D, generator=g).to(dtype).requires_grad_()
    return w, torch.randn(2, 3, D, generator=g).to(dtype)


def _close_with_grads(theirs, ours, inputs, tol=1e-6):
    """Forward outputs equal, and the gradients of one random projection of them w.r.t. ``inputs``."""
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)
    g = torch.Generator().manual_seed(7)
    weights = [torch.randn(t.shape, generator=g) for t in theirs]
    grads_theirs = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, theirs)), inputs)
    grads_ours = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, ours)), inputs)
    for a, b in zip(grads_theirs, grads_ours):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model", ["deepseek_v4", "glm5_next"])
def test_mhc_connection_parity(model):
    if model == "deepseek_v4":
        config = dsv4.DeepseekV4Config(hidden_size=D, hc_mult=N, rms_norm_eps=1e-5, hc_eps=1e-4)
        module = _randomise(dsv4.DeepseekV4HyperConnection(config))
    else:
        config = glm5.Glm5NextTextConfig(hidden_size=D, hc_mult=N, rms_norm_eps=1e-5, hc_eps=1e-4)
        module = _randomise(glm5.Glm5NextTextHyperConnection(config))
    w, y = _stream()
    post, comb, collapsed = module(w)
    out = post.unsqueeze(-1) * y.unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), w)

    h_pre, h_post, h_res = production.deepseek_v4_coeffs(
        w, module.fn, module.base, module.scale, rms_eps=config.rms_norm_eps, hc_eps=config.hc_eps,
        iters=config.hc_sinkhorn_iters)
    ours = (h_post, h_res.transpose(-1, -2), ref.stream_pre(w, h_pre), ref.stream_post(w, y, h_post, h_res))
    _close_with_grads((post, comb, collapsed, out), ours, (w, module.fn, module.base, module.scale))


def test_hy_v4_connection_parity():
    config = hyv4.HYV4Config(hidden_size=D, hc_mult=N, rms_norm_eps=1e-5, hc_eps=1e-4, hc_magnitude=1.5)
    module = _randomise(hyv4.HYV4HyperConnection(config))
    w, y = _stream()
    post, collapsed = module(w)
    h_pre, h_post = production.hy_v4_coeffs(w, module.fn, module.base, module.scale, magnitude=1.5,
                                            rms_eps=config.rms_norm_eps, hc_eps=config.hc_eps)
    ours = (h_post, ref.stream_pre(w, h_pre), ref.stream_post(w, y, h_post, None))
    theirs = (post, collapsed, post.unsqueeze(-1) * y.unsqueeze(-2) + w)
    _close_with_grads(theirs, ours, (w, module.fn, module.base, module.scale))


@pytest.mark.parametrize("model", ["deepseek_v4", "hy_v4", "glm5_next"])
def test_head_parity(model):
    w, _ = _stream()
    if model == "glm5_next":  # the mean, as ours
        _close_with_grads((glm5.Glm5NextTextHyperHead()(w),), (ref.reduce_stream(w),), (w,))
        return
    if model == "deepseek_v4":
        config = dsv4.DeepseekV4Config(hidden_size=D, hc_mult=N, rms_norm_eps=1e-5, hc_eps=1e-4)
        head, norm_first = _randomise(dsv4.DeepseekV4HyperHead(config)), True
    else:
        config = hyv4.HYV4Config(hidden_size=D, hc_mult=N, rms_norm_eps=1e-5, hc_eps=1e-4)
        head, norm_first = _randomise(hyv4.HYV4HyperHead(config)), False
    ours = production.hyper_head(w, head.hc_fn, head.hc_base, head.hc_scale, rms_eps=config.rms_norm_eps,
                                 hc_eps=config.hc_eps, norm_first=norm_first)
    _close_with_grads((head(w),), (ours,), (w, head.hc_fn, head.hc_base, head.hc_scale))


def _perturbed_params(seed=0):
    params = MHCParams(N, D, dynamic=True, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in params.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    return params


def test_parameter_mapping_round_trip_and_their_module_reads_it():
    params = _perturbed_params()
    theirs = production.to_deepseek_v4(params)
    back = production.from_deepseek_v4(theirs["fn"], theirs["base"], theirs["scale"], D)
    for (name, a), (_, b) in zip(params.named_parameters(), back.named_parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    # their module with the mapped parameters computes their formula on our numbers: the same logits
    module = dsv4.DeepseekV4HyperConnection(dsv4.DeepseekV4Config(hidden_size=D, hc_mult=N))
    with torch.no_grad():
        for k, v in theirs.items():
            getattr(module, k).copy_(v)
    w, _ = _stream()
    post, comb, _ = module(w)
    h_pre, h_post, h_res = ref.mhc_coeffs(w, params.phi, params.alpha, params.b_pre, params.b_post, params.b_res)
    torch.testing.assert_close(post, h_post, rtol=1e-5, atol=1e-5)  # same formula for H_post
    # H_res: their Sinkhorn (softmax + eps, ends on the other axis) vs ours (log domain): close, not equal
    assert (comb.transpose(-1, -2) - h_res).abs().max() < 5e-3


def test_static_and_last_site_map_with_zero_dynamic_terms():
    last = MHCParams(N, D, dynamic=False, has_res=False)
    theirs = production.to_deepseek_v4(last)
    assert not theirs["fn"].any() and not theirs["scale"].any() and not theirs["base"][2 * N:].any()
    with pytest.raises(ValueError, match="not a DeepSeek-V4 connection"):
        production.from_deepseek_v4(theirs["fn"][:, :-1], theirs["base"], theirs["scale"], D)
