"""Property test: random residual networks are either rewritten and equivalent at init, or refused
with a reason — never a wrong model.

Round 2 cases: convolutions inside token branches (ConvFFN, a positional conv), channels-first blocks on the
transposed stream (conv branches, and branches that permute to channels-last for a Linear), side inputs of the
stream's shape shared by every block (DETR-style ``x + pos``, one attention bias added to every block's scores),
and layouts alternating from block to block."""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import hc_rewrite
from hc_rewrite.errors import NoResidualStreamError
from hc_rewrite.variants import NAMES as VARIANTS


class Branch(nn.Module):
    def __init__(self, kind: str, d: int):
        super().__init__()
        self.kind = kind
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.dw = nn.Conv1d(2 * d, 2 * d, 3, padding=1, groups=2 * d)
        self.conv = nn.Conv1d(d, d, 3, padding=1, groups=2)
        self.gn = nn.GroupNorm(2, d)

    def forward(self, x, bias=None):
        if self.kind == "convffn":  # tokens [B, T, C]: Linear, depthwise conv over the tokens, Linear
            h = self.fc1(self.norm(x))
            return self.fc2(torch.nn.functional.gelu(self.dw(h.transpose(1, 2)).transpose(1, 2)))
        if self.kind == "posconv":  # tokens: a grouped conv over the transposed stream, no Linear at all
            return torch.nn.functional.gelu(self.conv(x.transpose(1, 2))).transpose(1, 2)
        if self.kind == "cf_conv":  # channels first [B, C, T]
            return self.conv(torch.relu(self.gn(x)))
        if self.kind == "cf_linear":  # channels first, permuted to channels last for a Linear
            return self.fc2(torch.relu(self.fc1(self.gn(x).transpose(1, 2)))).transpose(1, 2)
        if self.kind == "mlp":
            return self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))
        if self.kind == "linear":
            return self.fc1(x)[..., : x.shape[-1]]
        # attention-like: softmax(x x^T) x, then a projection
        h = self.norm(x)
        scores = h @ h.transpose(-1, -2) / h.shape[-1] ** 0.5
        if bias is not None:
            scores = scores + bias  # one bias, shared by every block (MPNet / T5 style)
        att = torch.softmax(scores, dim=-1)
        return self.fc2(torch.cat([att @ h, h], dim=-1))


class Block(nn.Module):
    def __init__(self, kind, d, post_norm, link, reads_prev, side_input=False):
        super().__init__()
        self.channels_first = kind.startswith("cf_")
        self.side_input = side_input
        self.branch = Branch(kind, d)
        self.post = nn.LayerNorm(d) if post_norm else None
        self.link = link
        self.reads_prev = reads_prev
        self.drop = nn.Dropout(0.1)

    def forward(self, x, prev, pos, bias):
        if self.channels_first:  # this block works on [B, C, T]: the layout alternates along the net
            return self.branch(x.transpose(1, 2)).add(x.transpose(1, 2)).transpose(1, 2)
        y = self.branch(x + pos if self.side_input else x, bias)
        if self.reads_prev and prev is not None:
            y = y + 0.5 * torch.tanh(prev)  # the branch also reads an earlier stream value
        x = x + y
        if self.post is not None:
            x = self.post(x)
        if self.link == "dropout":
            x = self.drop(x)
        elif self.link == "relu":
            x = torch.relu(x)
        elif self.link == "cast":
            x = x.to(torch.float32).contiguous()
        return x


class RandomNet(nn.Module):
    def __init__(self, blocks, d, widen_at, extra_reads):
        super().__init__()
        self.embed = nn.Linear(6, d)
        self.blocks = nn.ModuleList([Block(d=d, **b) for b in blocks])
        self.widen_at = widen_at
        self.widen = nn.Linear(d, d)  # shape-preserving "transition": ends one stream, starts another
        self.pos = nn.Linear(6, d)  # side inputs computed once from the input, read by every block
        self.extra_reads = extra_reads
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.embed(x)
        pos = torch.sin(self.pos(x))  # [B, T, C]: the stream's own shape, not a stream
        bias = 0.1 * pos @ pos.transpose(-1, -2)  # [B, T, T]
        prev, outs = None, []
        for i, blk in enumerate(self.blocks):
            if i == self.widen_at:
                h = torch.tanh(self.widen(h))
            h, prev = blk(h, prev, pos, bias), h
            if i in self.extra_reads:
                outs.append(h[..., :3] * 1.0)
        return self.head(h), outs


block_st = st.fixed_dictionaries({
    "kind": st.sampled_from(["mlp", "linear", "attn", "convffn", "posconv", "cf_conv", "cf_linear"]),
    "post_norm": st.booleans(),
    "link": st.sampled_from([None, "dropout", "relu", "cast"]),
    "reads_prev": st.booleans(),
    "side_input": st.booleans(),
})


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    blocks=st.lists(block_st, min_size=1, max_size=4),
    widen_at=st.integers(min_value=-1, max_value=3),
    extra=st.sets(st.integers(min_value=0, max_value=3), max_size=2),
    variant=st.sampled_from(VARIANTS),
    dynamic=st.booleans(),
    seed=st.integers(min_value=0, max_value=2**16),
    form=st.sampled_from(["module", "graph"]),
)
def test_random_residual_net_is_rewritten_and_equivalent_or_refused(blocks, widen_at, extra, variant, dynamic, seed,
                                                                    form):
    torch.manual_seed(seed)
    d = 8
    model = RandomNet(blocks, d, widen_at, sorted(extra)).eval()
    x = torch.randn(2, 5, 6)
    try:
        new = hc_rewrite.rewrite(model, (x,), variant=variant, n=2 if variant != "frac" else 4, dynamic=dynamic, form=form)
    except NoResidualStreamError as e:
        assert e.report is not None
        assert all(s.reason for s in e.report.sites)  # every candidate refused says why
        return
    rep = new.hc_report
    assert rep.rewritten
    for s in rep.sites:
        assert s.rewritten or s.reason, s
    x2 = torch.randn(3, 7, 6)
    with torch.no_grad():
        ref_out, ref_reads = model(x2)
        out, reads = new(x2)
    scale = ref_out.abs().max().clamp_min(1e-6)
    assert ((out - ref_out).abs().max() / scale) <= 1e-5
    assert len(reads) == len(ref_reads)
    for a, b in zip(reads, ref_reads):
        assert ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)) <= 1e-5
