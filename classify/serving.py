"""The logic behind /v1/classifiers: validate, store the definition, fit, predict.

Definitions live in the store of the mode in use (memory or Redis); fitted classifiers (encoded
class contexts, zstd dictionaries, C(t) of kNN examples) are a small per-process LRU, rebuilt
from the definition when missing, so any API process can answer for any classifier. Fitting and
prediction run in a worker thread (they block on the model), one prediction per classifier at
a time. Predictions run in the API process on the registry's compressors, in both modes.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from classify.base import Classifier, Prediction
from classify.conditional import ConditionalClassifier
from classify.fusion import FusionClassifier
from classify.knn import KnnClassifier
from classify.knn_lm import KnnLmClassifier
from classify.methods import MethodError, build, parse_options, resolve_model
from classify.store import ClassifierStore
from codelen.datasets import DatasetError, check_record
from codelen.settings import Settings
from models.protocol import TokenizationError
from models.registry import Registry, UnknownModel


class NotFound(LookupError):
    pass


class TooLarge(ValueError):
    pass


class Invalid(ValueError):
    def __init__(self, message: str, pointer: str = "") -> None:
        super().__init__(message)
        self.pointer = pointer


@dataclass
class Fitted:
    classifier: Classifier
    lock: threading.Lock = field(default_factory=threading.Lock)


def public(record: dict) -> dict:
    labels = [e["label"] for e in record["examples"]]
    per_label = dict(sorted(Counter(labels).items()))
    return {
        "id": record["id"],
        "model": record["model"],
        "method": record["method"],
        "options": record["options"],
        "labels": list(per_label),
        "examples": len(labels),
        "examples_per_label": per_label,
        "created_at": record["created_at"],
    }


def segments_needed(clf: Classifier, n_texts: int) -> int:
    """Code lengths a prediction of n_texts costs (the unit of the max_predict_segments limit)."""
    if isinstance(clf, KnnClassifier):
        return n_texts * len(clf.data.texts) * (2 if clf.opts.symmetric else 1)
    if isinstance(clf, ConditionalClassifier):
        per_text = (
            sum(clf.windows().values()) if clf.opts.select == "all" else len(clf.labels) * (clf.opts.max_windows or 1)
        )
        return n_texts * (per_text + int(clf.opts.unconditional))
    if isinstance(clf, FusionClassifier | KnnLmClassifier):
        return n_texts * clf.segments_per_text()
    return n_texts * len(clf.labels)


class ClassifierService:
    def __init__(self, settings: Settings, registry: Registry, store: ClassifierStore) -> None:
        self.settings, self.registry, self.store = settings, registry, store
        self._fitted: OrderedDict[str, Fitted] = OrderedDict()

    def _check_text(self, text: str, pointer: str) -> int:
        try:
            return check_record(text, pointer, self.settings.max_record_bytes)
        except DatasetError as exc:
            if exc.too_large:
                raise TooLarge(f"{pointer}: {exc}") from None
            raise Invalid(f"{pointer}: {exc}", pointer) from None

    async def create(self, model: str | None, method: str, examples: list[dict], options: dict) -> dict:
        s = self.settings
        try:
            model_id = resolve_model(method, model, s.default_model)
            opts = parse_options(method, options)
        except MethodError as exc:
            raise Invalid(str(exc), "/options") from None
        self.registry.check(model_id)  # UnknownModel → 404
        if len(examples) > s.max_classifier_examples:
            raise TooLarge(f"{len(examples)} examples; at most {s.max_classifier_examples}")
        total = sum(self._check_text(e["text"], f"/examples/{i}/text") for i, e in enumerate(examples))
        if total > s.max_classifier_bytes:
            raise TooLarge(f"examples hold {total} bytes; at most {s.max_classifier_bytes}")
        record = {
            "id": uuid.uuid4().hex,
            "model": model_id,
            "method": method,
            "options": opts.model_dump(),
            "examples": [{"text": e["text"], "label": e["label"]} for e in examples],
            "created_at": time.time(),
        }
        await self._fit(record)  # fails early on input the model cannot code
        await self.store.put(record)
        return public(record)

    async def _fit(self, record: dict) -> Fitted:
        found = self._fitted.get(record["id"])
        if found is not None:
            self._fitted.move_to_end(record["id"])
            return found

        def fit() -> Classifier:
            texts = [e["text"] for e in record["examples"]]
            labels = [e["label"] for e in record["examples"]]
            return build(record["method"], lambda: self.registry.get(record["model"]), texts, labels, record["options"])

        try:
            fitted = Fitted(await asyncio.to_thread(fit))
        except TokenizationError as exc:
            raise Invalid(f"/examples: {exc}", "/examples") from None
        self._fitted[record["id"]] = fitted
        while len(self._fitted) > self.settings.fitted_classifiers:
            self._fitted.popitem(last=False)
        return fitted

    async def get(self, classifier_id: str) -> dict:
        record = await self.store.get(classifier_id)
        if record is None:
            raise NotFound(f"no classifier {classifier_id!r} (unknown, deleted, or expired)")
        return record

    async def delete(self, classifier_id: str) -> dict:
        record = await self.get(classifier_id)
        await self.store.delete(classifier_id)
        self._fitted.pop(classifier_id, None)
        return public(record)

    async def predict(self, classifier_id: str, texts: list[str]) -> dict:
        s = self.settings
        if len(texts) > s.max_predict_texts:
            raise TooLarge(f"{len(texts)} texts; at most {s.max_predict_texts} per request")
        for i, t in enumerate(texts):
            self._check_text(t, f"/texts/{i}")
        record = await self.get(classifier_id)
        fitted = await self._fit(record)
        needed = segments_needed(fitted.classifier, len(texts))
        if needed > s.max_predict_segments:
            raise TooLarge(
                f"this prediction needs {needed} code lengths; at most {s.max_predict_segments} per request "
                "(send fewer texts per request)"
            )

        def run() -> list[Prediction]:
            with fitted.lock:
                return fitted.classifier.predict(texts)

        try:
            predictions = await asyncio.to_thread(run)
        except TokenizationError as exc:
            raise Invalid(f"/texts: {exc}", "/texts") from None
        return {
            "id": record["id"],
            "model": record["model"],
            "method": record["method"],
            "predictions": [p.as_dict() for p in predictions],
        }


__all__ = ["ClassifierService", "Invalid", "NotFound", "TooLarge", "UnknownModel", "public"]
