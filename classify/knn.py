"""kNN over the normalized compression distance, with fair ties.

NCD(x, t) = (C(x·t) − min(C(x), C(t))) / max(C(x), C(t)), from segments with the test text as
prefix and each training text as target: one test text's state serves every training text (the
batch shape a prefix-reusing LM engine makes fast). `symmetric` also codes t·x and uses
min(C(x·t), C(t·x)), the NCD of MISSION.md and /v1/score, at twice the cost.

Fairness (ANCHORS.md pitfall 1): a tie is never "correct if any tied label is right".
Neighbours at equal distance are ordered by a seeded shuffle, and a tied vote is broken either at
random (seeded) or by decrementing k until one label leads. The random stream is seeded by
(seed, text), so a text gets the same answer whatever batch it comes in.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from classify.base import LabeledData, Prediction, text_rng
from models.protocol import Compressor, Segment

SEGMENTS_PER_CALL = 4096


class KnnOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    k: int = Field(default=1, ge=1, le=1000, description="neighbours that vote")
    ties: Literal["random", "decrement"] = Field(
        default="random", description="tied vote: seeded random choice, or k-1 until one label leads"
    )
    weighting: Literal["uniform", "distance"] = Field(default="uniform", description="vote weight 1 or 1/NCD")
    seed: int = 0
    symmetric: bool = Field(default=False, description="min(C(xt), C(tx)) as in /v1/score; twice the work")


def ncd(cx: float, ct: float, cxt: float) -> float:
    return (cxt - min(cx, ct)) / max(cx, ct, 1e-12)


def vote(
    distances: Sequence[float], labels: Sequence[str], classes: Sequence[str], opts: KnnOptions, rng: random.Random
) -> Prediction:
    """The kNN decision for one text, given its distance to every training example."""
    order = list(range(len(distances)))
    rng.shuffle(order)  # equal distances: a seeded random order, not the training file's order
    order.sort(key=lambda i: distances[i])
    k = min(opts.k, len(order))

    def tally(kk: int) -> dict[str, float]:
        votes = dict.fromkeys(classes, 0.0)
        for i in order[:kk]:
            votes[labels[i]] += 1.0 if opts.weighting == "uniform" else 1.0 / max(distances[i], 1e-6)
        return votes

    votes = tally(k)
    total = sum(votes.values()) or 1.0
    scores = {lab: v / total for lab, v in votes.items()}
    kk, current = k, votes
    while True:
        best = max(current.values())
        leaders = sorted(lab for lab, v in current.items() if v == best)
        if len(leaders) == 1:
            return Prediction(leaders[0], scores)
        if opts.ties == "random" or kk == 1:
            return Prediction(rng.choice(leaders), scores)
        kk -= 1
        current = tally(kk)


class KnnClassifier:
    def __init__(self, compressor: Compressor, data: LabeledData, opts: KnnOptions) -> None:
        self.compressor, self.data, self.opts = compressor, data, opts
        self.labels = data.classes
        self._train = [compressor.encode(t) for t in data.texts]
        bits = compressor.score([Segment((), s) for s in self._train])
        self._train_bits = [b.target_bits for b in bits]

    def distances(self, text: str) -> list[float]:
        sx = self.compressor.encode(text)
        forward = [Segment(sx, st) for st in self._train]
        backward = [Segment(st, sx) for st in self._train] if self.opts.symmetric else []
        segments = forward + backward
        bits = []
        for start in range(0, len(segments), SEGMENTS_PER_CALL):
            bits.extend(self.compressor.score(segments[start : start + SEGMENTS_PER_CALL]))
        n = len(self._train)
        cx = bits[0].prefix_bits if n else 0.0
        out = []
        for i, ct in enumerate(self._train_bits):
            cxt = cx + bits[i].target_bits
            if self.opts.symmetric:
                cxt = min(cxt, ct + bits[n + i].target_bits)
            out.append(ncd(cx, ct, cxt))
        return out

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        out = []
        for text in texts:
            rng = text_rng(self.opts.seed, text)
            out.append(vote(self.distances(text), self.data.labels, self.labels, self.opts, rng))
        return out
