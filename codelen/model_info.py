"""What the rest of codelen knows about a compressor: `ModelInfo`.

A model's id, weight revision, precision, window policy and conditioning mode decide its code
lengths, so together they name the cache namespace (`ModelInfo.cache_namespace`); responses and
`/v1/models` state them (`as_dict`). These are plain values: the API process of distributed mode
reads them from what workers published and never loads a model. The compressors themselves
(`models/`) build them; `models.protocol` re-exports them beside the `Compressor` protocol.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class WindowPolicy:
    """How inputs longer than the context are scored.

    Window k covers token positions [k*stride, k*stride + context_tokens) of BOS + sequence;
    window 0 scores all its tokens, window k >= 1 scores only the last `stride` of them. The windows
    depend on positions alone, so every token is scored exactly once with at least
    context_tokens - stride tokens before it, and C(X) alone equals the X part of C(X·Y).
    """

    context_tokens: int
    stride: int

    def as_dict(self) -> dict[str, object]:
        return {
            "policy": "sliding",
            "context_tokens": self.context_tokens,
            "stride": self.stride,
            "min_context_tokens": self.context_tokens - self.stride,
        }

    @property
    def key(self) -> str:
        return f"w{self.context_tokens}s{self.stride}"


MODES = ("context", "memory", "adapt")


class UnsupportedMode(ValueError):
    """A conditioning mode the model does not offer."""


@dataclass(frozen=True)
class Conditioning:
    """How a coder uses what came before a sequence (API v1 `conditioning`): `context` (the window
    alone), `memory` (a nearest-neighbour memory of earlier tokens) or `adapt` (a model trained on
    them). `params` are the mode's fixed parameters as stated in responses; `key` names mode and
    parameters in cache namespaces ("" for `context`, so its namespaces and values are unchanged)."""

    mode: str = "context"
    params: tuple[tuple[str, object], ...] = ()
    key: str = ""

    def as_dict(self) -> dict[str, object]:
        return {"mode": self.mode, **dict(self.params)}


CONTEXT = Conditioning()


@dataclass(frozen=True)
class ModelInfo:
    id: str
    kind: Literal["lm", "classical"]
    revision: str
    context_tokens: int | None
    window: WindowPolicy | None = None
    precision: str = ""  # e.g. "cpu-float32", "cuda-bfloat16": part of the cache namespace
    description: str = ""
    convention: str = ""
    conditioning: Conditioning = CONTEXT  # the mode these code lengths are in
    modes: tuple[Conditioning, ...] = (CONTEXT,)  # every mode the model offers, with its parameters

    @property
    def cache_namespace(self) -> str:
        """Everything about the model that changes a code length, for cache keys."""
        window = self.window.key if self.window else "nowin"
        mode = f":{self.conditioning.key}" if self.conditioning.key else ""
        return f"{self.id}@{self.revision[:16]}:{self.precision or 'exact'}:{window}{mode}"

    def with_mode(self, mode: str) -> ModelInfo:
        """The info of the same model in conditioning `mode`; UnsupportedMode if it has none."""
        for c in self.modes:
            if c.mode == mode:
                return dataclasses.replace(self, conditioning=c)
        offered = ", ".join(c.mode for c in self.modes)
        raise UnsupportedMode(f"model {self.id!r} offers conditioning {offered}; not {mode!r}")

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "id": self.id,
            "kind": self.kind,
            "revision": self.revision,
            "context_tokens": self.context_tokens,
        }
        if self.window is not None:
            out["window"] = self.window.as_dict()
        if self.precision:
            out["precision"] = self.precision
        if self.description:
            out["description"] = self.description
        if self.convention:
            out["convention"] = self.convention
        out["conditioning"] = {c.mode: c.as_dict() for c in self.modes}
        return out
