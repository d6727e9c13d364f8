"""Classification by conditional code length: the label whose data makes the text cheapest.

C(x | D_label) is the target part of the segment (D_label · separator, x): x coded as the next
record of the label's dataset, so C(D ∪ {x}) = C(D) + C(x | D) with the canonical separator.
The prediction is argmin over labels; scores are the posterior ∝ 2^-C(x | D_label).

A label's data rarely fits one LM window. Its examples are packed into windows of at most
`context_tokens` symbols (default: the model's window minus `reserve_tokens` for the text, at most
half the window), and:
- select="all": windows are filled with the label's examples in a seeded order; each window is a
  prefix shared by every test text (one class state, many texts: what prefix-state reuse makes
  fast). `max_windows` bounds the cost; `combine` merges a text's code lengths over windows
  (min, mean, or the mixture logsumexp).
- select="nearest": for each text, the label's examples are ranked by a cheap compressor's NCD
  to the text and the nearest fill the window (nearest last, next to the text). Better context,
  but one prefix per (text, label): no sharing.
Classical compressors have no window: by default one window holds all of a label's data
(`max_examples` bounds it).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from classify.base import DEFAULT_SEPARATOR, LabeledData, Prediction, argmin_label, combine_bits, posterior, text_rng
from classify.knn import ncd
from models.classical import CODECS
from models.protocol import Compressor, Segment, Symbols

TEXTS_PER_CALL = 64


class ConditionalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    select: Literal["all", "nearest"] = Field(default="all", description="which examples fill a window")
    nearest_by: Literal["gzip", "zlib", "zstd", "bz2"] = Field(
        default="gzip", description="compressor ranking examples"
    )
    max_windows: int | None = Field(default=1, ge=1, description="windows of examples per label (null: all the data)")
    combine: Literal["min", "mean", "logsumexp"] = "min"
    context_tokens: int | None = Field(
        default=None, ge=1, description="symbols per window; default LM window - reserve"
    )
    reserve_tokens: int = Field(default=256, ge=0, description="window room kept for the text itself")
    max_examples: int | None = Field(default=None, ge=1, description="examples per window at most")
    separator: str = Field(default=DEFAULT_SEPARATOR, description="between records, and between the data and x")
    unconditional: bool = Field(default=False, description="also compute C(x); bits become the saving C(x) - C(x|D)")
    seed: int = 0


class ConditionalClassifier:
    def __init__(self, compressor: Compressor, data: LabeledData, opts: ConditionalOptions) -> None:
        self.compressor, self.data, self.opts = compressor, data, opts
        self.labels = data.classes
        info = compressor.info
        window = info.window.context_tokens if info.window else info.context_tokens
        self.budget = opts.context_tokens or (window - min(opts.reserve_tokens, window // 2) if window else None)
        rng = random.Random(opts.seed)
        self._order: dict[str, list[str]] = {}
        for lab, texts in data.by_label.items():
            shuffled = list(texts)
            rng.shuffle(shuffled)
            self._order[lab] = shuffled
        self._sizes = {t: len(compressor.encode(t + opts.separator)) for t in data.texts} if self.budget else {}
        self._windows: dict[str, list[Symbols]] = {}
        if opts.select == "all":
            self._windows = {
                lab: [self._encode(w) for w in self._pack(texts)] or [()] for lab, texts in self._order.items()
            }
        else:
            compress = CODECS[opts.nearest_by][0]
            self._cheap: Callable[[str], float] = lambda s: 8.0 * len(compress(s.encode("utf-8")))
            self._cheap_bits = {t: self._cheap(t) for t in data.texts}

    def windows(self) -> dict[str, int]:
        """Windows per label (select="all")."""
        return {lab: len(w) for lab, w in self._windows.items()}

    def _pack(self, texts: Sequence[str]) -> list[list[str]]:
        """Consecutive windows of whole examples, each within the budget, at most max_windows."""
        opts, windows, current, used = self.opts, [], [], 0
        for t in texts:
            size = self._sizes.get(t, 0)
            if self.budget is not None and size > self.budget:
                continue  # one example longer than a window cannot be context
            full = (self.budget is not None and current and used + size > self.budget) or (
                opts.max_examples is not None and len(current) >= opts.max_examples
            )
            if full:
                windows.append(current)
                current, used = [], 0
                if opts.max_windows is not None and len(windows) >= opts.max_windows:
                    return windows
            current.append(t)
            used += size
        if current:
            windows.append(current)
        return windows

    def _encode(self, texts: list[str]) -> Symbols:
        """The window's prefix: its records, each followed by the separator, within the budget."""
        if not texts:
            return ()  # a label with no usable example: x is coded from the start state
        sep = self.opts.separator
        symbols = self.compressor.encode(sep.join(texts) + sep)
        while self.budget is not None and len(symbols) > self.budget and len(texts) > 1:
            texts = texts[:-1]  # the per-example estimate missed merges at the joins
            symbols = self.compressor.encode(sep.join(texts) + sep)
        return symbols

    def _nearest_windows(self, text: str, lab: str) -> list[list[str]]:
        """The label's examples nearest to `text` by the cheap compressor, nearest last."""
        cx = self._cheap(text)
        sep = self.opts.separator
        dist = {t: ncd(cx, self._cheap_bits[t], self._cheap(text + sep + t)) for t in self._order[lab]}
        ranked = sorted(self._order[lab], key=lambda t: dist[t])
        return [w[::-1] for w in self._pack(ranked)] or [[]]

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        lengths, alone = self.lengths(texts)
        out = []
        for i, found in enumerate(lengths):
            report = {lab: alone[i] - v for lab, v in found.items()} if alone is not None else found
            out.append(Prediction(argmin_label(found, text_rng(self.opts.seed, texts[i])), posterior(found), report))
        return out

    def lengths(self, texts: Sequence[str]) -> tuple[list[dict[str, float]], list[float] | None]:
        """Per text, C(x | label's data) for every label (windows combined), and C(x) alone when
        `unconditional` is set (else None)."""
        lengths: list[dict[str, float]] = []
        alone: list[float] | None = [] if self.opts.unconditional else None
        for start in range(0, len(texts), TEXTS_PER_CALL):
            found, single = self._lengths_chunk(texts[start : start + TEXTS_PER_CALL])
            lengths.extend(found)
            if alone is not None and single is not None:
                alone.extend(single)
        return lengths, alone

    def _lengths_chunk(self, texts: Sequence[str]) -> tuple[list[dict[str, float]], list[float] | None]:
        targets = [self.compressor.encode(t) for t in texts]
        segments: list[Segment] = []
        owners: list[tuple[int, str]] = []  # (text index, label) of each segment
        if self.opts.select == "all":
            for lab, windows in self._windows.items():  # grouped by prefix: one class state, many texts
                for prefix in windows:
                    for i, target in enumerate(targets):
                        segments.append(Segment(prefix, target))
                        owners.append((i, lab))
        else:
            for i, (text, target) in enumerate(zip(texts, targets, strict=True)):
                for lab in self.labels:
                    for window in self._nearest_windows(text, lab):
                        segments.append(Segment(self._encode(window), target))
                        owners.append((i, lab))
        if self.opts.unconditional:
            segments.extend(Segment((), target) for target in targets)
        bits = self.compressor.score(segments)
        per_text: list[dict[str, list[float]]] = [{} for _ in texts]
        for (i, lab), b in zip(owners, bits[: len(owners)], strict=True):
            per_text[i].setdefault(lab, []).append(b.target_bits)
        alone = [b.target_bits for b in bits[len(owners) :]] if self.opts.unconditional else None
        return [{lab: combine_bits(v, self.opts.combine) for lab, v in found.items()} for found in per_text], alone
