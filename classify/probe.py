"""`probe`: the label's code length under a linear coder over the LM's representation of the text.

The other LM methods code the *text* given the label, C(x | label's data). This one codes the
*label* given the text, C(y | x, D) = -log2 p(y | x) bits, where p is a multinomial logistic
regression ("linear probe") on the LM's mean final hidden state of x, trained on the examples D.
It is the seed's linear-probe argument (seeds/000, iGPT): a model trained only to compress text
carries the label in a linearly readable form, and a small supervised coder on top reads it.
By Bayes, C(y | x) = C(x | y) + C(y) - C(x), so both kinds rank labels by the same quantity; the
probe estimates it directly and, on the measured sets, better (docs/BENCHMARKS.md).

Features: the mean over x's first `max_tokens` tokens (512; all of them if null) of the state that
predicts each token (`token_states`; texts longer than the window go through its sliding windows),
standardized per dimension over the examples. Training: cross-entropy + `weight_decay` · |W|²
(bias not penalized), L-BFGS in float64.
`weight_decay` "auto" picks from WEIGHT_DECAYS by `folds`-fold cross-validation on the examples
(seeded folds, ties to the stronger penalty), so nothing is tuned on the texts being predicted.

Cost: one LM pass per example at fit, one per text at prediction; the coder itself is a
(hidden size × labels) matrix. A text is featurized alone (the engine is batch invariant on the
CPU), so it gets the same answer in any batch.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from classify.base import LabeledData, Prediction, argmin_label, posterior, text_rng
from classify.knn_lm import StateCompressor, states_in_chunks

WEIGHT_DECAYS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
AUTO_FALLBACK = 1.0  # "auto" with a single example
# R8 (docs/BENCHMARKS.md): the first 64 / 128 / 256 / 512 tokens / all gave 0.893 / 0.902 / 0.902 /
# 0.884 / 0.884; AG News and SMS texts are shorter than this. A long document costs at most this.
MAX_TOKENS = 512
_LN2 = 0.6931471805599453


class ProbeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weight_decay: Annotated[float, Field(ge=0.0)] | Literal["auto"] = Field(
        default="auto", description="L2 penalty on the coder's weights; 'auto': chosen by cross-validation"
    )
    folds: int = Field(default=5, ge=2, le=20, description="cross-validation folds for weight_decay 'auto'")
    max_iter: int = Field(default=200, ge=1, le=10_000, description="L-BFGS iterations per fit")
    max_tokens: int | None = Field(
        default=MAX_TOKENS,
        ge=1,
        description="a text's features come from its first max_tokens tokens (bounds the cost of long documents); "
        "null: all of it",
    )
    seed: int = Field(default=0, description="fold assignment and exact ties")


def fit_linear(
    x: torch.Tensor,
    y: torch.Tensor,
    classes: int,
    weight_decay: float,
    max_iter: int,
    start: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression: (weights, bias) minimizing mean cross-entropy + wd·|W|²,
    by L-BFGS from zero or from `start` (the objective is convex: the start changes the path, not
    the optimum)."""
    w0, b0 = start if start is not None else (torch.zeros(x.shape[1], classes), torch.zeros(classes))
    w = w0.to(torch.float64).clone().requires_grad_(True)
    b = b0.to(torch.float64).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, tolerance_grad=1e-6, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


class ProbeClassifier:
    def __init__(self, compressor: StateCompressor, data: LabeledData, opts: ProbeOptions) -> None:
        self.compressor, self.data, self.opts = compressor, data, opts
        self.labels = data.classes
        self._mean: torch.Tensor | None = None  # set from the examples' features
        raw = self._features(data.texts)
        self._mean = raw.mean(0)
        self._scale = raw.std(0) + 1e-3 if len(raw) > 1 else torch.ones(raw.shape[1], dtype=torch.float64)
        x = self._standard(raw)
        y = torch.tensor([self.labels.index(lab) for lab in data.labels])
        self.cv_accuracy: dict[float, float] = {}
        if opts.weight_decay == "auto" and len(y) < 2:
            self.weight_decay = AUTO_FALLBACK  # nothing to hold out
        elif opts.weight_decay == "auto":
            self.weight_decay = self._cross_validate(x, y)
        else:
            self.weight_decay = float(opts.weight_decay)
        self._w, self._b = fit_linear(x, y, len(self.labels), self.weight_decay, opts.max_iter)

    def _cross_validate(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """The weight decay with the best k-fold accuracy on the examples (ties: the larger). Per
        fold the penalties go from strong to weak, each fit starting from the previous optimum."""
        order = list(range(len(y)))
        random.Random(self.opts.seed).shuffle(order)
        folds = [torch.tensor(order[f :: self.opts.folds]) for f in range(min(self.opts.folds, len(y)))]
        right = dict.fromkeys(WEIGHT_DECAYS, 0)
        for held in (f for f in folds if len(f)):
            keep = torch.ones(len(y), dtype=torch.bool)
            keep[held] = False
            start = None
            for wd in sorted(WEIGHT_DECAYS, reverse=True):
                start = fit_linear(x[keep], y[keep], len(self.labels), wd, self.opts.max_iter, start)
                right[wd] += int(((x[held] @ start[0] + start[1]).argmax(1) == y[held]).sum())
        self.cv_accuracy = {wd: right[wd] / len(y) for wd in WEIGHT_DECAYS}
        best = max(self.cv_accuracy.values())
        return max(wd for wd, a in self.cv_accuracy.items() if a == best)

    def fitted(self) -> dict[str, object]:
        """What the fit chose, for reports: the weight decay and, if cross-validated, each one's accuracy."""
        out: dict[str, object] = {"weight_decay": self.weight_decay}
        if self.cv_accuracy:
            out["cv_accuracy"] = {str(wd): round(a, 4) for wd, a in self.cv_accuracy.items()}
        return out

    def _standard(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self._mean) / self._scale

    def _features(self, texts: Sequence[str]) -> torch.Tensor:
        """Mean final state per text (float64). A text with no tokens gets the examples' mean,
        zero after standardizing, so its prediction is the coder's prior (at fit: zeros)."""
        seqs = [self.compressor.encode(t) for t in texts]  # raises TokenizationError on text the model cannot code
        if self.opts.max_tokens is not None:
            seqs = [s[: self.opts.max_tokens] for s in seqs]
        rows = []
        for _, states in states_in_chunks(self.compressor, seqs):
            if len(states):
                rows.append(states.double().mean(0))
            else:  # states has shape (0, hidden size)
                rows.append(torch.zeros(states.shape[1], dtype=torch.float64) if self._mean is None else self._mean)
        return torch.stack(rows)

    def bits(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """C(y | x) = -log2 p(y | x) for every label, per text."""
        if not texts:
            return []
        logits = self._standard(self._features(texts)) @ self._w + self._b
        bits = -torch.log_softmax(logits, dim=1) / _LN2
        return [{lab: float(row[j]) for j, lab in enumerate(self.labels)} for row in bits]

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        texts = list(texts)
        return [
            Prediction(argmin_label(b, text_rng(self.opts.seed, t)), posterior(b), b)
            for t, b in zip(texts, self.bits(texts), strict=True)
        ]
