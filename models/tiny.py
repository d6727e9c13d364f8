"""A tiny randomly initialised causal LM, for tests that need real model math in milliseconds.

Same code path as the real models (a LlamaForCausalLM behind `LMCompressor`), with a lossless
byte-level tokenizer. The init scale is large on purpose: with the usual 0.02 the predictions are
almost uniform and barely depend on context, so tests of windows and batching would pass even if
the wrong context were used.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from models.lm import LMCompressor

TINY_MODEL_ID = "tiny-random"
_SPECIALS = 3  # 0 pad, 1 BOS, 2 EOS; byte b has id b + 3


class ByteTokenizer:
    """Lossless UTF-8 byte tokenizer: one token per byte, id = byte + 3, BOS id 1."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    vocab_size = 256 + _SPECIALS

    def encode(self, text: str, add_special_tokens: bool = False, split_special_tokens: bool = True) -> list[int]:
        ids = [b + _SPECIALS for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, token_ids: list[int], clean_up_tokenization_spaces: bool = False) -> str:
        return bytes(i - _SPECIALS for i in token_ids if i >= _SPECIALS).decode("utf-8", errors="replace")


def tiny_model(seed: int = 0, max_positions: int = 512, kv_heads: int = 2) -> LlamaForCausalLM:
    """A 2-layer, 64-wide Llama (4 query heads) with deterministic random weights."""
    config = LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        initializer_range=0.4,
        tie_word_embeddings=False,
        bos_token_id=ByteTokenizer.bos_token_id,
        eos_token_id=ByteTokenizer.eos_token_id,
        pad_token_id=ByteTokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(torch.float32).eval()


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the parameter names and bytes: the revision names the weights themselves."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


def tiny_compressor(
    context_tokens: int | None = None,
    stride: int | None = None,
    batch_tokens: int = 4096,
    seed: int = 0,
    max_positions: int = 512,
    kv_heads: int = 2,
    **engine: Any,
) -> LMCompressor:
    """`engine`: LMCompressor's engine settings (packing, prefix_reuse, prefix_cache_bytes, ...)."""
    model = tiny_model(seed=seed, max_positions=max_positions, kv_heads=kv_heads)
    return LMCompressor(
        model,
        ByteTokenizer(),
        model_id=TINY_MODEL_ID,
        revision=weights_sha256(model),
        context_tokens=context_tokens,
        stride=stride,
        batch_tokens=batch_tokens,
        description="tiny random Llama (2 layers, width 64) with a byte tokenizer, for tests",
        **engine,
    )
