"""Where classifier definitions live: in memory (embedded mode, bounded) or in Redis (distributed).

A definition is plain JSON (id, model, method, options, examples), so any API process can rebuild
the fitted classifier from it; fitted state stays a per-process cache (see serving.py). Prediction
job records (status, progress, predictions when done) are JSON too and live beside them, with the
job's texts and its predictions so far, so a job whose process stopped can be resumed from where
it was (Redis; `persistent`) by whichever API process is asked about it next.
"""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from typing import Protocol

from codelen import keys
from codelen.settings import Settings


class ClassifierStore(Protocol):
    persistent: bool  # outlives the process: a stopped job can be resumed

    async def put(self, record: dict) -> None: ...

    async def get(self, classifier_id: str) -> dict | None: ...

    async def delete(self, classifier_id: str) -> bool: ...

    async def put_job(self, record: dict) -> None: ...

    async def get_job(self, job_id: str) -> dict | None: ...

    async def put_job_texts(self, job_id: str, texts: list[str]) -> None: ...

    async def get_job_texts(self, job_id: str) -> list[str] | None: ...

    async def append_job_results(self, job_id: str, results: list[dict]) -> int:
        """Add predictions after those already there (one atomic step); the count now."""
        ...

    async def get_job_results(self, job_id: str) -> list[dict]: ...

    async def claim_job(self, job_id: str, ttl_s: float) -> bool:
        """True for one caller until `ttl_s` passes: who resumes a stopped job."""
        ...

    async def finish_job(self, record: dict) -> None:
        """Store a job in its final state and drop what only a resume needed (texts, results so far)."""
        ...

    async def close(self) -> None: ...


class MemoryStore:
    """At most `max_entries` definitions and `max_jobs` prediction jobs; the least recently used
    is dropped first. Not persistent: it ends with its process, and its jobs with it."""

    persistent = False

    def __init__(self, max_entries: int, max_jobs: int = 1_000) -> None:
        self._items: OrderedDict[str, dict] = OrderedDict()
        self._max = max_entries
        self._jobs: OrderedDict[str, dict] = OrderedDict()
        self._max_jobs = max_jobs
        self._texts: dict[str, list[str]] = {}
        self._results: dict[str, list[dict]] = {}
        self._claims: dict[str, float] = {}

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
            dropped, _ = self._jobs.popitem(last=False)
            for side in (self._texts, self._results, self._claims):
                side.pop(dropped, None)

    async def get_job(self, job_id: str) -> dict | None:
        record = self._jobs.get(job_id)
        if record is None:
            return None
        self._jobs.move_to_end(job_id)
        return dict(record)

    async def put_job_texts(self, job_id: str, texts: list[str]) -> None:
        self._texts[job_id] = list(texts)

    async def get_job_texts(self, job_id: str) -> list[str] | None:
        return self._texts.get(job_id)

    async def append_job_results(self, job_id: str, results: list[dict]) -> int:
        got = self._results.setdefault(job_id, [])
        got.extend(results)
        return len(got)

    async def get_job_results(self, job_id: str) -> list[dict]:
        return list(self._results.get(job_id, []))

    async def claim_job(self, job_id: str, ttl_s: float) -> bool:
        now = time.monotonic()
        if self._claims.get(job_id, -math.inf) > now:
            return False
        self._claims[job_id] = now + ttl_s
        return True

    async def finish_job(self, record: dict) -> None:
        await self.put_job(record)
        for side in (self._texts, self._results, self._claims):
            side.pop(record["id"], None)

    async def close(self) -> None:
        self._items.clear()
        self._jobs.clear()
        for side in (self._texts, self._results, self._claims):
            side.clear()


class RedisStore:
    """One JSON string per classifier under keys.classifier(id), expiring `ttl_s` after last use;
    one per prediction job under keys.classifier_prediction(id), expiring `job_ttl_s` after its
    last write, beside its texts and its list of predictions so far (same expiry)."""

    persistent = True

    def __init__(self, url: str, ttl_s: int, job_ttl_s: int = 7 * 24 * 3600) -> None:
        from codelen.redis_client import connect

        self._redis = connect(url)  # the retrying client the backend uses: rides over a Redis restart
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

    async def put_job_texts(self, job_id: str, texts: list[str]) -> None:
        await self._redis.set(keys.classifier_prediction_texts(job_id), json.dumps(texts), ex=self._job_ttl)

    async def get_job_texts(self, job_id: str) -> list[str] | None:
        raw = await self._redis.get(keys.classifier_prediction_texts(job_id))
        return None if raw is None else json.loads(raw)

    async def append_job_results(self, job_id: str, results: list[dict]) -> int:
        key = keys.classifier_prediction_results(job_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, *(json.dumps(r) for r in results))
            pipe.expire(key, self._job_ttl)
            pipe.expire(keys.classifier_prediction_texts(job_id), self._job_ttl)
            count, *_ = await pipe.execute()
        return int(count)

    async def get_job_results(self, job_id: str) -> list[dict]:
        return [json.loads(r) for r in await self._redis.lrange(keys.classifier_prediction_results(job_id), 0, -1)]

    async def claim_job(self, job_id: str, ttl_s: float) -> bool:
        ms = max(1, int(ttl_s * 1000))
        return bool(await self._redis.set(keys.classifier_prediction_claim(job_id), "1", nx=True, px=ms))

    async def finish_job(self, record: dict) -> None:
        job_id = record["id"]
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.classifier_prediction(job_id), json.dumps(record), ex=self._job_ttl)
            pipe.delete(
                keys.classifier_prediction_texts(job_id),
                keys.classifier_prediction_results(job_id),
                keys.classifier_prediction_claim(job_id),
            )
            await pipe.execute()

    async def close(self) -> None:
        await self._redis.aclose()


def store_for(settings: Settings) -> ClassifierStore:
    if settings.redis_url:
        return RedisStore(settings.redis_url, settings.classifier_ttl_s, settings.prediction_job_ttl_s)
    return MemoryStore(settings.max_classifiers, settings.max_prediction_jobs)
