"""Tiny randomly initialised models of every supported architecture, and a tokenizer for them."""

from __future__ import annotations

from functools import lru_cache

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

ARCHITECTURES = [
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gptj", "gpt_neox",
    "opt",
]

_CORPUS = (
    "The Eiffel Tower is located in Paris. Toko Yasuda plays the guitar. Danielle Darrieux speaks French. "
    "The capital of Italy is Rome. Michael Jordan plays basketball. The mother tongue of Thomas Joannes "
    "Stieltjes is Dutch. Apple was founded by Steve Jobs. Berlin is the capital of Germany. Piano music, "
    "London, Sweden, Spain, English, football, Microsoft, Google, Toyota, Nintendo, Tokyo, Canada."
)

VOCAB_SIZE = 320


@lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in memory on a few sentences (GPT-2 conventions, no BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return fast


def tiny_config(model_type: str, num_layers: int = 4):
    """A config of ``model_type`` with hidden size 32, MLP width 64, ``num_layers`` layers."""
    cfg = AutoConfig.for_model(model_type, vocab_size=VOCAB_SIZE)
    sizes = dict(
        hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, head_dim=8, n_embd=32, n_layer=num_layers, n_head=4, ffn_dim=64,
        word_embed_proj_dim=32, rotary_dim=4, n_positions=256, max_position_embeddings=256, n_inner=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, sliding_window=128,
    )
    for key, value in sizes.items():
        if hasattr(cfg, key) or key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(cfg, key, value)
    if model_type == "gpt2":
        cfg.n_inner = 64
    if model_type == "gptj":
        cfg.n_inner = 64
    if model_type == "gpt_neox":
        cfg.intermediate_size = 64
    return cfg


def tiny_model(model_type: str = "llama", num_layers: int = 4, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A randomly initialised model of ``model_type`` in eval mode (deterministic for a seed)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, num_layers), dtype=dtype)
    return model.eval()
