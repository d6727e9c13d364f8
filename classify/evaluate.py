"""Run a method on a split and measure it: accuracy, macro-F1, confusion matrix, time."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from classify.data import Split
from classify.methods import build
from models.protocol import Compressor


@dataclass
class Report:
    method: str
    model: str
    options: dict
    labels: list[str]
    accuracy: float
    macro_f1: float
    confusion: list[list[int]]  # rows: true label, columns: predicted label, in `labels` order
    n_train: int
    n_test: int
    fit_s: float
    predict_s: float
    fitted: dict = field(default_factory=dict)  # what the fit chose, e.g. probe's weight decay

    def as_dict(self) -> dict[str, object]:
        return {
            "method": self.method,
            "model": self.model,
            "options": self.options,
            "labels": self.labels,
            "accuracy": round(self.accuracy, 4),
            "macro_f1": round(self.macro_f1, 4),
            "confusion": self.confusion,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "fit_s": round(self.fit_s, 3),
            "predict_s": round(self.predict_s, 3),
            "ms_per_text": round(1000 * self.predict_s / max(self.n_test, 1), 2),
        } | ({"fitted": self.fitted} if self.fitted else {})


def scores(
    truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]
) -> tuple[float, float, list[list[int]]]:
    """(accuracy, macro-F1 over the labels that occur in `truth`, confusion matrix)."""
    index = {lab: i for i, lab in enumerate(labels)}
    confusion = [[0] * len(labels) for _ in labels]
    for t, p in zip(truth, predicted, strict=True):
        confusion[index[t]][index[p]] += 1
    correct = sum(confusion[i][i] for i in range(len(labels)))
    f1s = []
    for i in range(len(labels)):
        if not sum(confusion[i]):
            continue
        tp = confusion[i][i]
        fp = sum(confusion[r][i] for r in range(len(labels))) - tp
        fn = sum(confusion[i]) - tp
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return correct / max(len(truth), 1), sum(f1s) / max(len(f1s), 1), confusion


class _CountingStates:
    """The compressor as it is, but until `stop()` its `token_states` calls report how many
    examples have been read: the LM pass over the examples is the long part of fitting `probe` and
    `knn-lm`."""

    def __init__(self, compressor: object, total: int, progress: Callable[[str, int, int], None]) -> None:
        self._compressor, self._total, self._done = compressor, total, 0
        self._progress: Callable[[str, int, int], None] | None = progress

    def stop(self) -> None:
        self._progress = None

    def __getattr__(self, name: str) -> object:
        return getattr(self._compressor, name)

    def token_states(self, sequences: Sequence[Sequence[int]], layers: Sequence[int] = ()) -> list:
        out = self._compressor.token_states(sequences, layers)  # type: ignore[attr-defined]
        if self._progress is not None:
            self._done = min(self._total, self._done + len(sequences))
            self._progress("examples", self._done, self._total)
        return out


def evaluate(
    split: Split,
    method: str,
    model: str,
    compressor: Callable[[], Compressor],
    options: dict | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    chunk: int = 16,
) -> Report:
    """`progress(what, done, total)`: "examples" read while fitting (methods that read LM states),
    then "texts" predicted."""
    started = time.perf_counter()
    train_texts = [e.text for e in split.train]

    counting: list[_CountingStates] = []

    def fit_compressor() -> Compressor:
        c = compressor()
        if progress is None or not hasattr(c, "token_states"):
            return c
        counting.append(_CountingStates(c, len(train_texts), progress))
        return counting[-1]  # type: ignore[return-value]

    clf = build(method, fit_compressor, train_texts, [e.label for e in split.train], options)
    for c in counting:
        c.stop()  # prediction reports texts, below
    fit_s = time.perf_counter() - started
    texts = [e.text for e in split.test]
    predicted: list[str] = []
    started = time.perf_counter()
    for i in range(0, len(texts), chunk):
        predicted.extend(p.label for p in clf.predict(texts[i : i + chunk]))
        if progress:
            progress("texts", len(predicted), len(texts))
    predict_s = time.perf_counter() - started
    truth = [e.label for e in split.test]
    labels = sorted(set(truth) | set(predicted) | set(clf.labels))
    accuracy, macro_f1, confusion = scores(truth, predicted, labels)
    return Report(
        method,
        model,
        dict(options or {}),
        labels,
        accuracy,
        macro_f1,
        confusion,
        len(split.train),
        len(split.test),
        fit_s,
        predict_s,
        clf.fitted() if hasattr(clf, "fitted") else {},
    )
