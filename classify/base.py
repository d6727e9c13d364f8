"""What every classification method shares: examples in, a label and scores per text out.

Scores are a distribution over the labels for every method, so clients can compare them:
kNN gives (weighted) vote shares; methods that compute code lengths give the posterior
p(label | x) ∝ 2^-C(x | label data) under a uniform prior, and also return those bits.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from codelen.datasets import RECORD_SEPARATOR


@dataclass(frozen=True)
class Prediction:
    label: str
    scores: dict[str, float]
    bits: dict[str, float] | None = None  # C(x | label data) in bits, for code-length methods

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"label": self.label, "scores": self.scores}
        if self.bits is not None:
            out["bits"] = self.bits
        return out


class Classifier(Protocol):
    labels: list[str]

    def predict(self, texts: Sequence[str]) -> list[Prediction]: ...


@dataclass
class LabeledData:
    """Training examples grouped by label, labels sorted so every run sees the same order."""

    texts: list[str]
    labels: list[str]
    by_label: dict[str, list[str]] = field(init=False)

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError("texts and labels differ in length")
        if not self.texts:
            raise ValueError("a classifier needs at least one example")
        self.by_label = {}
        for t, lab in zip(self.texts, self.labels, strict=True):
            self.by_label.setdefault(lab, []).append(t)
        self.by_label = dict(sorted(self.by_label.items()))

    @property
    def classes(self) -> list[str]:
        return list(self.by_label)


def posterior(bits: Mapping[str, float]) -> dict[str, float]:
    """p(label | x) ∝ 2^-bits(label), computed stably."""
    lowest = min(bits.values())
    weights = {lab: 2.0 ** -(b - lowest) for lab, b in bits.items()}
    total = sum(weights.values())
    return {lab: w / total for lab, w in weights.items()}


def text_rng(seed: int, text: str) -> random.Random:
    """The random stream that breaks this text's ties: the same whatever batch the text is in."""
    return random.Random(f"{seed}:{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()}")


def argmin_label(bits: Mapping[str, float], rng: random.Random) -> str:
    """Lowest bits; an exact tie (common with byte-granular classical lengths) is broken by `rng`,
    never by label order, so a tie is right by luck only as often as chance allows."""
    lowest = min(bits.values())
    return rng.choice(sorted(lab for lab, b in bits.items() if b == lowest))


def combine_bits(values: Sequence[float], rule: str) -> float:
    """Code length of x given several windows of one label's data.

    min: the best window (a two-part code that names the window would add log2(W) bits, the same
    for labels with as many windows). mean: the average. logsumexp: the mixture
    -log2(mean 2^-bits), which never exceeds min + log2(W)."""
    if rule == "min":
        return min(values)
    if rule == "mean":
        return sum(values) / len(values)
    if rule == "logsumexp":
        lowest = min(values)
        return lowest - math.log2(sum(2.0 ** -(v - lowest) for v in values) / len(values))
    raise ValueError(f"unknown combination rule {rule!r}")


DEFAULT_SEPARATOR = RECORD_SEPARATOR
