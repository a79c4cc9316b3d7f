"""Hand-written, user-style modules for what ``transformers`` lacks in the zoo: streams whose layout must be read
from the data flow, string padding, side inputs of the stream's own shape, and streams of alternating layout.

Each is written the way people write these blocks (no hc_rewrite-specific structure) and registered in
:data:`hc_rewrite.zoo.ZOO` by :func:`entries`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention over tokens ``[B, T, C]`` (SDPA)."""

    def __init__(self, dim: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, q_in=None, k_in=None):
        b, t, c = x.shape
        q_in = x if q_in is None else q_in
        k_in = x if k_in is None else k_in
        wq, wk, wv = self.qkv.weight.chunk(3)
        bq, bk, bv = self.qkv.bias.chunk(3)
        q, k, v = F.linear(q_in, wq, bq), F.linear(k_in, wk, bk), F.linear(x, wv, bv)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


# ----------------------------------------------------------------------------- U-Net with attention blocks
class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(4, ch), nn.Conv2d(ch, ch, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(4, ch), nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class AttnBlock(nn.Module):
    """Diffusion-U-Net attention block: channels-first in, Linear layers inside (via a permute to tokens)."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = nn.GroupNorm(4, ch)
        self.attn = Attention(ch)

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = self.norm(x).view(b, c, h * w).transpose(1, 2)
        return x + self.attn(tokens).transpose(1, 2).reshape(b, c, h, w)


class TokenBlock(nn.Module):
    """Transformer block on tokens ``[B, T, C]`` (pre-norm)."""

    def __init__(self, dim: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), Attention(dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class UNetWithAttention(nn.Module):
    """A small diffusion-style U-Net: ResBlocks and attention blocks at two resolutions, a skip concatenation."""

    def __init__(self, ch: int = 16):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList([ResBlock(ch), AttnBlock(ch)])
        self.downsample = nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1)
        self.mid = nn.ModuleList([ResBlock(2 * ch), AttnBlock(2 * ch), ResBlock(2 * ch)])
        self.upsample = nn.ConvTranspose2d(2 * ch, ch, 2, stride=2)
        self.up = nn.ModuleList([nn.Conv2d(2 * ch, ch, 1), ResBlock(ch), AttnBlock(ch)])
        self.conv_out = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for blk in self.down:
            h = blk(h)
        skip = h
        h = self.downsample(h)
        for blk in self.mid:
            h = blk(h)
        h = torch.cat([self.upsample(h), skip], dim=1)
        for blk in self.up:
            h = blk(h)
        return self.conv_out(h)


# ----------------------------------------------------------------------------- tokens with convolutions
class ConvFFN(nn.Module):
    """PVT-v2 / SegFormer style feed-forward: Linear, depthwise conv over the tokens, Linear."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.dw = nn.Conv1d(2 * dim, 2 * dim, 3, padding=1, groups=2 * dim)

    def forward(self, x):
        h = self.fc1(x)
        h = self.dw(h.transpose(1, 2)).transpose(1, 2)
        return self.fc2(F.gelu(h))


class PosConv(nn.Module):
    """wav2vec2 / CPVT positional convolution over tokens (a grouped conv, no Linear)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, padding=1, groups=4)

    def forward(self, x):
        return F.gelu(self.conv(x.transpose(1, 2))).transpose(1, 2)


class ConvFFNTransformer(nn.Module):
    """Token stream whose branches hold convolutions: a CPVT / wav2vec2-style positional conv ``x + conv(x)`` (no
    Linear at all) and ConvFFN blocks. The stream's feature axis is the last one, whatever the convs do."""

    def __init__(self, vocab: int = 128, dim: int = 32, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos_conv = PosConv(dim)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(ln1=nn.LayerNorm(dim), attn=Attention(dim),
                                                       ln2=nn.LayerNorm(dim), ffn=ConvFFN(dim)))
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        x = x + self.pos_conv(x)
        for blk in self.blocks:
            x = x + blk["attn"](blk["ln1"](x))
            x = x + blk["ffn"](blk["ln2"](x))
        return self.norm(x)


# ----------------------------------------------------------------------------- string padding
class SamePaddingNet(nn.Module):
    """Conv net whose residual blocks use ``padding="same"`` (``aten.conv2d.padding``), EfficientNet style."""

    def __init__(self, ch: int = 16, blocks: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, ch, 3, padding="same")
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(ch, ch, 3, padding="same"), nn.BatchNorm2d(ch), nn.ReLU(),
                          nn.Conv2d(ch, ch, 5, padding="same", groups=ch), nn.Conv2d(ch, ch, 1))
            for _ in range(blocks))

    def forward(self, x):
        x = self.stem(x)
        for blk in self.blocks:
            x = x + blk(x)
        return x.mean(dim=(2, 3))


# ----------------------------------------------------------------------------- side inputs of the stream's shape
class SharedBiasTransformer(nn.Module):
    """Two side inputs shared by every layer: a DETR-style positional embedding of the stream's own shape added
    to queries and keys (``x + pos``), and one learned attention bias added to every layer's scores."""

    def __init__(self, vocab: int = 128, dim: int = 32, layers: int = 3, heads: int = 4, max_len: int = 64):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.rel = nn.Embedding(2 * max_len, heads)
        self.max_len = max_len
        self.layers = nn.ModuleList(nn.ModuleDict(dict(ln=nn.LayerNorm(dim), qkv=nn.Linear(dim, 3 * dim),
                                                       out=nn.Linear(dim, dim), ln2=nn.LayerNorm(dim),
                                                       mlp=nn.Linear(dim, dim)))
                                    for _ in range(layers))

    def forward(self, input_ids):
        b, t = input_ids.shape
        x = self.embed(input_ids)
        positions = torch.arange(t, device=input_ids.device)
        pos = self.pos(positions)[None].expand(b, t, -1)
        rel = positions[None, :] - positions[:, None] + self.max_len
        bias = self.rel(rel).permute(2, 0, 1)[None]  # [1, H, T, T], computed once
        for layer in self.layers:
            h = layer["ln"](x)
            qk = h + pos
            c = h.shape[-1]
            wq, wk, wv = layer["qkv"].weight.chunk(3)
            q = F.linear(qk, wq).view(b, t, self.heads, -1).transpose(1, 2)
            k = F.linear(qk, wk).view(b, t, self.heads, -1).transpose(1, 2)
            v = F.linear(h, wv).view(b, t, self.heads, -1).transpose(1, 2)
            scores = q @ k.transpose(-1, -2) / (c // self.heads) ** 0.5
            scores = scores + bias
            y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c)
            x = x + layer["out"](y)
            x = x + layer["mlp"](F.gelu(layer["ln2"](x)))
        return x


# ----------------------------------------------------------------------------- alternating layouts
class AlternatingLayoutNet(nn.Module):
    """Streams of alternating layout: conv blocks on ``[B, C, H, W]``, then the same values as tokens
    ``[B, H*W, C]`` through transformer blocks, then back to ``[B, C, H, W]`` for more conv blocks. Each stream
    starts from the previous one's last value."""

    def __init__(self, ch: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, ch, 3, padding=1)
        self.conv1 = nn.ModuleList([ResBlock(ch), ResBlock(ch)])
        self.tokens = nn.ModuleList([TokenBlock(ch), TokenBlock(ch)])
        self.conv2 = nn.ModuleList([ResBlock(ch), ResBlock(ch)])

    def forward(self, x):
        x = self.stem(x)
        for blk in self.conv1:
            x = blk(x)
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        for blk in self.tokens:
            t = blk(t)
        x = t.transpose(1, 2).reshape(b, c, h, w)
        for blk in self.conv2:
            x = blk(x)
        return x


# ----------------------------------------------------------------------------- token mixing
class MixerBlock(nn.Module):
    """MLP-Mixer block: token mixing (LayerNorm over C, then Linear layers over the tokens) and channel mixing."""

    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens))
        self.channel_mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.token_mlp(self.ln1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.ln2(x))


class MLPMixer(nn.Module):
    """MLP-Mixer on 16x16 images in 4x4 patches (16 tokens; the token MLPs fix the image size)."""

    def __init__(self, dim: int = 32, layers: int = 2, patch: int = 4, image: int = 16):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.blocks = nn.Sequential(*(MixerBlock((image // patch) ** 2, dim) for _ in range(layers)))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        return self.norm(self.blocks(x)).mean(1)


class SameTensorTwoLayouts(nn.Module):
    """One tensor [B, 16, 16] read channels-first by conv blocks, then channels-last by Linear blocks, then
    channels-first again: each stream starts from the last value of the previous one."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = (nn.Conv1d(16, 16, 3, padding=1) for _ in range(3))
        self.l1, self.l2 = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        x = x + self.c1(x)
        x = x + self.c2(x)
        x = x + self.l1(x)
        x = x + self.l2(x)
        return x + self.c3(x)


# ----------------------------------------------------------------------------- a looped block
class LoopedTransformer(nn.Module):
    """Universal-Transformer style: one pre-norm block (attention + MLP) applied ``depth`` times per forward, the
    depth an attribute the user may change after building (``model.depth = 6``)."""

    def __init__(self, vocab: int = 128, dim: int = 32, depth: int = 3):
        super().__init__()
        self.depth = depth
        self.embed = nn.Embedding(vocab, dim)
        self.ln1, self.attn = nn.LayerNorm(dim), Attention(dim)
        self.ln2, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(),
                                                              nn.Linear(2 * dim, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for _ in range(self.depth):
            x = x + self.attn(self.ln1(x))
            x = x + self.mlp(self.ln2(x))
        return self.norm(x)


# ----------------------------------------------------------------------------- branches that read the stream in code
class FunctionalBlock(nn.Module):
    """A block whose branches read the stream in the block's own code before their first submodule: a weightless
    ``F.layer_norm`` in front of the attention, a scale in front of the MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.attn = Attention(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.scale = dim ** -0.5

    def forward(self, x):
        x = x + self.attn(F.layer_norm(x, x.shape[-1:]))
        return x + self.mlp(x * self.scale)


class FunctionalEntryNet(nn.Module):
    """Hand-written transformer whose branches enter through code, not through a submodule: a gated first layer
    in the top-level forward (``h + self.gate(torch.tanh(h))``), then :class:`FunctionalBlock` layers."""

    def __init__(self, vocab: int = 128, dim: int = 32, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.gate = nn.Linear(dim, dim)
        self.layers = nn.ModuleList(FunctionalBlock(dim) for _ in range(layers))

    def forward(self, input_ids):
        h = self.embed(input_ids)
        h = h + self.gate(torch.tanh(h))
        for layer in self.layers:
            h = layer(h)
        return F.rms_norm(h, h.shape[-1:])


def _image(default_size):
    def make(batch=2, seq=None, generator=None, size=None):
        size = size or default_size
        return (torch.randn(batch, 3, size, size, generator=generator),), {}
    return make


def _ids(batch=2, seq=8, generator=None):
    return (torch.randint(0, 128, (batch, seq), generator=generator),), {}


def _seeded(cls, **kw):
    def build():
        torch.manual_seed(0)
        return cls(**kw).eval()
    return build


def entries(ZooEntry) -> list:
    """The hand-written zoo entries (``ZooEntry`` passed in to avoid a circular import)."""
    E = ZooEntry
    img = {"batch": 3, "size": 24}
    return [
        E("unet_attention", "hand-written", _seeded(UNetWithAttention), _image(16), layers=3, other=img,
          notes="diffusion-style U-Net: ResBlocks + attention blocks that permute to tokens",
          tags=("conv", "linear-in-channels-first-branch")),
        E("convffn_transformer", "hand-written", _seeded(ConvFFNTransformer), _ids,
          notes="token stream with a positional conv and ConvFFN blocks", tags=("conv-in-token-branch",)),
        E("same_padding_convnet", "hand-written", _seeded(SamePaddingNet), _image(16), layers=3, other=img,
          notes='residual conv blocks with padding="same"', tags=("conv", "same-padding")),
        E("shared_bias_transformer", "hand-written", _seeded(SharedBiasTransformer), _ids, layers=3,
          notes="DETR-style x + pos on queries/keys and one attention bias shared by every layer",
          tags=("shared-side-input",)),
        E("mlp_mixer", "hand-written", _seeded(MLPMixer), _image(16), other={"batch": 3},
          notes="token-mixing MLPs contract the tokens after a LayerNorm over the channels",
          tags=("token-mixing",)),
        E("looped_transformer", "hand-written", _seeded(LoopedTransformer), _ids, layers=3,
          notes="one block applied depth times per forward (Universal-Transformer style)", tags=("looped",)),
        E("functional_entries", "hand-written", _seeded(FunctionalEntryNet), _ids, layers=3,
          notes="branches read the stream in code: tanh gate, weightless layer_norm, scale", tags=("functional",)),
        E("alternating_layouts", "hand-written", _seeded(AlternatingLayoutNet), _image(8), layers=6,
          other={"batch": 3, "size": 12}, notes="conv stream -> token stream -> conv stream",
          tags=("conv", "alternating-layouts")),
    ]
