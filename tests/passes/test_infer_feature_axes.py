"""infer_feature_axes: each site's feature axis comes from what its branch contracts or normalises, not from the
stream's rank or "a conv somewhere in the branch". The graph does not change; the rewritten model is exact at
shapes the capture never saw (a wrong axis sizes the connection by the sequence or the image and breaks there)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hc_rewrite
from hc_rewrite.capture import capture
from hc_rewrite.passes import find_residual_sites, infer_feature_axes, remove_metadata_asserts
from hc_rewrite.zoo_handwritten import AttnBlock, ConvFFN, MixerBlock, PosConv, ResBlock

from ..helpers import rel_err


def _sites(model, x):
    gm = capture(model, (x,)).gm
    remove_metadata_asserts(gm)
    sites = find_residual_sites(gm)
    before = [(n.op, str(n.target), n.name) for n in gm.graph.nodes]
    infer_feature_axes(gm, sites)
    assert [(n.op, str(n.target), n.name) for n in gm.graph.nodes] == before  # analysis only
    return sites


class Tokens(nn.Module):
    """A token stream [B, T, C] whose branches hold convolutions: a positional conv and ConvFFN."""

    def __init__(self, dim=16):
        super().__init__()
        self.pos, self.ffn, self.ln = PosConv(dim), ConvFFN(dim), nn.LayerNorm(dim)

    def forward(self, x):
        x = x + self.pos(x)
        return x + self.ffn(self.ln(x))


class ChannelsFirstWithLinears(nn.Module):
    """A conv stream [B, C, H, W] whose attention block permutes to tokens and uses Linear layers."""

    def __init__(self, ch=16):
        super().__init__()
        self.res, self.attn = ResBlock(ch), AttnBlock(ch)

    def forward(self, x):
        return self.attn(self.res(x))


class ConvNeXtBlock(nn.Module):
    """Depthwise conv (acts on every channel alike), then permute, LayerNorm over C, Linear."""

    def __init__(self, ch=16):
        super().__init__()
        self.dw, self.ln, self.fc = nn.Conv2d(ch, ch, 7, padding=3, groups=ch), nn.LayerNorm(ch), nn.Linear(ch, ch)

    def forward(self, x):
        return x + self.fc(self.ln(self.dw(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)


class TwoAxes(nn.Module):
    """One branch contracts the channels, the other the tokens, no norm to tell: ambiguous."""

    def __init__(self, t=6, c=16):
        super().__init__()
        self.fc_c, self.fc_t = nn.Linear(c, c), nn.Linear(t, t)

    def forward(self, x):
        return x + self.fc_c(x) * self.fc_t(x.transpose(1, 2)).transpose(1, 2)


def _rewrite_exact(model, x, x2):
    new = hc_rewrite.rewrite(model, (x,), variant="mhc", n=4)
    with torch.no_grad():
        assert rel_err(model(x2), new(x2)) <= 1e-5
    return new


def test_token_stream_with_convs_is_channels_last():
    torch.manual_seed(0)
    model, x = Tokens().eval(), torch.randn(2, 8, 16)
    sites = _sites(model, x)
    assert len(sites) == 2 and all(not s.reason and not s.channel_first for s in sites)
    new = _rewrite_exact(model, x, torch.randn(3, 13, 16))  # another batch and length
    assert [s.width for s in new.hc_report.streams] == [16]


def test_channels_first_stream_with_linears_inside():
    torch.manual_seed(0)
    model, x = ChannelsFirstWithLinears().eval(), torch.randn(2, 16, 6, 6)
    sites = _sites(model, x)
    assert len(sites) == 2 and all(not s.reason and s.channel_first for s in sites)
    new = _rewrite_exact(model, x, torch.randn(3, 16, 9, 5))
    assert [(s.width, s.layout) for s in new.hc_report.streams] == [(16, "channels-first")]


def test_depthwise_conv_then_channels_last_norm():
    torch.manual_seed(0)
    model, x = ConvNeXtBlock().eval(), torch.randn(2, 16, 8, 8)
    (site,) = _sites(model, x)
    assert site.channel_first and not site.reason
    _rewrite_exact(model, x, torch.randn(3, 16, 12, 10))


def test_norm_names_the_axis_when_the_branch_contracts_tokens():
    torch.manual_seed(0)
    model, x = MixerBlock(tokens=6, dim=16).eval(), torch.randn(2, 6, 16)
    sites = _sites(model, x)
    assert len(sites) == 2 and all(not s.reason and not s.channel_first for s in sites)
    _rewrite_exact(model, x, torch.randn(5, 6, 16))


def test_ambiguous_axis_is_refused_with_the_dimensions():
    model, x = TwoAxes().eval(), torch.randn(2, 6, 16)
    (site,) = _sites(model, x)
    assert "ambiguous feature axis" in site.reason and "1, 2" in site.reason
    with pytest.raises(hc_rewrite.NoResidualStreamError, match="ambiguous feature axis"):
        hc_rewrite.rewrite(model, (x,))


class ChannelAttention(nn.Module):
    """Attention across channels (the channels are the "tokens"): the branch contracts only the token axis,
    whose size is the input's sequence length."""

    def forward(self, x):
        q = x.transpose(1, 2)  # [B, C, T]
        return x + F.scaled_dot_product_attention(q, q, q).transpose(1, 2)


def test_feature_axis_of_dynamic_size_is_refused():
    (site,) = _sites(ChannelAttention(), torch.randn(2, 7, 16))
    assert "depends on the input" in site.reason and "dimension 1" in site.reason


class EinsumRMS(nn.Module):
    """``nn.RMSNorm`` (``aten.rms_norm``) and an einsum projection: both read as votes for the last axis."""

    def __init__(self, c=16):
        super().__init__()
        self.norm, self.w = nn.RMSNorm(c), nn.Parameter(torch.randn(c, c) / 4)
        self.norm2 = nn.RMSNorm(c)

    def forward(self, x):
        x = x + torch.einsum("btc,cd->btd", self.norm(x), self.w)
        return x + torch.einsum("btc,dc->btd", x, self.w)


class CumsumMix(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        return self.fc(torch.cumsum(x, dim=1))


class UnreadFirstOp(nn.Module):
    """The branch starts with an op the walk does not read (``cumsum``): the static last dim is the guess."""

    def __init__(self):
        super().__init__()
        self.mix = CumsumMix()

    def forward(self, x):
        return x + self.mix(x)


def test_rms_norm_einsum_and_the_static_guess():
    torch.manual_seed(0)
    for model in (EinsumRMS().eval(), UnreadFirstOp().eval()):
        x = torch.randn(2, 6, 16)
        sites = _sites(model, x)
        assert sites and all(not s.reason and not s.channel_first for s in sites), [s.reason for s in sites]
        _rewrite_exact(model, x, torch.randn(3, 9, 16))
