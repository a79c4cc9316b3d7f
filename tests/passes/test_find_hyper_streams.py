"""find_hyper_streams: a stream the model already widens itself ([B, S, n, D] through its blocks) is found by its
shape; the graph is only read. The rewrite refuses such a model with the reason (AlreadyHyperConnectedError)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import transformers
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as dsv4

import hc_rewrite
from hc_rewrite.passes.find_hyper_streams import find_hyper_streams

from ..conftest import PreNormMLP
from ..helpers import analysed


class DeepseekV4StyleNet(nn.Module):
    """A user's model built from transformers' DeepSeek-V4 connection modules: the stream is [B, S, 4, D]."""

    def __init__(self, d=16, layers=2):
        super().__init__()
        config = dsv4.DeepseekV4Config(hidden_size=d, hc_mult=4)
        self.embed = nn.Linear(8, d)
        self.hcs = nn.ModuleList(dsv4.DeepseekV4HyperConnection(config) for _ in range(layers))
        self.mlps = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d)) for _ in range(layers))
        self.head = dsv4.DeepseekV4HyperHead(config)
        for p in self.parameters():
            nn.init.normal_(p, std=0.1)

    def forward(self, x):
        h = self.embed(x).unsqueeze(2).expand(-1, -1, 4, -1).contiguous()
        for hc, mlp in zip(self.hcs, self.mlps):
            post, comb, collapsed = hc(h)
            h = post.unsqueeze(-1) * mlp(collapsed).unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), h)
        return self.head(h)


def _hy_v4():
    config = transformers.HYV4Config(
        vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, hc_mult=4,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, mlp_layer_types=["dense", "dense"])
    torch.manual_seed(0)
    return transformers.HYV4ForCausalLM(config).eval(), (torch.randint(0, 64, (2, 8)),)


def test_finds_the_widened_stream_of_a_deepseek_v4_style_model():
    model, x = DeepseekV4StyleNet().eval(), torch.randn(2, 5, 8)
    ctx = analysed(model, (x,))
    ops_before = [(n.op, n.target) for n in ctx.gm.graph.nodes]
    (found,) = find_hyper_streams(ctx.gm)
    assert [(n.op, n.target) for n in ctx.gm.graph.nodes] == ops_before
    assert (found.n, found.width, found.collapses) == (4, 16, 3)  # 2 blocks + the head
    assert not ctx.sites  # no skip + F(skip) anywhere


def test_a_plain_residual_model_has_none():
    model, x = PreNormMLP().eval(), torch.randn(2, 5, 16)
    assert find_hyper_streams(analysed(model, (x,)).gm) == []


def test_a_broadcast_read_once_is_not_a_stream():
    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(16, 16)

        def forward(self, x):
            w = x.unsqueeze(2).expand(-1, -1, 4, -1)
            return self.f(x + (w * torch.arange(4.0).view(4, 1)).sum(2))

    assert find_hyper_streams(analysed(Broadcast().eval(), (torch.randn(2, 5, 16),)).gm) == []


@pytest.mark.parametrize("which", ["deepseek_v4_style", "hy_v4"])
def test_report_says_so_and_rewrite_refuses(which):
    model, args = (DeepseekV4StyleNet().eval(), (torch.randn(2, 5, 8),)) if which != "hy_v4" else _hy_v4()
    rep = hc_rewrite.report(model, args)
    assert rep.existing and "copies of width" in rep.existing[0] and "already hyper-connected" in str(rep)
    with pytest.raises(hc_rewrite.AlreadyHyperConnectedError, match="already carries hyper-connections"):
        hc_rewrite.rewrite(model, args)
