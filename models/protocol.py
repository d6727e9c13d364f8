"""The one interface every compressor implements.

A compressor turns text into symbols (tokens for a language model, bytes for a classical
compressor) and returns code lengths in bits for *segments*: a target sequence coded after an
optional prefix. One segment gives both C(prefix) and C(target | prefix), which is all the
service ever needs: C(X·Y) = C(X) + C(Y|X).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

# The model's description lives on the ground floor (codelen/), which imports nothing above it.
from codelen.model_info import CONTEXT, MODES, Conditioning, ModelInfo, UnsupportedMode, WindowPolicy

__all__ = [
    "CONTEXT",
    "MODES",
    "Compressor",
    "Conditioning",
    "ModelInfo",
    "Progress",
    "Segment",
    "SegmentBits",
    "Symbols",
    "TokenizationError",
    "UnsupportedMode",
    "WindowPolicy",
]

Symbols = Sequence[int]  # token ids for an LM; a `bytes` object for a classical compressor


class TokenizationError(ValueError):
    """The tokenizer does not reproduce the text byte for byte, so no code length is defined."""


@dataclass(frozen=True)
class Segment:
    """Code `target` after `prefix`. An empty prefix means: code `target` from the start state."""

    prefix: Symbols
    target: Symbols


@dataclass(frozen=True)
class SegmentBits:
    prefix_bits: float  # C(prefix) from the start state (NaN if the caller did not need it)
    target_bits: float  # C(target | prefix)


# Hears how far a long call is: (tokens just coded, tokens newly planned). A compressor announces a
# sequence's tokens when it starts on it (0, n) and reports them as it codes them (m, 0).
Progress = Callable[[int, int], None]


@runtime_checkable
class Compressor(Protocol):
    info: ModelInfo

    def encode(self, text: str) -> Symbols:
        """Lossless symbols of `text`; raises TokenizationError if the round trip fails."""
        ...

    def score(
        self, segments: Sequence[Segment], *, need_prefix: bool = True, progress: Progress | None = None
    ) -> list[SegmentBits]:
        """Code lengths in bits for each segment, in order. Batching is the compressor's choice.
        `need_prefix=False` lets it skip C(prefix) (prefix_bits may then be NaN); `progress`, if
        given, hears how far a long call is."""
        ...
