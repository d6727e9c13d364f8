"""The model state after a prefix, kept so many targets can be coded after it without rerunning it.

C(Y|X) for one X and many Y (a matrix row, kNN against one text, a class context in
classification) runs [BOS] + X once; its key/value cache then serves every Y, expanded along the
batch dimension without copying. States live in an LRU bounded by bytes (the key/value tensors
and the last hidden state), on the model's device.

Sliding-window layers (Gemma 3) keep only the last window - 1 positions, as HF's
DynamicSlidingWindowLayer does during generation, with the count of tokens seen, so a target
continues exactly as in one pass over prefix + target.

`PackedPrefixState` is the packed engine's form of the same state (CUDA by default): the keys and
values in packed-row layout, all positions of every layer, gathered per target in one batch.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class PrefixState:
    """The model after [BOS] + prefix: its cache, the hidden state predicting the next token, C(prefix)."""

    cache: DynamicCache
    last_hidden: torch.Tensor  # (1, hidden): predicts the first target token
    prefix_bits: float
    n_positions: int  # 1 + len(prefix)

    @classmethod
    def from_forward(
        cls, cache: DynamicCache, last_hidden: torch.Tensor, prefix_bits: float, n_positions: int
    ) -> PrefixState:
        """Own the tensors: a sliding layer's cache is a view into the whole prefix's keys, which
        would keep them alive (and uncounted) in the LRU."""
        for layer in cache.layers:
            layer.keys = layer.keys.clone()
            layer.values = layer.values.clone()
        return cls(cache, last_hidden.clone(), prefix_bits, n_positions)

    @property
    def nbytes(self) -> int:
        kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in self.cache.layers)
        return kv + self.last_hidden.nbytes

    def expanded_cache(self, batch: int) -> DynamicCache:
        """A fresh cache for a batch of `batch` targets, sharing this state's tensors (no copy):
        the forward concatenates onto new tensors, so the stored state never changes."""
        cache = copy.copy(self.cache)
        cache.layers = []
        for layer in self.cache.layers:
            fresh = copy.copy(layer)
            fresh.keys = layer.keys.expand(batch, -1, -1, -1)
            fresh.values = layer.values.expand(batch, -1, -1, -1)
            cache.layers.append(fresh)
        return cache


@dataclass
class PackedPrefixState:
    """The model after [BOS] + prefix for the packed engine: per layer, the keys and values of
    every prefix position as (positions, kv heads, head dim), the layout of a packed row, so
    targets after many different prefixes run in one packed batch (models/packing.py gathers
    each target's prefix rows in front of its own)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    last_hidden: torch.Tensor  # (1, hidden): predicts the first target token
    prefix_bits: float
    n_positions: int  # 1 + len(prefix)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.keys, *self.values)) + self.last_hidden.nbytes


class PrefixCache:
    """LRU of prefix states by prefix tokens, holding at most `max_bytes` of tensors."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._states: OrderedDict[tuple[int, ...], PrefixState | PackedPrefixState] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, prefix: tuple[int, ...]) -> bool:
        return prefix in self._states

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, prefix: tuple[int, ...]) -> PrefixState | PackedPrefixState | None:
        state = self._states.get(prefix)
        if state is None:
            self.misses += 1
            return None
        self.hits += 1
        self._states.move_to_end(prefix)
        return state

    def peek(self, prefix: tuple[int, ...]) -> PrefixState | PackedPrefixState | None:
        """The state if kept, without counting a hit or refreshing its place."""
        return self._states.get(prefix)

    def put(self, prefix: tuple[int, ...], state: PrefixState | PackedPrefixState) -> None:
        """Keep `state`, evicting the least recently used; a state larger than the budget is not kept."""
        if prefix in self._states:
            self._bytes -= self._states.pop(prefix).nbytes
        size = state.nbytes
        if size > self.max_bytes:
            return
        while self._states and self._bytes + size > self.max_bytes:
            _, old = self._states.popitem(last=False)
            self._bytes -= old.nbytes
        self._states[prefix] = state
        self._bytes += size

    def clear(self) -> None:
        self._states.clear()
        self._bytes = 0
