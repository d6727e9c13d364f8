"""Where classifier definitions live: in memory (embedded mode, bounded) or in Redis (distributed).

A definition is plain JSON (id, model, method, options, examples, and what the fit chose), so any
process can rebuild the fitted classifier from it: the embedded engine from the job that carries
it, a `codelen worker` from Redis (keys.classifier). Fits and predictions are jobs of the one job
system (workers/), not kept here.
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

    async def close(self) -> None: ...


class MemoryStore:
    """At most `max_entries` definitions; the least recently used is dropped first."""

    def __init__(self, max_entries: int) -> None:
        self._items: OrderedDict[str, dict] = OrderedDict()
        self._max = max_entries

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

    async def close(self) -> None:
        self._items.clear()


class RedisStore:
    """One JSON string per classifier under keys.classifier(id), expiring `ttl_s` after last use."""

    def __init__(self, url: str, ttl_s: int) -> None:
        from codelen.redis_client import connect

        self._redis = connect(url)  # the retrying client the backend uses: rides over a Redis restart
        self._ttl = ttl_s

    async def put(self, record: dict) -> None:
        await self._redis.set(keys.classifier(record["id"]), json.dumps(record), ex=self._ttl)

    async def get(self, classifier_id: str) -> dict | None:
        key = keys.classifier(classifier_id)
        raw = await self._redis.getex(key, ex=self._ttl)
        return None if raw is None else json.loads(raw)

    async def delete(self, classifier_id: str) -> bool:
        return bool(await self._redis.delete(keys.classifier(classifier_id)))

    async def close(self) -> None:
        await self._redis.aclose()


def store_for(settings: Settings) -> ClassifierStore:
    if settings.redis_url:
        return RedisStore(settings.redis_url, settings.classifier_ttl_s)
    return MemoryStore(settings.max_classifiers)
