"""Packed forward passes: many windows in one row, each attending only to itself.

A padded batch runs every window at the length of the longest; a packed batch concatenates the
windows into one row of exactly their total length, so no FLOP is spent on padding. Each window
keeps its own positions (0, 1, ...) for the rotary embedding, and attention stays inside it: the
cumulative lengths `cu_seq_lens` delimit the windows (the flash-attention "varlen" convention).

The attention runs through a HuggingFace attention function registered under `PACKED`; while
`packed_attention(model)` is active the model's config names it, so HF builds no mask (an
unregistered mask type) and hands this function the query, key and value of the whole row plus
the `cu_seq_lens_q` / `max_length_q` keywords passed to the model's forward.
- On CUDA in bf16/fp16 it is `torch.nn.attention.varlen.varlen_attn` (flash attention with
  cumulative lengths, grouped-query heads and sliding windows natively).
- Elsewhere (the CPU, fp32) it is scaled-dot-product attention per window: the same function,
  the reference the tests check the whole packing against.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

PACKED = "codelen_packed"

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.10
    varlen_attn = None


def _window_mask(length: int, sliding_window: int, device: torch.device) -> torch.Tensor:
    """Causal mask where position i sees positions (i - sliding_window, i]: HF's sliding window."""
    i = torch.arange(length, device=device)
    distance = i[:, None] - i[None, :]
    return (distance >= 0) & (distance < sliding_window)


def _attention_per_window(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: list[int],
    scaling: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    """(T, H, D) query and (T, Hkv, D) key/value; one causal SDPA call per window."""
    out = torch.empty_like(query)
    gqa = query.shape[1] != key.shape[1]
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        q, k, v = (t[start:end].transpose(0, 1)[None] for t in (query, key, value))
        if sliding_window is not None and end - start > sliding_window:
            mask = _window_mask(end - start, sliding_window, query.device)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
        out[start:end] = o[0].transpose(0, 1)
    return out


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """HF attention-function signature: (1, H, T, D) inputs, (1, T, H, D) output."""
    if softcap is not None:
        raise ValueError("packed attention does not support attention logit soft-capping")
    cu_seq_lens = kwargs["cu_seq_lens_q"]
    max_length = kwargs["max_length_q"]
    assert isinstance(cu_seq_lens, torch.Tensor) and isinstance(max_length, int)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, D)
    if q.is_cuda and varlen_attn is not None and q.dtype in (torch.bfloat16, torch.float16):
        # Flash attention's window (left, 0) sees left + 1 positions; HF's window W sees W.
        window = (-1, 0) if sliding_window is None else (sliding_window - 1, 0)
        out = varlen_attn(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            cu_seq_lens,
            cu_seq_lens,
            max_length,
            max_length,
            scale=scaling,
            window_size=window,
            enable_gqa=q.shape[1] != k.shape[1],
        )
    else:
        bounds = kwargs.get("cu_seq_lens_host")
        if not isinstance(bounds, list):
            bounds = cu_seq_lens.tolist()
        out = _attention_per_window(q, k, v, bounds, scaling, sliding_window)
    return out[None], None


AttentionInterface.register(PACKED, packed_attention_forward)


@contextmanager
def packed_attention(model: torch.nn.Module) -> Iterator[None]:
    """Route the model's attention through `packed_attention_forward` for the duration.

    Callers serialize forwards of one model (LMCompressor holds a lock), since the config is shared.
    """
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = PACKED
    try:
        yield
    finally:
        config._attn_implementation = previous
