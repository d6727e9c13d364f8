"""`knn-lm`: the LM with a token memory per label (kNN-LM, Khandelwal et al., ICLR 2020).

C(x | label) is x's code length under a mixture, token by token:

    p(x_i | x_<i, label) = (1 - λ) p_LM(x_i | x_<i) + λ p_mem(x_i | x_<i, label)

p_mem comes from the label's memory: every token of the label's training texts, keyed by the LM's
final hidden state that predicted it. The state h_i that predicts x_i finds its k nearest keys
(squared L2 after standardizing each dimension over all training states: a few huge outlier
dimensions otherwise decide every distance; measured 0.715 → 0.81 on AG News), and p_mem(v) is the
softmax(-d / T) weight of the neighbours whose token is v. T is `temperature` × the median
squared distance between training states, so one default fits every model. A memory holds every
example of the label, where in-context conditioning (`conditional`, `fusion`) reads only what fits
one window, and costs one LM pass per text instead of one per (text, label).

Both mixture components are proper distributions over the next token, so the mixture is a code an
arithmetic coder can use: C(x | label) is a real code length, and the prediction is
argmin over labels (the posterior ∝ 2^-C). With `classical_weight` w > 0 the decision uses
C(x | label) + w · C_gzip(x | label's corpus), the product of the two coders (as in `fusion`).

Everything about a text is computed from that text alone (its states come from the engine, batch
invariant on the CPU), so a text gets the same answer in any batch.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, Field

from classify.base import LabeledData, Prediction, argmin_label, posterior, text_rng
from classify.conditional import ConditionalClassifier, ConditionalOptions
from models.classical import ClassicalCompressor
from models.protocol import Symbols

TEXTS_PER_CALL = 64
_MEDIAN_SAMPLE = 2048  # states drawn (seeded) to measure the median squared distance
_DISTANCE_ELEMENTS = 1 << 24  # query rows × keys per distance matrix (64 MiB of fp32): long texts go in chunks


@runtime_checkable
class StateCompressor(Protocol):
    """A compressor that also exposes, per token, its bits and the state that predicted it
    (`LMCompressor.token_states`)."""

    @property
    def num_layers(self) -> int: ...

    def encode(self, text: str) -> Symbols: ...

    def token_states(
        self, sequences: Sequence[Sequence[int]], layers: Sequence[int] = ()
    ) -> list[tuple[torch.Tensor, torch.Tensor]]: ...


def states_in_chunks(
    compressor: StateCompressor, seqs: Sequence[Symbols], layers: Sequence[int] = ()
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`token_states` of many sequences, TEXTS_PER_CALL at a time (bounded CPU copies of the states)."""
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i in range(0, len(seqs), TEXTS_PER_CALL):
        out += compressor.token_states(seqs[i : i + TEXTS_PER_CALL], layers)
    return out


class KnnLmOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    k: int = Field(default=256, ge=1, le=4096, description="neighbours per token in the label's memory")
    memory_weight: float = Field(default=0.97, gt=0.0, lt=1.0, description="λ: the memory's share of the mixture")
    temperature: float = Field(
        default=0.1, gt=0.0, le=100.0, description="softmax temperature, × the median squared distance"
    )
    max_memory_tokens: int = Field(
        default=131_072, ge=1, description="tokens kept in all memories together (whole examples, seeded)"
    )
    classical: Literal["gzip", "zlib", "zstd", "bz2"] = "gzip"
    classical_weight: float = Field(
        default=0.25, ge=0.0, le=100.0, description="w in C(x|label) + w · C_classical(x | label corpus); 0: off"
    )
    seed: int = 0


class KnnLmClassifier:
    def __init__(self, compressor: StateCompressor, data: LabeledData, opts: KnnLmOptions) -> None:
        self.compressor, self.data, self.opts = compressor, data, opts
        self.labels = data.classes
        rng = random.Random(opts.seed)
        budget = max(1, opts.max_memory_tokens // len(self.labels))
        kept: list[tuple[str, Symbols]] = []
        self.memory_tokens: dict[str, int] = {}
        for lab, texts in data.by_label.items():
            order = list(texts)
            rng.shuffle(order)
            used = 0
            for t in order:
                ids = compressor.encode(t)  # raises TokenizationError on text the model cannot code
                if used + len(ids) > budget:
                    if used:
                        continue
                    ids = ids[:budget]  # a label's memory is never empty: keep the start of its first example
                kept.append((lab, ids))
                used += len(ids)
            self.memory_tokens[lab] = used
        # Every label keeps at least one token (examples are non-empty), so nothing below is empty.
        states = [h for _, h in self._states([ids for _, ids in kept])]
        everything = torch.cat(states)
        self._mean = everything.mean(0)
        self._scale = everything.std(0) + 1e-3 if len(everything) > 1 else torch.ones(everything.shape[1])
        self.keys: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}
        for lab in self.labels:
            mine = [(h, ids) for (lb, ids), h in zip(kept, states, strict=True) if lb == lab]
            self.keys[lab] = self._standard(torch.cat([h for h, _ in mine]))
            self.values[lab] = torch.tensor([t for _, ids in mine for t in ids], dtype=torch.long)
        self.temperature = opts.temperature * self._median_distance(everything, rng)
        self.classical: ConditionalClassifier | None = None
        if opts.classical_weight > 0:
            self.classical = ConditionalClassifier(
                ClassicalCompressor(opts.classical), data, ConditionalOptions(seed=opts.seed)
            )

    def _standard(self, h: torch.Tensor) -> torch.Tensor:
        return (h - self._mean) / self._scale

    def _states(self, seqs: list[Symbols]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return states_in_chunks(self.compressor, seqs)

    def _median_distance(self, states: torch.Tensor, rng: random.Random) -> float:
        if len(states) < 2:
            return 1.0
        pick = torch.tensor(rng.sample(range(len(states)), min(len(states), _MEDIAN_SAMPLE)))
        sample = self._standard(states[pick])
        half = len(sample) // 2
        d = torch.cdist(sample[:half], sample[half:]) ** 2
        median = float(d.median())
        return median if median > 0 else 1.0

    def segments_per_text(self) -> int:
        """Code lengths one text costs: one LM pass, and the classical expert's per label."""
        return 1 + (len(self.labels) if self.classical is not None else 0)

    def memory_bits(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """C(x | label) under the mixture, per text and label."""
        seqs = [self.compressor.encode(t) for t in texts]
        out = []
        for ids, (bits, states) in zip(seqs, self._states(seqs), strict=True):
            out.append(self._text_bits(torch.tensor(ids, dtype=torch.long), bits, states))
        return out

    def _text_bits(self, ids: torch.Tensor, bits: torch.Tensor, states: torch.Tensor) -> dict[str, float]:
        lam = self.opts.memory_weight
        p_lm = torch.exp2(-bits)  # float64
        query = self._standard(states)
        result = {}
        for lab in self.labels:
            keys, values = self.keys[lab], self.values[lab]
            p_mem = torch.zeros(len(ids), dtype=torch.float64)
            if len(ids) and len(keys):
                k = min(self.opts.k, len(keys))
                rows = max(1, _DISTANCE_ELEMENTS // len(keys))  # fixed per classifier: same chunks for a text
                for a in range(0, len(ids), rows):
                    dist, nearest = (torch.cdist(query[a : a + rows], keys) ** 2).topk(k, dim=1, largest=False)
                    weights = torch.softmax(-dist.double() / self.temperature, dim=1)
                    p_mem[a : a + rows] = (weights * (values[nearest] == ids[a : a + rows, None])).sum(1)
            result[lab] = float(-torch.log2((1 - lam) * p_lm + lam * p_mem).sum())
        return result

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        texts = list(texts)
        memory = self.memory_bits(texts)
        classical = self.classical.lengths(texts)[0] if self.classical is not None else None
        w, out = self.opts.classical_weight, []
        for i, text in enumerate(texts):
            bits = (
                memory[i] if classical is None else {lab: memory[i][lab] + w * classical[i][lab] for lab in self.labels}
            )
            out.append(Prediction(argmin_label(bits, text_rng(self.opts.seed, text)), posterior(bits), bits))
        return out
