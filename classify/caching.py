"""A compressor that remembers its model passes, so a classifier never runs the model twice on
the same symbols: a refit, a second classifier on the same texts, a repeated prediction.

`caching(inner, store)` wraps a language model's compressor. Every value it returns is looked up
first, by content: the model's cache namespace (`ModelInfo.cache_namespace`: id, weight revision,
precision, window, mode), what was asked, and the sha256 of the symbols. Three kinds of value:
- `seg`: the code lengths of a segment (prefix, target): `score`;
- `states`: per-token bits and states of a sequence (`token_states`, what `knn-lm` reads);
- `rows`: a value a method derives from one sequence's pass (`probe`'s features), through
  `cached_rows`, so a method caches what it keeps (a probe row is a few KB; the states behind
  it, 512 tokens × 2.3 KB).
Values are stored as text (floats as `repr`, tensors as base64 of their bytes), so a value read
back is bit for bit the value computed. Where they are stored is the caller's `BlobStore`: the
embedded cache, or Redis on a worker (workers/classifying.py). This module knows no store, no key.

Classical compressors are not wrapped: compressing again costs less than looking up.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch

from models.protocol import Compressor, ModelInfo, Progress, Segment, SegmentBits, Symbols

Row = tuple[torch.Tensor, ...]  # what `rows` keeps of one sequence


class BlobStore(Protocol):
    """Text values by name, under a model's cache namespace. Blocking: called from the thread that
    runs the model."""

    def get_many(self, ns: str, names: Sequence[str]) -> list[str | None]: ...

    def set_many(self, ns: str, items: Mapping[str, str]) -> None: ...


def digest(symbols: Symbols) -> str:
    """sha256 of a symbol sequence: token ids as little-endian int64, or a classical compressor's bytes."""
    if isinstance(symbols, bytes | bytearray):
        return hashlib.sha256(b"b" + bytes(symbols)).hexdigest()
    return hashlib.sha256(b"t" + torch.tensor(list(symbols), dtype=torch.int64).numpy().tobytes()).hexdigest()


def tensor_text(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    shape = ",".join(str(n) for n in t.shape)
    return f"{str(t.dtype).removeprefix('torch.')}|{shape}|{base64.b64encode(t.numpy().tobytes()).decode()}"


def tensor_of(text: str) -> torch.Tensor:
    dtype, shape, data = text.split("|", 2)
    dims = [int(n) for n in shape.split(",")] if shape else []
    raw = bytearray(base64.b64decode(data))  # writable: torch.frombuffer warns on read-only memory
    if not raw:
        return torch.zeros(dims, dtype=getattr(torch, dtype))
    return torch.frombuffer(raw, dtype=getattr(torch, dtype)).reshape(dims)


class CachingCompressor:
    """`score` through the store; everything else is the inner compressor's."""

    def __init__(self, inner: Compressor, store: BlobStore) -> None:
        self.inner, self.store = inner, store
        self.info: ModelInfo = inner.info
        self.computed = 0  # sequences or segments the model ran for (the store missed)
        self.reused = 0  # values the store had

    def encode(self, text: str) -> Symbols:
        return self.inner.encode(text)

    def _lookup(self, names: list[str]) -> list[str | None]:
        unique = list(dict.fromkeys(names))
        found = dict(zip(unique, self.store.get_many(self.info.cache_namespace, unique), strict=True))
        return [found[n] for n in names]

    def _save(self, items: Mapping[str, str]) -> None:
        if items:
            self.store.set_many(self.info.cache_namespace, items)

    def score(
        self, segments: Sequence[Segment], *, need_prefix: bool = True, progress: Progress | None = None
    ) -> list[SegmentBits]:
        digests: dict[int, str] = {}  # by object: a window prefix shared by many segments is hashed once

        def of(symbols: Symbols) -> str:
            key = id(symbols)
            if key not in digests:
                digests[key] = digest(symbols)
            return digests[key]

        names = [
            "seg:" + hashlib.sha256(f"{of(s.prefix)}:{of(s.target)}".encode()).hexdigest() for s in segments
        ]
        out: list[SegmentBits | None] = [None] * len(segments)
        todo: dict[str, list[int]] = {}
        for i, (name, raw) in enumerate(zip(names, self._lookup(names), strict=True)):
            if raw is not None:
                prefix, target = (float(v) for v in raw.split())
                if not (need_prefix and math.isnan(prefix)):
                    out[i] = SegmentBits(prefix, target)
                    continue
            todo.setdefault(name, []).append(i)
        self.reused += len(segments) - sum(len(v) for v in todo.values())
        if todo:
            first = [idx[0] for idx in todo.values()]
            bits = self.inner.score([segments[i] for i in first], need_prefix=need_prefix, progress=progress)
            self.computed += len(first)
            for idx, b in zip(todo.values(), bits, strict=True):
                for i in idx:
                    out[i] = b
            self._save({name: f"{b.prefix_bits!r} {b.target_bits!r}" for name, b in zip(todo, bits, strict=True)})
        return out  # type: ignore[return-value]

    def rows(
        self,
        kind: str,
        seqs: Sequence[Symbols],
        compute: Callable[[Compressor, list[Symbols]], list[Row]],
    ) -> list[Row]:
        """compute(inner compressor, sequences) → a tuple of tensors per sequence, each read from the
        store when there, under `kind` (which must name everything besides the sequence that the
        value depends on)."""
        names = [f"rows:{kind}:{digest(s)}" for s in seqs]
        out: list[Row | None] = [None] * len(seqs)
        todo: dict[str, list[int]] = {}
        for i, (name, raw) in enumerate(zip(names, self._lookup(names), strict=True)):
            if raw is None:
                todo.setdefault(name, []).append(i)
            else:
                out[i] = tuple(tensor_of(part) for part in raw.split("\n"))
        self.reused += len(seqs) - sum(len(v) for v in todo.values())
        if todo:
            got = compute(self.inner, [seqs[idx[0]] for idx in todo.values()])
            self.computed += len(todo)
            for idx, value in zip(todo.values(), got, strict=True):
                for i in idx:
                    out[i] = value
            self._save({name: "\n".join(tensor_text(t) for t in v) for name, v in zip(todo, got, strict=True)})
        return out  # type: ignore[return-value]


class CachingStateCompressor(CachingCompressor):
    """The same for a language model that also exposes per-token states (`knn-lm`, `probe`)."""

    @property
    def num_layers(self) -> int:
        return self.inner.num_layers  # type: ignore[attr-defined]

    def token_states(
        self, sequences: Sequence[Sequence[int]], layers: Sequence[int] = ()
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        kind = "states:" + ",".join(str(i) for i in layers)

        def compute(inner: Compressor, seqs: list[Symbols]) -> list[Row]:
            return [tuple(run) for run in inner.token_states(seqs, layers)]  # type: ignore[attr-defined]

        return [(bits, states) for bits, states in self.rows(kind, sequences, compute)]


def caching(inner: Compressor, store: BlobStore) -> Compressor:
    """`inner` with its model passes remembered in `store`; a classical compressor as it is."""
    if inner.info.kind != "lm":
        return inner
    if hasattr(inner, "token_states") and hasattr(inner, "num_layers"):
        return CachingStateCompressor(inner, store)  # type: ignore[return-value]
    return CachingCompressor(inner, store)  # type: ignore[return-value]


def cached_rows(
    compressor: Compressor,
    kind: str,
    seqs: Sequence[Symbols],
    compute: Callable[[Compressor, list[Symbols]], list[Row]],
) -> list[Row]:
    """`compute(compressor, seqs)`, through the store when `compressor` is a caching one."""
    if isinstance(compressor, CachingCompressor):
        return compressor.rows(kind, seqs, compute)
    return compute(compressor, list(seqs))
