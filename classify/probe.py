"""`probe`: the label's code length under a linear coder over the LM's representation of the text.

The other LM methods code the *text* given the label, C(x | label's data). This one codes the
*label* given the text, C(y | x, D) = -log2 p(y | x) bits, where p is a multinomial logistic
regression ("linear probe") on the LM's hidden states of x (below), trained on the examples D.
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

The decision may add a second coder: bits(y) = C_probe(y | x) + γ · C_zstd-dict(x | y), the
product of the probe with a zstd dictionary of each label's examples (as `knn-lm` multiplies with
gzip). It carries what a small model's states lose and a dictionary keeps, such as names and
stock phrases: convention speeches by party, 0.775 → 0.925 at γ 0.03 (the dictionary alone 0.925).
`classical_weight` "auto" picks γ from CLASSICAL_WEIGHTS, 0 included, by the same cross-validation.
`features` and `weight_decay` "auto" pick from FEATURES × WEIGHT_DECAYS by `folds`-fold
cross-validation on the examples (seeded folds; ties to `mean`, then to the stronger penalty);
then γ on the chosen coder's held-out predictions, the dictionaries built from the other folds
(the smallest γ within one standard error of the best accuracy, so 0 unless the product is
clearly better: on AG News it gained 2 of 1,000 examples, noise). Nothing is tuned on the texts being predicted.

Cost: one LM pass per example at fit (both feature sets come from it), one per text at prediction;
the coder itself is a (features × labels) matrix. A text is featurized alone (the engine is batch invariant on the
CPU), so it gets the same answer in any batch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from classify.base import LabeledData, Prediction, argmin_label, posterior, text_rng
from classify.caching import cached_rows
from classify.knn_lm import StateCompressor, states_in_chunks
from classify.zstd_dict import ZstdDictClassifier, ZstdDictOptions
from models.protocol import Compressor, Symbols

WEIGHT_DECAYS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
CLASSICAL_WEIGHTS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
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
    classical_weight: Annotated[float, Field(ge=0.0, le=100.0)] | Literal["auto"] = Field(
        default="auto",
        description="γ in C_probe(y | x) + γ · C_zstd-dict(x | y), the product with a zstd dictionary per label; "
        "auto: chosen by cross-validation (0 where it does not help); 0: off",
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
    def __init__(
        self, compressor: StateCompressor, data: LabeledData, opts: ProbeOptions, chosen: Mapping | None = None
    ) -> None:
        """`chosen`: what an earlier fit of the same examples and options chose (its `fitted()`):
        the cross-validation is skipped, the rest runs as it did, so the coder is the same, bit for
        bit (a worker refitting a classifier for its predictions)."""
        self.compressor, self.data, self.opts = compressor, data, opts
        self._chosen = dict(chosen) if chosen else None
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
        self.classical_cv_accuracy: dict[float, float] = {}
        chosen_auto = "auto" in (opts.weight_decay, opts.classical_weight) or len(candidates) > 1
        held_out: torch.Tensor | None = None  # cross-validated logits of the chosen coder
        if self._chosen is not None:
            self.features = str(self._chosen["features"])
            self.weight_decay = float(self._chosen["weight_decay"])
            self.classical_weight = float(self._chosen["classical_weight"])
        elif len(y) < 2 or not chosen_auto:
            self.features = candidates[0]
            self.weight_decay = AUTO_FALLBACK if opts.weight_decay == "auto" else float(opts.weight_decay)
        else:
            decays = WEIGHT_DECAYS if opts.weight_decay == "auto" else (float(opts.weight_decay),)
            folds = self._folds(len(y))
            runs = {
                f: self._cross_validate(x if f == "mean_last" else x[:, :width], y, decays, folds) for f in candidates
            }
            self.features_cv_accuracy = {f: max(acc.values()) for f, (acc, _) in runs.items()}
            best = max(self.features_cv_accuracy.values())
            self.features = next(f for f in candidates if self.features_cv_accuracy[f] == best)
            accuracy, logits = runs[self.features]
            self.cv_accuracy = accuracy if opts.weight_decay == "auto" else {}
            self.weight_decay = max(wd for wd, a in accuracy.items() if a == best)
            held_out = logits[self.weight_decay]
            if opts.classical_weight == "auto":
                self.classical_weight = self._cross_validate_classical(held_out, y, folds)
        if self._chosen is None and opts.classical_weight != "auto":
            self.classical_weight = float(opts.classical_weight)
        elif self._chosen is None and held_out is None:
            self.classical_weight = 0.0  # a single example: nothing to choose it on
        self._classical = (
            ZstdDictClassifier(data, ZstdDictOptions(seed=opts.seed)) if self.classical_weight > 0 else None
        )
        keep = slice(None) if self.features == "mean_last" else slice(0, width)
        self._mean, self._scale = mean[keep], scale[keep]
        self._w, self._b = fit_linear(x[:, keep], y, len(self.labels), self.weight_decay, opts.max_iter)

    def _folds(self, n: int) -> list[torch.Tensor]:
        order = list(range(n))
        random.Random(self.opts.seed).shuffle(order)
        return [
            f for f in (torch.tensor(order[k :: self.opts.folds]) for k in range(min(self.opts.folds, n))) if len(f)
        ]

    def _cross_validate(
        self, x: torch.Tensor, y: torch.Tensor, decays: Sequence[float], folds: list[torch.Tensor]
    ) -> tuple[dict[float, float], dict[float, torch.Tensor]]:
        """Each weight decay's k-fold accuracy on the examples, and its held-out logits. Per fold
        the penalties go from strong to weak, each fit starting from the previous optimum."""
        logits = {wd: torch.zeros(len(y), len(self.labels), dtype=torch.float64) for wd in decays}
        for held in folds:
            keep = torch.ones(len(y), dtype=torch.bool)
            keep[held] = False
            start = None
            for wd in sorted(decays, reverse=True):
                start = fit_linear(x[keep], y[keep], len(self.labels), wd, self.opts.max_iter, start)
                logits[wd][held] = x[held] @ start[0] + start[1]
        return {wd: float((logits[wd].argmax(1) == y).double().mean()) for wd in decays}, logits

    def _cross_validate_classical(self, held_out: torch.Tensor, y: torch.Tensor, folds: list[torch.Tensor]) -> float:
        """The smallest γ from CLASSICAL_WEIGHTS whose accuracy of C_probe + γ · C_zstd on the
        held-out folds is within one standard error of the best one's, the dictionaries built from
        the other folds' examples. 0 where a fold's other examples miss a label (its dictionary
        would be empty)."""
        texts, labels = self.data.texts, self.data.labels
        classical = torch.zeros(len(y), len(self.labels), dtype=torch.float64)
        for held in folds:
            out = set(held.tolist())
            rest = [i for i in range(len(y)) if i not in out]
            if {labels[i] for i in rest} != set(self.labels):
                return 0.0
            coder = ZstdDictClassifier(
                LabeledData([texts[i] for i in rest], [labels[i] for i in rest]), ZstdDictOptions(seed=self.opts.seed)
            )
            for i in out:
                bits = coder.bits(texts[i])
                classical[i] = torch.tensor([bits[lab] for lab in self.labels], dtype=torch.float64)
        probe = -torch.log_softmax(held_out, dim=1) / _LN2
        self.classical_cv_accuracy = {
            g: float(((probe + g * classical).argmin(1) == y).double().mean()) for g in CLASSICAL_WEIGHTS
        }
        # One standard error: the smallest γ within noise of the best (a second coder must earn its place).
        best = max(self.classical_cv_accuracy.values())
        floor = best - math.sqrt(best * (1.0 - best) / len(y))
        return min(g for g, a in self.classical_cv_accuracy.items() if a >= floor)

    def fitted(self) -> dict[str, object]:
        """What the fit chose, for reports: the features and weight decay and, if cross-validated,
        each candidate's accuracy (weight decays: of the chosen features; features: their best)."""
        if self._chosen is not None:
            return dict(self._chosen)
        out: dict[str, object] = {
            "features": self.features,
            "weight_decay": self.weight_decay,
            "classical_weight": self.classical_weight,
        }
        if self.cv_accuracy:
            out["cv_accuracy"] = {str(wd): round(a, 4) for wd, a in self.cv_accuracy.items()}
        if len(self.features_cv_accuracy) > 1:
            out["features_cv_accuracy"] = {f: round(a, 4) for f, a in self.features_cv_accuracy.items()}
        if self.classical_cv_accuracy:
            out["classical_cv_accuracy"] = {str(g): round(a, 4) for g, a in self.classical_cv_accuracy.items()}
        return out

    def _features(self, texts: Sequence[str], last: bool) -> torch.Tensor:
        """Per text (float64): the mean final state, then with `last` the state after its last
        token, averaged over the blocks `self._layers`. A text with no tokens gets the examples'
        mean, zero after standardizing, so its prediction is the coder's prior (at fit: zeros)."""
        seqs = [self.compressor.encode(t) for t in texts]  # raises TokenizationError on text the model cannot code
        if self.opts.max_tokens is not None:
            seqs = [s[: self.opts.max_tokens] for s in seqs]
        layers = self._layers

        def compute(compressor: Compressor, todo: list[Symbols]) -> list[tuple[torch.Tensor]]:
            """Each text's row from one pass (an empty text: an empty (0, width) tensor)."""
            if last:
                # One more token (any: the rows before it never see it) gives the row after the text.
                runs = states_in_chunks(compressor, [[*s, s[-1]] if len(s) else s for s in todo], layers)
            else:
                runs = states_in_chunks(compressor, todo)
            out: list[tuple[torch.Tensor]] = []
            for seq, (_, states) in zip(todo, runs, strict=True):
                n = len(seq)
                if n == 0:  # states has shape (0, width)
                    out.append((states.double(),))
                elif last:
                    width = states.shape[1] // 2
                    out.append((torch.cat([states[:n, :width].double().mean(0), states[n, width:].double()]),))
                else:
                    out.append((states.double().mean(0),))
            return out

        kind = f"probe-mean-last:{','.join(str(i) for i in layers)}" if last else "probe-mean"
        rows = []
        for (row,) in cached_rows(self.compressor, kind, seqs, compute):  # a model pass only for texts never featurized
            if row.dim() == 2:  # no tokens
                rows.append(torch.zeros(row.shape[1], dtype=torch.float64) if self._mean is None else self._mean)
            else:
                rows.append(row)
        return torch.stack(rows)

    def bits(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """C(y | x) = -log2 p(y | x) for every label, per text; with a classical weight γ > 0,
        plus γ · C_zstd-dict(x | y)."""
        if not texts:
            return []
        raw = self._features(texts, last=self.features == "mean_last")
        # one text at a time: a product's kernel depends on its row count, so batched rows could
        # differ in the last bits from the same text predicted alone
        logits = torch.cat([row[None] @ self._w for row in (raw - self._mean) / self._scale]) + self._b
        bits = -torch.log_softmax(logits, dim=1) / _LN2
        out = [{lab: float(row[j]) for j, lab in enumerate(self.labels)} for row in bits]
        if self._classical is not None:
            for text, row in zip(texts, out, strict=True):
                for lab, b in self._classical.bits(text).items():
                    row[lab] += self.classical_weight * b
        return out

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        texts = list(texts)
        return [
            Prediction(argmin_label(b, text_rng(self.opts.seed, t)), posterior(b), b)
            for t, b in zip(texts, self.bits(texts), strict=True)
        ]
