"""`probe`: the label's code length under a linear coder over the LM's representation of the text.

The other LM methods code the *text* given the label, C(x | label's data). This one codes the
*label* given the text, C(y | x, D) = -log2 p(y | x) bits, where p is a multinomial logistic
regression ("linear probe") on the LM's mean final hidden state of x, trained on the examples D.
It is the seed's linear-probe argument (seeds/000, iGPT): a model trained only to compress text
carries the label in a linearly readable form, and a small supervised coder on top reads it.
By Bayes, C(y | x) = C(x | y) + C(y) - C(x), so both kinds rank labels by the same quantity; the
probe estimates it directly and, on the measured sets, better (docs/BENCHMARKS.md).

Features, from x's first `max_tokens` tokens (512; all of them if null), standardized per
dimension over the examples:
- `mean`: the mean of the final state that predicts each token (`token_states`; texts longer than
  the window go through its sliding windows). It holds the topic (AG News, R8).
- `mean_last`: that mean, then the state after x's last token (the one that would predict what
  follows the text) averaged over the blocks from `last_depth` = (1/2, 3/4) of the depth: a causal
  model's summary of the whole text, which holds what a mean dilutes, such as the tone of a review
  (movie-review sentiment 0.68 → 0.80; docs/BENCHMARKS.md).
Training: cross-entropy + `weight_decay` · |W|² (bias not penalized), L-BFGS in float64.
`features` and `weight_decay` "auto" pick from FEATURES × WEIGHT_DECAYS by `folds`-fold
cross-validation on the examples (seeded folds; ties to `mean`, then to the stronger penalty), so
nothing is tuned on the texts being predicted.

Cost: one LM pass per example at fit (both feature sets come from it), one per text at prediction;
the coder itself is a (features × labels) matrix. A text is featurized alone (the engine is batch invariant on the
CPU), so it gets the same answer in any batch.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from classify.base import LabeledData, Prediction, argmin_label, posterior, text_rng
from classify.knn_lm import StateCompressor, states_in_chunks

WEIGHT_DECAYS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
FEATURES = ("mean", "mean_last")  # in order of preference on a tie
AUTO_FALLBACK = 1.0  # weight decay "auto" with a single example (features "auto" then: "mean")
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
    features: Literal["auto", "mean", "mean_last"] = Field(
        default="auto",
        description="mean: the mean final state; mean_last: also the state after the text's last token "
        "(blocks in last_depth); auto: chosen by cross-validation",
    )
    last_depth: tuple[Annotated[float, Field(gt=0.0, le=1.0)], Annotated[float, Field(gt=0.0, le=1.0)]] = Field(
        default=(0.5, 0.75),
        description="mean_last averages the blocks from this fraction of the depth to that one (1: the last block)",
    )
    max_iter: int = Field(default=200, ge=1, le=10_000, description="L-BFGS iterations per fit")
    max_tokens: int | None = Field(
        default=MAX_TOKENS,
        ge=1,
        description="a text's features come from its first max_tokens tokens (bounds the cost of long documents); "
        "null: all of it",
    )
    seed: int = Field(default=0, description="fold assignment and exact ties")

    @model_validator(mode="after")
    def _ordered_depth(self) -> ProbeOptions:
        if self.last_depth[0] > self.last_depth[1]:
            raise ValueError("last_depth: the first fraction must not exceed the second")
        return self


def last_blocks(num_layers: int, depth: tuple[float, float]) -> tuple[int, ...]:
    """The blocks (1-based) from depth[0] to depth[1] of the model's depth: at least one.
    SmolLM2-135M (30 blocks), (0.5, 0.75): 15..22; Gemma-3-270M (18): 9..13."""
    first = min(num_layers, max(1, round(depth[0] * num_layers)))
    last = min(num_layers, max(first, int(depth[1] * num_layers)))
    return tuple(range(first, last + 1))


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
        self._layers = last_blocks(compressor.num_layers, opts.last_depth)
        self._mean: torch.Tensor | None = None  # set from the examples' features
        y = torch.tensor([self.labels.index(lab) for lab in data.labels])
        if opts.features != "auto":
            candidates: tuple[str, ...] = (opts.features,)
        else:
            candidates = FEATURES if len(y) >= 2 else ("mean",)
        raw = self._features(data.texts, last="mean_last" in candidates)
        mean = raw.mean(0)
        scale = raw.std(0) + 1e-3 if len(raw) > 1 else torch.ones(raw.shape[1], dtype=torch.float64)
        x = (raw - mean) / scale
        width = raw.shape[1] // 2 if "mean_last" in candidates else raw.shape[1]  # the mean's columns
        self.cv_accuracy: dict[float, float] = {}
        self.features_cv_accuracy: dict[str, float] = {}
        if len(y) < 2 or (opts.weight_decay != "auto" and len(candidates) == 1):
            self.features = candidates[0]
            self.weight_decay = AUTO_FALLBACK if opts.weight_decay == "auto" else float(opts.weight_decay)
        else:
            decays = WEIGHT_DECAYS if opts.weight_decay == "auto" else (float(opts.weight_decay),)
            by_features = {
                f: self._cross_validate(x if f == "mean_last" else x[:, :width], y, decays) for f in candidates
            }
            self.features_cv_accuracy = {f: max(acc.values()) for f, acc in by_features.items()}
            best = max(self.features_cv_accuracy.values())
            self.features = next(f for f in candidates if self.features_cv_accuracy[f] == best)
            self.cv_accuracy = by_features[self.features] if opts.weight_decay == "auto" else {}
            chosen = by_features[self.features]
            self.weight_decay = max(wd for wd, a in chosen.items() if a == best)
        keep = slice(None) if self.features == "mean_last" else slice(0, width)
        self._mean, self._scale = mean[keep], scale[keep]
        self._w, self._b = fit_linear(x[:, keep], y, len(self.labels), self.weight_decay, opts.max_iter)

    def _cross_validate(self, x: torch.Tensor, y: torch.Tensor, decays: Sequence[float]) -> dict[float, float]:
        """Each weight decay's k-fold accuracy on the examples. Per fold the penalties go from
        strong to weak, each fit starting from the previous optimum."""
        order = list(range(len(y)))
        random.Random(self.opts.seed).shuffle(order)
        folds = [torch.tensor(order[f :: self.opts.folds]) for f in range(min(self.opts.folds, len(y)))]
        right = dict.fromkeys(decays, 0)
        for held in (f for f in folds if len(f)):
            keep = torch.ones(len(y), dtype=torch.bool)
            keep[held] = False
            start = None
            for wd in sorted(decays, reverse=True):
                start = fit_linear(x[keep], y[keep], len(self.labels), wd, self.opts.max_iter, start)
                right[wd] += int(((x[held] @ start[0] + start[1]).argmax(1) == y[held]).sum())
        return {wd: right[wd] / len(y) for wd in decays}

    def fitted(self) -> dict[str, object]:
        """What the fit chose, for reports: the features and weight decay and, if cross-validated,
        each candidate's accuracy (weight decays: of the chosen features; features: their best)."""
        out: dict[str, object] = {"features": self.features, "weight_decay": self.weight_decay}
        if self.cv_accuracy:
            out["cv_accuracy"] = {str(wd): round(a, 4) for wd, a in self.cv_accuracy.items()}
        if len(self.features_cv_accuracy) > 1:
            out["features_cv_accuracy"] = {f: round(a, 4) for f, a in self.features_cv_accuracy.items()}
        return out

    def _features(self, texts: Sequence[str], last: bool) -> torch.Tensor:
        """Per text (float64): the mean final state, then with `last` the state after its last
        token, averaged over the blocks `self._layers`. A text with no tokens gets the examples'
        mean, zero after standardizing, so its prediction is the coder's prior (at fit: zeros)."""
        seqs = [self.compressor.encode(t) for t in texts]  # raises TokenizationError on text the model cannot code
        if self.opts.max_tokens is not None:
            seqs = [s[: self.opts.max_tokens] for s in seqs]
        if last:
            # One more token (any: the rows before it never see it) gives the row after the text.
            runs = states_in_chunks(self.compressor, [[*s, s[-1]] if len(s) else s for s in seqs], self._layers)
        else:
            runs = states_in_chunks(self.compressor, seqs)
        rows = []
        for seq, (_, states) in zip(seqs, runs, strict=True):
            n = len(seq)
            if n == 0:  # states has shape (0, width)
                rows.append(torch.zeros(states.shape[1], dtype=torch.float64) if self._mean is None else self._mean)
            elif last:
                width = states.shape[1] // 2
                rows.append(torch.cat([states[:n, :width].double().mean(0), states[n, width:].double()]))
            else:
                rows.append(states.double().mean(0))
        return torch.stack(rows)

    def bits(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """C(y | x) = -log2 p(y | x) for every label, per text."""
        if not texts:
            return []
        raw = self._features(texts, last=self.features == "mean_last")
        logits = ((raw - self._mean) / self._scale) @ self._w + self._b
        bits = -torch.log_softmax(logits, dim=1) / _LN2
        return [{lab: float(row[j]) for j, lab in enumerate(self.labels)} for row in bits]

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        texts = list(texts)
        return [
            Prediction(argmin_label(b, text_rng(self.opts.seed, t)), posterior(b), b)
            for t, b in zip(texts, self.bits(texts), strict=True)
        ]
