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

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

PACKED = "codelen_packed"

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.10
    varlen_attn = None
# torch 2.10/2.11's varlen_attn has no grouped-query heads (enable_gqa came in 2.12): repeat K/V.
_VARLEN_PARAMS = set(inspect.signature(varlen_attn).parameters) if varlen_attn is not None else set()
_VARLEN_GQA = "enable_gqa" in _VARLEN_PARAMS
# The earliest varlen_attn took is_causal and no window_size: no sliding windows through it.
_VARLEN_WINDOWS = "window_size" in _VARLEN_PARAMS


@torch.compiler.disable  # a Python loop over windows: no graph (and no recompiles per count)
def _attention_per_window(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: list[int],
    scaling: float | None,
    sliding_window: int | None,
    bounds_k: list[int] | None = None,
) -> torch.Tensor:
    """(T, H, D) query and (Tk, Hkv, D) key/value; one SDPA call per window. Query window r is
    rows bounds[r]:bounds[r+1]; its keys are rows bounds_k[r]:bounds_k[r+1] (default: the same),
    of which the last ones belong to its queries (causal from the bottom right, as flash attention)."""
    out = torch.empty_like(query)
    gqa = query.shape[1] != key.shape[1]
    bounds_k = bounds if bounds_k is None else bounds_k
    for r in range(len(bounds) - 1):
        qa, qb, ka, kb = bounds[r], bounds[r + 1], bounds_k[r], bounds_k[r + 1]
        q = query[qa:qb].transpose(0, 1)[None]
        k, v = (t[ka:kb].transpose(0, 1)[None] for t in (key, value))
        offset = (kb - ka) - (qb - qa)  # keys before the first query: a prefix
        if offset == 0 and (sliding_window is None or qb - qa <= sliding_window):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
        else:
            mask = _causal_mask(qb - qa, kb - ka, sliding_window, query.device)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)
        out[qa:qb] = o[0].transpose(0, 1)
    return out


def _causal_mask(n_queries: int, n_keys: int, sliding_window: int | None, device: torch.device) -> torch.Tensor:
    """Query i is position n_keys - n_queries + i; it sees keys (position - sliding_window, position]."""
    position = torch.arange(n_keys - n_queries, n_keys, device=device)
    distance = position[:, None] - torch.arange(n_keys, device=device)[None, :]
    visible = distance >= 0
    return visible if sliding_window is None else visible & (distance < sliding_window)


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
    """HF attention-function signature: (1, H, T, D) inputs, (1, T, H, D) output.

    Extra keywords (passed to the model's forward, handed down by HF):
    - `cu_seq_lens_q`, `max_length_q` (and on the CPU `cu_seq_lens_host`): the windows;
    - `codelen_capture`: a dict that receives (keys, values) of this layer, (T, Hkv, D), by layer index;
    - `codelen_prefix`: a `PrefixRows`: each window attends to its prefix's rows first.
    """
    if softcap is not None:
        raise ValueError("packed attention does not support attention logit soft-capping")
    cu_seq_lens = kwargs["cu_seq_lens_q"]
    max_length = kwargs["max_length_q"]
    assert isinstance(cu_seq_lens, torch.Tensor) and isinstance(max_length, int)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, D)
    layer = getattr(module, "layer_idx", None)
    capture = kwargs.get("codelen_capture")
    if isinstance(capture, dict):
        capture[layer] = (k, v)
    prefix = kwargs.get("codelen_prefix")
    cu_k, max_k, bounds_k = cu_seq_lens, max_length, None
    if isinstance(prefix, PrefixRows):
        assert isinstance(layer, int)
        k = torch.cat([prefix.keys[layer], k]).index_select(0, prefix.index)
        v = torch.cat([prefix.values[layer], v]).index_select(0, prefix.index)
        cu_k, max_k, bounds_k = prefix.cu_seq_lens_k, prefix.max_length_k, prefix.bounds_k
    flash = q.is_cuda and varlen_attn is not None and q.dtype in (torch.bfloat16, torch.float16)
    if flash and (_VARLEN_WINDOWS or sliding_window is None):
        # Flash attention's window (left, 0) sees left + 1 positions; HF's window W sees W. Its
        # causal mask is aligned bottom right: a window's queries come after its prefix keys.
        window = (-1, 0) if sliding_window is None else (sliding_window - 1, 0)
        extra: dict[str, object] = {"window_size": window} if _VARLEN_WINDOWS else {"is_causal": True}
        if q.shape[1] != k.shape[1]:
            if _VARLEN_GQA:
                extra["enable_gqa"] = True
            else:
                groups = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = varlen_attn(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            cu_seq_lens,
            cu_k,
            max_length,
            max_k,
            scale=scaling,
            **extra,
        )
    else:
        bounds = kwargs.get("cu_seq_lens_host")
        if not isinstance(bounds, list):
            bounds = cu_seq_lens.tolist()
        if bounds_k is None and cu_k is not cu_seq_lens:
            bounds_k = cu_k.tolist()
        out = _attention_per_window(q, k, v, bounds, scaling, sliding_window, bounds_k)
    return out[None], None


@dataclass
class PrefixRows:
    """Prefix keys and values for a packed batch of targets: per layer, the rows of the batch's
    prefixes (one after another); `index` picks, from [prefix rows; the batch's own rows], each
    window's prefix rows followed by its own; `cu_seq_lens_k` (device) and `bounds_k` (host, for
    the per-window path) delimit the windows in that order."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    index: torch.Tensor
    cu_seq_lens_k: torch.Tensor
    max_length_k: int
    bounds_k: list[int] | None = None  # on the CPU; on CUDA flash attention needs only cu_seq_lens_k


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
