"""Classifier work on the queue: what a classify task is, and how the embedded engine or a
`codelen worker` runs it.

A fit job is one task (the whole fit; its model passes are cached per text). A prediction job is one
task per chunk of `CODELEN_CLASSIFY_CHUNK_TEXTS` texts. A task names its classifier; the process
that runs it builds the fitted classifier from the stored definition once (`FittedClassifiers`, a
per-process LRU) on its model wrapped in a caching compressor (classify/caching.py), whose values
live in the same cache as code lengths: the embedded cache (`MemoryBlobs`) or Redis (`RedisBlobs`,
under keys.classify_value). So a fit on a worker that has not seen the classifier, or on texts
scored before, costs no model pass; the methods run here are the ones `codelen eval` measures.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import redis.asyncio as aioredis
from prometheus_client import Counter

from classify.base import Classifier
from classify.methods import build
from codelen import keys
from models.protocol import Compressor
from workers.compute import FIT, ClassifyTask


class FittedClassifiers:
    """Fitted classifiers of this process by id, least recently used dropped past `max_entries`.
    A classifier's definition never changes, so a fitted one stays right until it is dropped."""

    def __init__(self, max_entries: int) -> None:
        self._items: OrderedDict[str, Classifier] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()

    def get(self, definition: dict, compressor: Callable[[], Compressor]) -> Classifier:
        """The fitted classifier of `definition`, fitting it on `compressor()` if this process has
        none (blocking). Raises ValueError (TokenizationError, MethodError) on examples it cannot fit."""
        cid = definition["id"]
        with self._lock:
            if cid in self._items:
                self._items.move_to_end(cid)
                return self._items[cid]
        texts = [e["text"] for e in definition["examples"]]
        labels = [e["label"] for e in definition["examples"]]
        # what the first fit chose, once the API recorded it: a refit skips the choosing (probe's CV)
        chosen = definition.get("fitted")
        fitted = build(definition["method"], compressor, texts, labels, definition["options"], chosen)
        with self._lock:
            self._items[cid] = fitted
            while len(self._items) > self._max:
                self._items.popitem(last=False)
        return fitted

    def __contains__(self, cid: str) -> bool:
        return cid in self._items


def run_classify(
    fitted: FittedClassifiers,
    definition: dict,
    compressor: Callable[[], Compressor],
    items: Sequence[tuple[ClassifyTask, list[str]]],
) -> tuple[dict[ClassifyTask, object], dict[ClassifyTask, str]]:
    """Run classify tasks of one classifier (blocking): (values, {task: reason it cannot succeed}).

    A fit's value is {"fitted": what the fit chose, or None}; a chunk's, its predictions in text
    order (`Prediction.as_dict`). The chunks run as one prediction (a text's prediction does not
    depend on its neighbours); a chunk with a text the model cannot code fails alone. Examples the
    model cannot code fail every task. Other exceptions (a broken model) propagate."""
    try:
        clf = fitted.get(definition, compressor)
    except ValueError as exc:  # TokenizationError, MethodError: the examples, not the model
        reason = f"the classifier cannot be fitted: {exc}"
        return {}, {t: reason for t, _ in items}
    values: dict[ClassifyTask, object] = {}
    failed: dict[ClassifyTask, str] = {}
    for t, _ in items:
        if t.start == FIT:
            values[t] = {"fitted": clf.fitted() if hasattr(clf, "fitted") else None}

    def predict(chunks: list[tuple[ClassifyTask, list[str]]]) -> None:
        try:
            predictions = clf.predict([text for _, texts in chunks for text in texts])
        except ValueError as exc:  # TokenizationError: find the chunk whose text cannot be coded
            if len(chunks) == 1:
                t = chunks[0][0]
                failed[t] = f"texts {t.start}..{t.start + t.count - 1}: {exc}"
            else:
                for chunk in chunks:
                    predict([chunk])
            return
        at = 0
        for t, texts in chunks:
            values[t] = [p.as_dict() for p in predictions[at : at + len(texts)]]
            at += len(texts)

    chunks = [(t, texts) for t, texts in items if t.start != FIT]
    if chunks:
        predict(chunks)
    return values, failed


def count(counter: Counter | None, found: list[str | None]) -> list[str | None]:
    """Add a lookup to `counter` (codelen_classify_values): each value found is a model pass saved,
    each one missing is computed next."""
    if counter is not None:
        missing = found.count(None)
        counter.labels("reused").inc(len(found) - missing)
        counter.labels("computed").inc(missing)
    return found


class MemoryBlobs:
    """Embedded mode: classifier values (classify/caching.py) in a byte-bounded LRU beside the code
    length cache, least recently used dropped first. Thread-safe: the engine's model thread uses it."""

    def __init__(self, max_bytes: int, counter: Counter | None = None) -> None:
        self._items: OrderedDict[str, str] = OrderedDict()
        self._max = max_bytes
        self.nbytes = 0
        self._lock = threading.Lock()
        self._counter = counter

    def get_many(self, ns: str, names: Sequence[str]) -> list[str | None]:
        out = []
        with self._lock:
            for name in names:
                key = keys.classify_value(ns, name)
                value = self._items.get(key)
                if value is not None:
                    self._items.move_to_end(key)
                out.append(value)
        return count(self._counter, out)

    def set_many(self, ns: str, items: Mapping[str, str]) -> None:
        with self._lock:
            for name, value in items.items():
                key = keys.classify_value(ns, name)
                old = self._items.pop(key, None)
                self.nbytes -= 0 if old is None else len(key) + len(old)
                self._items[key] = value
                self.nbytes += len(key) + len(value)
            while self.nbytes > self._max and self._items:
                key, value = self._items.popitem(last=False)
                self.nbytes -= len(key) + len(value)

    def __len__(self) -> int:
        return len(self._items)


class RedisBlobs:
    """Distributed mode: classifier values in the Redis cache (`clc:`, expiring like code lengths),
    read and written through the worker's event loop from the thread that runs the model."""

    def __init__(
        self, cache: aioredis.Redis, loop: asyncio.AbstractEventLoop, ttl_s: int, counter: Counter | None = None
    ) -> None:
        self._cache, self._loop, self._ttl, self._counter = cache, loop, ttl_s, counter

    def _call(self, coro):  # noqa: ANN001, ANN202 (a coroutine of the client)
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def get_many(self, ns: str, names: Sequence[str]) -> list[str | None]:
        if not names:
            return []
        return count(self._counter, self._call(self._cache.mget([keys.classify_value(ns, n) for n in names])))

    def set_many(self, ns: str, items: Mapping[str, str]) -> None:
        async def write() -> None:
            pipe = self._cache.pipeline(transaction=False)
            for name, value in items.items():
                pipe.set(keys.classify_value(ns, name), value, ex=self._ttl, nx=True)
            await pipe.execute()

        self._call(write())
