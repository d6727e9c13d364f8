"""Where classifier definitions live: in memory (embedded mode, bounded) or in Redis (distributed).

A definition is plain JSON (id, model, method, options, examples), so any API process can rebuild
the fitted classifier from it; fitted state stays a per-process cache (see serving.py). Prediction
job records (status, progress, predictions when done) are JSON too and live beside them.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Protocol

from codelen import keys
from codelen.settings import Settings


class ClassifierStore(Protocol):
    async def put(self, record: dict) -> None: ...

    async def get(self, classifier_id: str) -> dict | None: ...

    async def delete(self, classifier_id: str) -> bool: ...

    async def put_job(self, record: dict) -> None: ...

    async def get_job(self, job_id: str) -> dict | None: ...

    async def close(self) -> None: ...


class MemoryStore:
    """At most `max_entries` definitions and `max_jobs` prediction jobs; the least recently used
    is dropped first."""

    def __init__(self, max_entries: int, max_jobs: int = 1_000) -> None:
        self._items: OrderedDict[str, dict] = OrderedDict()
        self._max = max_entries
        self._jobs: OrderedDict[str, dict] = OrderedDict()
        self._max_jobs = max_jobs

    async def put(self, record: dict) -> None:
        self._items[record["id"]] = record
        self._items.move_to_end(record["id"])
        while len(self._items) > self._max:
            self._items.popitem(last=False)

    async def get(self, classifier_id: str) -> dict | None:
        record = self._items.get(classifier_id)
        if record is not None:
            self._items.move_to_end(classifier_id)
        return record

    async def delete(self, classifier_id: str) -> bool:
        return self._items.pop(classifier_id, None) is not None

    async def put_job(self, record: dict) -> None:
        self._jobs[record["id"]] = dict(record)  # a copy: the caller keeps changing its own
        self._jobs.move_to_end(record["id"])
        while len(self._jobs) > self._max_jobs:
            self._jobs.popitem(last=False)

    async def get_job(self, job_id: str) -> dict | None:
        record = self._jobs.get(job_id)
        if record is None:
            return None
        self._jobs.move_to_end(job_id)
        return dict(record)

    async def close(self) -> None:
        self._items.clear()
        self._jobs.clear()


class RedisStore:
    """One JSON string per classifier under keys.classifier(id), expiring `ttl_s` after last use;
    one per prediction job under keys.classifier_prediction(id), expiring `job_ttl_s` after its
    last write."""

    def __init__(self, url: str, ttl_s: int, job_ttl_s: int = 7 * 24 * 3600) -> None:
        import redis.asyncio as redis

        self._redis = redis.from_url(url)
        self._ttl = ttl_s
        self._job_ttl = job_ttl_s

    async def put(self, record: dict) -> None:
        await self._redis.set(keys.classifier(record["id"]), json.dumps(record), ex=self._ttl)

    async def get(self, classifier_id: str) -> dict | None:
        key = keys.classifier(classifier_id)
        raw = await self._redis.getex(key, ex=self._ttl)
        return None if raw is None else json.loads(raw)

    async def delete(self, classifier_id: str) -> bool:
        return bool(await self._redis.delete(keys.classifier(classifier_id)))

    async def put_job(self, record: dict) -> None:
        await self._redis.set(keys.classifier_prediction(record["id"]), json.dumps(record), ex=self._job_ttl)

    async def get_job(self, job_id: str) -> dict | None:
        raw = await self._redis.get(keys.classifier_prediction(job_id))
        return None if raw is None else json.loads(raw)

    async def close(self) -> None:
        await self._redis.aclose()


def store_for(settings: Settings) -> ClassifierStore:
    if settings.redis_url:
        return RedisStore(settings.redis_url, settings.classifier_ttl_s, settings.prediction_job_ttl_s)
    return MemoryStore(settings.max_classifiers, settings.max_prediction_jobs)
