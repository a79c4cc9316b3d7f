"""Property test: random residual networks are either rewritten and equivalent at init, or refused
with a reason — never a wrong model."""
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

    def forward(self, x):
        if self.kind == "mlp":
            return self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))
        if self.kind == "linear":
            return self.fc1(x)[..., : x.shape[-1]]
        # attention-like: softmax(x x^T) x, then a projection
        h = self.norm(x)
        att = torch.softmax(h @ h.transpose(-1, -2) / h.shape[-1] ** 0.5, dim=-1)
        return self.fc2(torch.cat([att @ h, h], dim=-1))


class Block(nn.Module):
    def __init__(self, kind, d, post_norm, link, reads_prev):
        super().__init__()
        self.branch = Branch(kind, d)
        self.post = nn.LayerNorm(d) if post_norm else None
        self.link = link
        self.reads_prev = reads_prev
        self.drop = nn.Dropout(0.1)

    def forward(self, x, prev):
        y = self.branch(x)
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
        self.extra_reads = extra_reads
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.embed(x)
        prev, outs = None, []
        for i, blk in enumerate(self.blocks):
            if i == self.widen_at:
                h = torch.tanh(self.widen(h))
            h, prev = blk(h, prev), h
            if i in self.extra_reads:
                outs.append(h[..., :3] * 1.0)
        return self.head(h), outs


block_st = st.fixed_dictionaries({
    "kind": st.sampled_from(["mlp", "linear", "attn"]),
    "post_norm": st.booleans(),
    "link": st.sampled_from([None, "dropout", "relu", "cast"]),
    "reads_prev": st.booleans(),
})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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
