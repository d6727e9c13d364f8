"""Distributed mode, the API side: validate, hash, answer cache hits from Redis, enqueue the rest.

The same methods as EmbeddedBackend (the routes cannot tell them apart). The API never loads a
model: the workers publish each model's ModelInfo (revision, window) under keys.model_info, and the
API builds cache keys from it. Work goes on one Redis Stream read by `codelen worker` processes;
job state lives in Redis (workers/redis_state.py), so any API process can answer for any job.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import ParamSpec, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from codelen import keys
from codelen.datasets import Dataset
from codelen.metrics import Metrics
from codelen.scores import PairLengths
from codelen.settings import Settings
from models.protocol import ModelInfo
from models.registry import ModelUnavailable, Registry
from workers import redis_state
from workers.compute import FIT, ClassifyTask, Task, pair_tasks
from workers.jobs import (
    ClassifySpec,
    JobConflict,
    JobSpec,
    Overloaded,
    PairSpec,
    TaskFailed,
    TooLarge,
    Unavailable,
    classify_rows,
    matrix_document,
    new_job_id,
    pair_result,
)

log = logging.getLogger("codelen.redis")

P = ParamSpec("P")
R = TypeVar("R")
CHUNK = 1000  # keys per MGET / commands per pipeline when a job is large
QUEUE_DEPTH_REFRESH_S = 1.0


def redis_errors_unavailable(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Redis down or restarting is a 503 with Retry-After, not a 500."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise Unavailable(f"Redis is unreachable ({exc})") from None
        except ResponseError as exc:
            if not redis_state.out_of_memory(exc):
                raise
            raise Unavailable("Redis is full (maxmemory, noeviction): retry later") from None

    return wrapper


class RedisBackend:
    mode = "distributed"

    def __init__(self, settings: Settings, registry: Registry, metrics: Metrics) -> None:
        assert settings.redis_url, "RedisBackend needs REDIS_URL"
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.redis: aioredis.Redis = redis_state.connect(settings.redis_url)  # queue and jobs (clq:)
        self.cache = redis_state.connect(settings.cache_redis_url) if settings.cache_redis_url else self.redis  # clc:
        self._cancel = self.redis.register_script(redis_state.CANCEL)
        self._infos: dict[str, tuple[float, ModelInfo]] = {}
        self._depth = 0
        self._depth_at = 0.0
        self._refresher: asyncio.Task | None = None

    async def start(self) -> None:
        with contextlib.suppress(RedisConnectionError, RedisTimeoutError):  # ready() reports it
            for model_id in self.registry.ids():
                await redis_state.ensure_group(self.redis, model_id)
        self._refresher = asyncio.create_task(self._refresh_depth(), name="codelen-queue-depth")

    async def stop(self) -> None:
        if self._refresher:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        await self.redis.aclose()
        if self.cache is not self.redis:
            await self.cache.aclose()

    async def ready(self) -> tuple[bool, str]:
        try:
            await self.redis.ping()
            workers = await redis_state.live_workers(self.redis, self.settings)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            return False, f"Redis unreachable: {exc}"
        return True, f"ok; {workers} worker(s) alive"

    @redis_errors_unavailable
    async def model_info(self, model_id: str, mode: str = "context") -> ModelInfo:
        """The info the workers published (cached for model_info_refresh_s), in conditioning `mode`."""
        return (await self._published_info(model_id)).with_mode(mode)

    async def _published_info(self, model_id: str) -> ModelInfo:
        now = time.monotonic()
        hit = self._infos.get(model_id)
        if hit is not None and now - hit[0] < self.settings.model_info_refresh_s:
            return hit[1]
        self.registry.check(model_id)
        raw = await self.redis.get(keys.model_info(model_id))
        if raw is None:
            raise ModelUnavailable(f"no worker has published model {model_id!r} yet: start a worker that serves it")
        info = redis_state.info_from_json(raw)
        self._infos[model_id] = (now, info)
        return info

    def queue_depth(self) -> int:
        return self._depth

    async def _queue_depth(self) -> int:
        self._depth = await redis_state.queue_depth(self.redis, self.registry.ids())
        self._depth_at = time.monotonic()
        return self._depth

    async def _refresh_depth(self) -> None:
        while True:
            with contextlib.suppress(RedisConnectionError, RedisTimeoutError):
                await self._queue_depth()
            await asyncio.sleep(QUEUE_DEPTH_REFRESH_S)

    # -- /v1/score ---------------------------------------------------------------------------

    @redis_errors_unavailable
    async def lookup(
        self, model_id: str, x: Dataset, y: Dataset, mode: str = "context", direction: str = "both"
    ) -> PairLengths | None:
        """The pair's code lengths if all are cached (one MGET), else None."""
        ns = (await self.model_info(model_id, mode)).cache_namespace
        tasks = pair_tasks(model_id, x.sha256, y.sha256, mode, direction)
        values = await self.cache.mget([t.key(ns) for t in tasks])
        if None in values:
            self.metrics.cache.labels("miss").inc()
            return None
        self.metrics.cache.labels("hit").inc(len(values))
        return PairLengths.of([float(v) for v in values])

    @redis_errors_unavailable
    async def score(
        self, model_id: str, x: Dataset, y: Dataset, wait_s: float, mode: str = "context", direction: str = "both"
    ) -> tuple[PairLengths | None, bool, dict | None]:
        cached = await self.lookup(model_id, x, y, mode, direction)
        if cached is not None:
            return cached, True, None
        tasks = pair_tasks(model_id, x.sha256, y.sha256, mode, direction)
        spec = JobSpec(model_id, [PairSpec("0", x, y)], mode=mode, direction=direction)
        job = await self._create(spec, await self.model_info(model_id, mode))
        deadline = time.monotonic() + wait_s
        pause = 0.002
        while True:
            status, error = await self.redis.hmget(keys.job(str(job["id"])), ["status", "error"])
            if status == "succeeded":
                got = await self.redis.hmget(keys.job_values(str(job["id"])), [redis_state.task_id(t) for t in tasks])
                if None not in got:
                    return PairLengths.of([float(b) for b in got]), False, None
            if status == "failed":
                raise TaskFailed(error or "the pair could not be scored")
            if status is None or status == "cancelled" or time.monotonic() >= deadline:
                return None, False, await self.job(str(job["id"])) or job
            await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, self.settings.score_poll_max_s)

    # -- jobs -------------------------------------------------------------------------------

    @redis_errors_unavailable
    async def submit(self, spec: JobSpec | ClassifySpec, idempotency_key: str | None) -> dict[str, object]:
        if not idempotency_key:
            return await self._create(spec, await self.model_info(spec.model, spec.mode))
        digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
        idem = keys.idempotency(digest)
        job_id = new_job_id()
        if not await self.redis.set(idem, f"{job_id} {spec.fingerprint}", nx=True, ex=self.settings.job_ttl_s):
            return await self._existing(idem, spec)
        try:
            return await self._create(spec, await self.model_info(spec.model, spec.mode), job_id, idem)
        except BaseException:
            await self.redis.delete(idem)  # nothing was created under this key
            raise

    async def _existing(self, idem: str, spec: JobSpec | ClassifySpec) -> dict[str, object]:
        """The job an Idempotency-Key already names (its creation may still be under way)."""
        for _ in range(200):
            raw = await self.redis.get(idem)
            if raw is None:  # the first request failed and released the key
                return await self.submit(spec, None)
            job_id, fingerprint = raw.split(" ", 1)
            if fingerprint != spec.fingerprint:
                raise JobConflict("this Idempotency-Key was used with a different request body")
            job = await self.job(job_id)
            if job is not None:
                return job
            await asyncio.sleep(0.01)
        raise Unavailable("the job for this Idempotency-Key is still being created; retry")

    async def _create(
        self, spec: JobSpec | ClassifySpec, info: ModelInfo, job_id: str | None = None, idem: str | None = None
    ) -> dict[str, object]:
        """Record the job, copy the cached values, enqueue the missing tasks: one transaction."""
        s = self.settings
        job_id = job_id or new_job_id()
        if isinstance(spec, ClassifySpec):
            return await self._create_classify(spec, info, job_id, idem)
        ns = info.cache_namespace
        tasks: dict[str, Task] = {}  # task id → task, each once per job
        pair_tids: list[list[str]] = []
        texts: dict[str, str] = {}
        sizes: dict[str, int] = {}
        for p in spec.pairs:
            tids = []
            for t in pair_tasks(spec.model, p.x.sha256, p.y.sha256, spec.mode, spec.direction):
                tid = redis_state.task_id(t)
                if tid not in tasks:
                    tasks[tid] = t
                if tid not in tids:
                    tids.append(tid)
            pair_tids.append(tids)
            texts[p.x.sha256], texts[p.y.sha256] = p.x.text, p.y.text
            sizes[p.x.sha256], sizes[p.y.sha256] = p.x.n_bytes, p.y.n_bytes
        order = list(tasks)
        cached: dict[str, str] = {}
        for i in range(0, len(order), CHUNK):
            chunk = order[i : i + CHUNK]
            for tid, v in zip(chunk, await self.cache.mget([tasks[t].key(ns) for t in chunk]), strict=True):
                if v is not None:
                    cached[tid] = v
        missing = [tid for tid in order if tid not in cached]
        if missing:  # 413 if it could never fit, else 429 while the queue is too deep
            self._admit(len(missing), 0 if len(missing) > s.max_queue_items else await self._queue_depth())
        self.metrics.cache.labels("hit").inc(len(cached))
        self.metrics.cache.labels("miss").inc(len(missing))

        waiting: dict[str, list[str]] = {}
        remaining: dict[str, int] = {}
        for idx, tids in enumerate(pair_tids):
            lacking = [tid for tid in tids if tid not in cached]
            if lacking:
                remaining[str(idx)] = len(lacking)
                for tid in lacking:
                    waiting.setdefault(tid, []).append(str(idx))
        total, done = len(spec.pairs), len(spec.pairs) - len(remaining)
        now = time.time()
        record = {
            "id": job_id,
            "model": spec.model,
            "kind": "matrix" if spec.matrix_ids else "pairs",
            "mode": spec.mode,
            "direction": spec.direction,
            "status": "queued" if remaining else "succeeded",
            "total": total,
            "done": done,
            "created_at": repr(now),
            "info": redis_state.info_to_json(info),
            "ns": ns,
        }
        if not remaining:
            record["finished_at"] = repr(now)
        if spec.matrix_ids:
            record["matrix_ids"] = json.dumps(spec.matrix_ids)
        if idem:
            record["idem"] = idem  # deleted with the job
        needed_shas = {sha for tid in missing for sha in tasks[tid].shas()}

        job_keys = keys.job_keys(job_id)
        pipe = self.redis.pipeline(transaction=True)
        for sha in needed_shas:  # texts first: an entry never names a text that is not there
            pipe.set(keys.data(sha), texts[sha], ex=s.job_ttl_s)
        pipe.hset(job_keys[0], mapping=record)
        pairs = [json.dumps([p.id, p.x.sha256, p.y.sha256, p.x.n_bytes, p.y.n_bytes]) for p in spec.pairs]
        for i in range(0, len(pairs), CHUNK):
            pipe.rpush(job_keys[1], *pairs[i : i + CHUNK])
        for i in range(0, len(order), CHUNK):
            chunk = {tid: cached[tid] for tid in order[i : i + CHUNK] if tid in cached}
            if chunk:
                pipe.hset(job_keys[2], mapping=chunk)
        if waiting:
            pipe.hset(job_keys[3], mapping={tid: ",".join(idx) for tid, idx in waiting.items()})
            pipe.hset(job_keys[4], mapping=remaining)
        for key in job_keys:
            pipe.expire(key, s.job_ttl_s)
        stream = keys.stream(spec.model)
        for tid in missing:
            t = tasks[tid]
            cost = sum(sizes[sha] for sha in t.shas())
            fields = redis_state.entry_fields(job_id, ns, t, cost)
            pipe.xadd(stream, fields, maxlen=s.stream_max_len, approximate=True)
        await pipe.execute()
        self._depth += len(missing)
        self.metrics.queue_depth.set(self._depth)
        if not remaining:
            self.metrics.jobs.labels("succeeded").inc()
        return redis_state.job_state(record | {"total": str(total), "done": str(done)}).public()

    def _admit(self, needed: int, depth: int, what: str = "code lengths computed") -> None:
        """413 if `needed` queue items could never fit, 429 while the queue is too deep for them."""
        s = self.settings
        if needed > s.max_queue_items:
            raise TooLarge(
                f"this request needs {needed} {what}; the queue holds at most "
                f"{s.max_queue_items} (CODELEN_MAX_QUEUE_ITEMS): send it in parts"
            )
        if depth + needed > s.max_queue_items:
            raise Overloaded(f"queue holds {depth} tasks; this job needs {needed} more")

    async def _create_classify(
        self, spec: ClassifySpec, info: ModelInfo, job_id: str, idem: str | None
    ) -> dict[str, object]:
        """A classifier job: its record, its texts (the `pairs` list) and one stream entry per task;
        each text waits for its chunk's task, so `done` counts texts (a fit: all examples at once).
        The workers read the classifier's definition from the classifier store (keys.classifier)."""
        s = self.settings
        tasks = spec.tasks(job_id)
        self._admit(len(tasks), await self._queue_depth(), f"tasks queued ({spec.chunk} texts each)")
        now = time.time()
        record = {
            "id": job_id,
            "model": spec.model,
            "kind": spec.kind,
            "mode": spec.mode,
            "direction": spec.direction,
            "status": "queued",
            "total": spec.total,
            "done": 0,
            "created_at": repr(now),
            "info": redis_state.info_to_json(info),
            "ns": info.cache_namespace,
            "classifier": spec.classifier,
            "chunk": spec.chunk,
        }
        if idem:
            record["idem"] = idem
        job_keys = keys.job_keys(job_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(job_keys[0], mapping=record)
        for i in range(0, len(spec.texts), CHUNK):
            pipe.rpush(job_keys[1], *spec.texts[i : i + CHUNK])
        first = {t: max(t.start, 0) for t in tasks}  # the fit waits for examples 0..n-1
        waiting = {redis_state.task_id(t): ",".join(str(first[t] + i) for i in range(t.count)) for t in tasks}
        pipe.hset(job_keys[3], mapping=waiting)
        for i in range(0, spec.total, CHUNK):
            pipe.hset(job_keys[4], mapping={str(k): 1 for k in range(i, min(spec.total, i + CHUNK))})
        for key in job_keys:
            pipe.expire(key, s.job_ttl_s)
        stream = keys.stream(spec.model)
        for t in tasks:
            chunk = spec.texts[t.start : t.start + t.count] if t.start != FIT else []
            cost = sum(len(x.encode("utf-8", "surrogatepass")) for x in chunk)
            fields = redis_state.entry_fields(job_id, info.cache_namespace, t, cost)
            pipe.xadd(stream, fields, maxlen=s.stream_max_len, approximate=True)
        await pipe.execute()
        self._depth += len(tasks)
        self.metrics.queue_depth.set(self._depth)
        return redis_state.job_state({k: str(v) for k, v in record.items()}).public()

    @redis_errors_unavailable
    async def job(self, job_id: str) -> dict[str, object] | None:
        record = await self.redis.hgetall(keys.job(job_id))
        return redis_state.job_state(record).public() if record else None

    @redis_errors_unavailable
    async def results(self, job_id: str) -> tuple[dict[str, object], Iterator[dict], dict | None] | None:
        """Rows built as they are read (the route streams them); a matrix built in a thread."""
        kind = await self.redis.hget(keys.job(job_id), "kind")
        if kind in ("fit", "predict"):
            return await self._classify_results(job_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hgetall(keys.job(job_id))
        pipe.lrange(keys.job_pairs(job_id), 0, -1)
        pipe.hgetall(keys.job_values(job_id))
        record, pairs, values = await pipe.execute()
        if not record:
            return None
        job = redis_state.job_state(record)
        info = redis_state.info_from_json(record["info"])

        def rows() -> Iterator[dict]:
            for raw in pairs:
                pair_id, hx, hy, nx, ny = json.loads(raw)
                tasks = pair_tasks(job.model, hx, hy, job.mode, job.direction)
                got = [values.get(redis_state.task_id(t)) for t in tasks]
                if None in got:
                    continue
                pair = PairSpec(pair_id, Dataset("", hx, nx, 0), Dataset("", hy, ny, 0))
                yield pair_result(info, pair, PairLengths.of([float(b) for b in got]))

        matrix = None
        if job.matrix_ids and job.status == "succeeded":
            matrix = await asyncio.to_thread(matrix_document, job.matrix_ids, rows())
        return {**job.public(), "conditioning_parameters": info.conditioning.as_dict()}, rows(), matrix

    async def _classify_results(self, job_id: str) -> tuple[dict[str, object], Iterator[dict], None] | None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hgetall(keys.job(job_id))
        pipe.hgetall(keys.job_values(job_id))
        record, values = await pipe.execute()
        if not record:
            return None
        job = redis_state.job_state(record)
        info = redis_state.info_from_json(record["info"])
        total, chunk, cid = job.total, int(record.get("chunk", 16)), record["classifier"]
        if job.kind == "fit":
            tasks = [ClassifyTask(job.model, cid, job_id, FIT, total)]
        else:
            tasks = [ClassifyTask(job.model, cid, job_id, i, min(chunk, total - i)) for i in range(0, total, chunk)]
        found = [values.get(redis_state.task_id(t)) for t in tasks]
        rows = classify_rows(job.kind, cid, tasks, [None if v is None else json.loads(v) for v in found])
        return {**job.public(), "conditioning_parameters": info.conditioning.as_dict()}, rows, None

    @redis_errors_unavailable
    async def cancel(self, job_id: str) -> dict[str, object] | None:
        """Cancel a queued or running job; delete a succeeded or failed one (its last state is returned)."""
        record = await self.redis.hgetall(keys.job(job_id))
        if not record:
            return None
        idem = [record["idem"]] if record.get("idem") else []
        args = [repr(time.time()), self.settings.job_ttl_s]
        status = await self._cancel(keys=[*keys.job_keys(job_id), *idem], args=args)
        if status is None:
            return None
        if status == "cancelled":
            self.metrics.jobs.labels("cancelled").inc()
        if status in ("succeeded", "failed"):  # deleted: what it was
            done = record["total"] if status == "succeeded" else record.get("done", "0")
            return redis_state.job_state(record | {"status": status, "done": done}).public()
        return await self.job(job_id)
