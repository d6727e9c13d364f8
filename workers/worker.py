"""`codelen worker`: one process per GPU, its models loaded once, reading the Redis streams.

Stages, as in embedded mode: read → batch → run → write.
- read: XREADGROUP through the consumer group, many entries across jobs; entries of dead workers
  come back with XAUTOCLAIM (idle > reclaim_idle_s); one delivered too often is dead-lettered.
- batch: up to batch_max_items entries and batch_tokens bytes of text, waiting at most batch_wait_ms
  after the first; the next batch is read while the model runs this one.
- run: `run_tasks_isolating` in a thread; values already in the cache are not computed again.
- write: cache values (SET NX, idempotent: keyed by content hash), then per entry the RECORD script
  (job progress + XACK in one atomic step). Permanent failures go to the dead-letter stream and
  fail their job with the reason.

While it works, the heartbeat re-claims its own pending entries (XCLAIM JUSTID), so a long batch is
never mistaken for a dead worker. SIGTERM: stop reading, finish what was read, exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import redis.asyncio as aioredis
from prometheus_client import Counter, start_http_server
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from classify.caching import caching
from codelen import keys
from codelen.metrics import Metrics
from codelen.settings import Settings
from models.protocol import Compressor, Progress, UnsupportedMode
from models.registry import Registry
from workers import redis_state
from workers.classifying import FittedClassifiers, RedisBlobs, run_classify
from workers.compute import FIT, ClassifyTask, SymbolCache, Task, run_tasks_isolating
from workers.redis_state import Entry

log = logging.getLogger("codelen.worker")

T = TypeVar("T")
READ_BLOCK_MS = 1000  # longest blocking read, so a stop request is seen within a second
# Batch budget when CODELEN_BATCH_TOKENS is unset, in bytes of text (a bound on byte-level tokens).
# A worker batch is a unit of scheduling; the compressor packs it into model batches by its own budget.
DEFAULT_BATCH_BYTES = 65536
CONSUMER_GC_S = 3600  # consumers with nothing pending and idle this long are removed from the group
REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError)
PROGRESS_FLUSH_S = 1.0  # how often a running batch adds its tokens to its jobs' records


@dataclass
class Outcome:
    """What a batch came to, for `Worker._write`: the entries whose job still wants them (`live`),
    entry id → the value to record in its job (`recorded`), cache key → bits computed now
    (`computed`), entry id → why it is dead-lettered (`failed`: permanent) or why it is left
    pending for a retry (`errors`: transient)."""

    live: list[Entry]
    recorded: dict[str, str] = field(default_factory=dict)
    computed: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


class Worker:
    def __init__(self, settings: Settings, name: str | None = None) -> None:
        assert settings.redis_url, "a worker needs REDIS_URL"
        self.settings = settings
        self.registry = Registry(settings)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.redis: aioredis.Redis = redis_state.connect(settings.redis_url)  # queue and jobs (clq:)
        self.cache = redis_state.connect(settings.cache_redis_url) if settings.cache_redis_url else self.redis  # clc:
        self._record = self.redis.register_script(redis_state.RECORD)
        self._fail = self.redis.register_script(redis_state.FAIL)
        self._tokens = self.redis.register_script(redis_state.PROGRESS)
        self._compressors: dict[str, Compressor] = {}
        self._symbols = SymbolCache()
        self._fitted = FittedClassifiers(settings.fitted_classifiers)
        self._blobs: RedisBlobs | None = None  # set in run(): it needs the running loop
        self._held: dict[str, Entry] = {}  # read, not yet acknowledged
        self._mean_cost: float | None = None  # of the entries read lately (read_count)
        self._stopping = asyncio.Event()
        self._next_reclaim = 0.0
        self.failed = False  # set when the reader died of an unexpected error: exit non-zero
        self.counts = {"computed": 0, "cached": 0, "skipped": 0, "dead": 0, "batches": 0}
        self.metrics = Metrics()  # served by `codelen worker --metrics-port`
        self._outcomes = Counter(
            "codelen_worker_entries",
            "Stream entries and batches by outcome",
            ["outcome"],
            registry=self.metrics.registry,
        )

    def _count(self, outcome: str, n: int) -> None:
        self.counts[outcome] += n
        self._outcomes.labels(outcome).inc(n)

    def stop(self) -> None:
        self._stopping.set()

    @property
    def streams(self) -> list[str]:
        return [keys.stream(m) for m in self._compressors]

    async def run(self) -> None:
        for model_id in self.registry.ids():
            started = time.perf_counter()
            self._compressors[model_id] = await asyncio.to_thread(self.registry.get, model_id)
            log.info("%s loaded in %.1f s", model_id, time.perf_counter() - started)
            if self._stopping.is_set():  # stopped while loading: nothing was read yet
                await self.redis.aclose()
                return
        loop, ttl = asyncio.get_running_loop(), self.settings.cache_ttl_s
        self._blobs = RedisBlobs(self.cache, loop, ttl, self.metrics.classify_values)
        await self._retrying(self._announce)
        log.info("worker %s serving %s", self.name, ", ".join(self._compressors))
        heartbeat = asyncio.create_task(self._heartbeat(), name="codelen-heartbeat")
        batches: asyncio.Queue[list[Entry] | None] = asyncio.Queue(maxsize=1)
        reader = asyncio.create_task(self._read(batches), name="codelen-reader")
        try:
            while (batch := await batches.get()) is not None:
                await self._process(batch)
        finally:
            reader.cancel()
            heartbeat.cancel()
            for task in (reader, heartbeat):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._leave()
            await self.redis.aclose()
            if self.cache is not self.redis:
                await self.cache.aclose()
        log.info("worker %s stopped: %s", self.name, self.counts)

    async def _announce(self) -> None:
        """Publish what this worker serves: the API builds cache keys from this ModelInfo."""
        pipe = self.redis.pipeline(transaction=False)
        for model_id, compressor in self._compressors.items():
            pipe.set(keys.model_info(model_id), redis_state.info_to_json(compressor.info))
        now = time.time()
        pipe.zadd(keys.WORKERS, {self.name: now})
        pipe.zremrangebyscore(keys.WORKERS, "-inf", now - CONSUMER_GC_S)  # long gone
        await pipe.execute()
        for model_id in self._compressors:
            await redis_state.ensure_group(self.redis, model_id)

    async def _retrying(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run `op` until Redis answers (it may be restarting, or full until TTLs free memory):
        writes here are idempotent."""
        pause = 0.05
        while True:
            try:
                return await op()
            except (*REDIS_ERRORS, ResponseError) as exc:
                if isinstance(exc, ResponseError) and not redis_state.out_of_memory(exc):
                    raise
                log.warning("Redis unavailable (%s); retrying in %.2f s", exc, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)

    async def _heartbeat(self) -> None:
        period = min(self.settings.heartbeat_s, self.settings.reclaim_idle_s / 3)
        while True:
            await asyncio.sleep(period)
            try:
                await self._announce()
                by_stream: dict[str, list[str]] = {}
                for e in list(self._held.values()):
                    by_stream.setdefault(e.stream, []).append(e.id)
                for stream, ids in by_stream.items():  # still ours: reset their idle time
                    await self.redis.xclaim(stream, keys.GROUP, self.name, 0, ids, justid=True)
            except REDIS_ERRORS as exc:
                log.warning("heartbeat failed: %s", exc)

    async def _leave(self) -> None:
        """Clean exit: drop the heartbeat; leave the group if nothing of ours is pending."""
        with contextlib.suppress(*REDIS_ERRORS):
            await self.redis.zrem(keys.WORKERS, self.name)
            for stream in self.streams:
                pending = await self.redis.xpending_range(stream, keys.GROUP, "-", "+", 1, consumername=self.name)
                if not pending:
                    await self.redis.xgroup_delconsumer(stream, keys.GROUP, self.name)

    # -- read and batch --------------------------------------------------------------------

    async def _read(self, out: asyncio.Queue[list[Entry] | None]) -> None:
        try:
            await self._read_batches(out)
        except Exception:
            log.exception("the reader failed; stopping (entries read are redelivered after reclaim_idle_s)")
            self.failed = True
            await out.put(None)

    async def _read_batches(self, out: asyncio.Queue[list[Entry] | None]) -> None:
        carry: list[Entry] = []
        while not self._stopping.is_set():
            try:
                batch, carry = await self._next_batch(carry)
            except REDIS_ERRORS as exc:
                log.warning("read failed (%s); retrying", exc)
                await asyncio.sleep(0.5)
                continue
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._retrying(self._announce)  # Redis lost the stream: recreate the group
                continue
            if batch:
                await out.put(batch)
        if carry:  # read but not run: finish them before leaving
            await out.put(carry)
        await out.put(None)

    async def _next_batch(self, carry: list[Entry]) -> tuple[list[Entry], list[Entry]]:
        """Fill a batch up to the item and size budgets, waiting at most batch_wait_ms after its
        first entry. Returns (batch, entries read beyond the budget, for the next batch)."""
        s = self.settings
        pending = await self._reclaim_if_due() + carry
        batch: list[Entry] = []
        cost, budget = 0, self._budget()
        deadline: float | None = None
        while True:
            while pending and len(batch) < s.batch_max_items and (not batch or cost + pending[0].cost <= budget):
                entry = pending.pop(0)
                batch.append(entry)
                cost += entry.cost
            if pending or len(batch) >= s.batch_max_items or cost >= budget:
                break
            if batch:
                deadline = deadline or time.monotonic() + s.batch_wait_ms / 1000
                left_ms = (deadline - time.monotonic()) * 1000
                if left_ms < 1:
                    break
                block = int(left_ms)
            elif self._stopping.is_set():
                break
            else:
                block = READ_BLOCK_MS
            count = read_count(s.batch_max_items - len(batch), budget - cost, self._mean_cost, empty=not batch)
            if count < 1:
                break
            streams = {st: ">" for st in self.streams}
            got = await self.redis.xreadgroup(keys.GROUP, self.name, streams, count=count, block=block)
            pending += await self._accept(got or [])
            if not got and not batch:
                pending += await self._reclaim_if_due()
        return batch, pending

    def _budget(self) -> int:
        """Bytes of text in one batch: CODELEN_BATCH_TOKENS, else the largest model batch of the
        compressors served (a byte never makes more than one token), else DEFAULT_BATCH_BYTES."""
        own = [getattr(c, "batch_tokens", None) for c in self._compressors.values()]
        return self.settings.batch_tokens or max((b for b in own if isinstance(b, int)), default=DEFAULT_BATCH_BYTES)

    async def _accept(self, got: list) -> list[Entry]:
        """Parse entries just delivered to us; one that is not a task is dead-lettered at once."""
        out = []
        for _stream, messages in got:
            for entry_id, fields in messages:
                try:
                    entry = redis_state.parse_entry(entry_id, fields)
                except (LookupError, ValueError) as exc:
                    await self._dead(_stream, entry_id, fields, f"malformed stream entry: {exc!r}")
                    continue
                self._held[entry.id] = entry
                self._mean_cost = entry.cost if self._mean_cost is None else 0.8 * self._mean_cost + 0.2 * entry.cost
                out.append(entry)
        return out

    async def _reclaim_if_due(self) -> list[Entry]:
        """Every reclaim_interval_s: take over entries idle for reclaim_idle_s (their worker died),
        dead-letter those delivered more than max_deliveries times, and trim the streams."""
        s = self.settings
        now = time.monotonic()
        if now < self._next_reclaim:
            return []
        self._next_reclaim = now + s.reclaim_interval_s
        out: list[Entry] = []
        for stream in self.streams:
            _next, claimed, _deleted = await self.redis.xautoclaim(
                stream, keys.GROUP, self.name, int(s.reclaim_idle_s * 1000), "0-0", count=s.batch_max_items
            )
            claimed = [(i, f) for i, f in claimed if f]
            if claimed:
                mine = await self.redis.xpending_range(stream, keys.GROUP, "-", "+", 100_000, consumername=self.name)
                deliveries = {p["message_id"]: p["times_delivered"] for p in mine}
                fresh = []
                for entry_id, fields in claimed:
                    n = deliveries.get(entry_id, 1)
                    # An entry whose worker died holding it is charged less than one that raised:
                    # the kill (operator, OOM killer, preemption) hit its whole batch, and a
                    # restarted worker reclaims first what it held before, so a few kills in a
                    # row must not dead-letter innocent work.
                    last = await self.redis.get(keys.item_error(entry_id)) if n > s.max_deliveries else None
                    if n > (s.max_deliveries if last else s.max_crash_deliveries):
                        why = f"last error: {last}" if last else "no error recorded: its worker died each time"
                        await self._dead(stream, entry_id, fields, f"delivered {n} times without completing ({why})")
                    else:
                        fresh.append((entry_id, fields))
                log.info("reclaimed %d entries of dead workers from %s", len(fresh), stream)
                out += await self._accept([(stream, fresh)])
            await self._trim(stream)
        await self._forget_dead_consumers()
        return out

    async def _trim(self, stream: str) -> None:
        """Drop acknowledged entries: everything older than the oldest pending one and not newer
        than the last delivered one (the MAXLEN on XADD is only a backstop)."""
        groups = await self.redis.xinfo_groups(stream)
        group = next((g for g in groups if g["name"] == keys.GROUP), None)
        if group is None:
            return
        summary = await self.redis.xpending(stream, keys.GROUP)
        minid = summary["min"] if summary["pending"] else group["last-delivered-id"]
        if minid and minid != "0-0":
            await self.redis.xtrim(stream, minid=minid, approximate=True)

    async def _forget_dead_consumers(self) -> None:
        for stream in self.streams:
            for c in await self.redis.xinfo_consumers(stream, keys.GROUP):
                if c["name"] != self.name and c["pending"] == 0 and c["idle"] > CONSUMER_GC_S * 1000:
                    await self.redis.xgroup_delconsumer(stream, keys.GROUP, c["name"])

    # -- run and write ---------------------------------------------------------------------

    async def _process(self, batch: list[Entry]) -> None:
        started = time.perf_counter()
        scores = [e for e in batch if isinstance(e.task, Task)]
        classify = [e for e in batch if isinstance(e.task, ClassifyTask)]
        if scores:
            await self._process_scores(scores)
        if classify:
            await self._process_classify(classify)
        self._count("batches", 1)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.stage.labels("batch").observe(time.perf_counter() - started)
        log.debug("batch of %d in %.3f s", len(batch), time.perf_counter() - started)

    async def _prepared(self, batch: list[Entry], prepare: Callable[[list[Entry]], Awaitable[T]]) -> T | None:
        """`prepare(batch)`, retried while Redis is away; None if it still fails (the batch is
        then released, so its entries are redelivered)."""
        try:
            return await self._retrying(lambda: prepare(batch))
        except Exception:
            log.exception("could not prepare a batch; its entries will be redelivered")
            self._release(batch)
            return None

    async def _process_scores(self, batch: list[Entry]) -> None:
        prepared = await self._prepared(batch, self._prepare)
        if prepared is None:
            return
        live, values, texts = prepared
        out = Outcome(live)
        failed, errors, computed = out.failed, out.errors, out.computed
        todo: dict[tuple[str, str], dict[Task, list[Entry]]] = {}
        compressors = await self._mode_compressors({(e.task.model, e.task.mode) for e in live})
        for e in live:
            compressor = compressors[e.task.model, e.task.mode]
            key = e.task.key(e.ns)
            if isinstance(compressor, str):
                failed[e.id] = compressor
            elif e.ns != compressor.info.cache_namespace:
                failed[e.id] = (
                    f"queued for {e.ns} but this worker serves {compressor.info.cache_namespace} "
                    "(the model changed while the job was queued; resubmit it)"
                )
            elif key in values:
                self._count("cached", 1)
            elif any(sha not in texts for sha in e.task.shas()):
                failed[e.id] = "the dataset text is gone from Redis (expired or evicted); resubmit the job"
            else:
                todo.setdefault((e.task.model, e.task.mode), {}).setdefault(e.task, []).append(e)
        for (model_id, mode), tasks in todo.items():
            jobs = sorted({e.job for entries in tasks.values() for e in entries})
            got, bad, broken = await self._run_reporting(compressors[model_id, mode], list(tasks), texts, jobs)
            computed.update(got)
            for task, entries in tasks.items():
                for e in entries:
                    if task in bad:
                        failed[e.id] = f"{task_label(task)}: {bad[task]}"
                    elif task in broken:
                        errors[e.id] = broken[task]
            self._count("computed", len(got))
        values.update(computed)
        out.recorded.update({e.id: repr(values[e.task.key(e.ns)]) for e in live if e.task.key(e.ns) in values})
        await self._finish(batch, out)

    async def _finish(self, batch: list[Entry], out: Outcome) -> None:
        for entry_id, reason in out.errors.items():
            log.warning("entry %s failed: %s", entry_id, reason)
        try:
            await self._retrying(lambda: self._write(batch, out))
        finally:
            self._release(batch)

    async def _process_classify(self, batch: list[Entry]) -> None:
        """Classify tasks (workers/classifying.py), grouped by classifier: each group runs as one
        prediction on the classifier fitted in this process, its model passes cached in Redis."""
        prepared = await self._prepared(batch, self._prepare_classify)
        if prepared is None:
            return
        live, definitions, texts = prepared
        out = Outcome(live)
        failed, errors, recorded = out.failed, out.errors, out.recorded
        groups: dict[str, list[Entry]] = {}
        for e in live:
            task = e.task
            assert isinstance(task, ClassifyTask)
            compressor = self._compressors.get(task.model)
            if definitions.get(task.classifier) is None:
                failed[e.id] = f"classifier {task.classifier!r} is gone (deleted or expired)"
            elif compressor is None or e.ns != compressor.info.cache_namespace:
                failed[e.id] = f"queued for {e.ns}, which this worker does not serve (the model changed; resubmit)"
            elif e.id not in texts:
                failed[e.id] = "the job's texts are gone from Redis (expired); resubmit the job"
            else:
                groups.setdefault(task.classifier, []).append(e)
        for cid, entries in groups.items():
            compressor = self._compressors[entries[0].task.model]
            items = [(e.task, texts[e.id]) for e in entries]
            try:
                got, bad = await asyncio.to_thread(
                    run_classify, self._fitted, definitions[cid], lambda c=compressor: caching(c, self._blobs), items
                )
            except Exception as exc:  # the model or Redis, not the input: left pending, retried
                for e in entries:
                    errors[e.id] = f"{type(exc).__name__}: {exc}"
                continue
            for e in entries:
                if e.task in bad:
                    failed[e.id] = bad[e.task]  # type: ignore[index]
                else:
                    recorded[e.id] = json.dumps(got[e.task])  # type: ignore[index]
            self._count("computed", len(got))
        await self._finish(batch, out)

    async def _prepare_classify(self, batch: list[Entry]) -> tuple[list[Entry], dict[str, dict | None], dict]:
        """Entries whose job still wants them, the definitions of their classifiers, the texts of
        each entry (entry id → its chunk; a fit's: [])."""
        jobs = sorted({e.job for e in batch})
        pipe = self.redis.pipeline(transaction=False)
        for job_id in jobs:
            pipe.hget(keys.job(job_id), "status")
        status = dict(zip(jobs, await pipe.execute(), strict=True))
        live = [e for e in batch if status[e.job] in ("queued", "running")]
        cids = sorted({e.task.classifier for e in live})  # type: ignore[union-attr]
        raw = await self.redis.mget([keys.classifier(c) for c in cids]) if cids else []
        definitions = {c: None if r is None else json.loads(r) for c, r in zip(cids, raw, strict=True)}
        pipe = self.redis.pipeline(transaction=False)
        chunks = [e for e in live if e.task.start != FIT]  # type: ignore[union-attr]
        for e in chunks:
            pipe.lrange(keys.job_pairs(e.job), e.task.start, e.task.start + e.task.count - 1)  # type: ignore[union-attr]
        texts: dict[str, list[str]] = {e.id: [] for e in live if e.task.start == FIT}  # type: ignore[union-attr]
        for e, got in zip(chunks, await pipe.execute() if chunks else [], strict=True):
            if len(got) == e.task.count:  # type: ignore[union-attr]
                texts[e.id] = got
        return live, definitions, texts

    def _release(self, batch: list[Entry]) -> None:
        for e in batch:
            self._held.pop(e.id, None)

    async def _prepare(self, batch: list[Entry]) -> tuple[list[Entry], dict[str, float], dict[str, str]]:
        """Entries whose job still wants them, the values already cached, the texts needed."""
        jobs = sorted({e.job for e in batch})
        pipe = self.redis.pipeline(transaction=False)
        for job_id in jobs:
            pipe.hget(keys.job(job_id), "status")
        status = dict(zip(jobs, await pipe.execute(), strict=True))
        live = [e for e in batch if status[e.job] in ("queued", "running")]
        cache_keys = sorted({e.task.key(e.ns) for e in live})
        cached = await self.cache.mget(cache_keys) if cache_keys else []
        values = {k: float(v) for k, v in zip(cache_keys, cached, strict=True) if v is not None}
        shas = sorted({sha for e in live if e.task.key(e.ns) not in values for sha in e.task.shas()})
        got = await self.redis.mget([keys.data(sha) for sha in shas]) if shas else []
        return live, values, {sha: t for sha, t in zip(shas, got, strict=True) if t is not None}

    async def _mode_compressors(self, wanted: set[tuple[str, str]]) -> dict[tuple[str, str], Compressor | str]:
        """The compressor of each (model, conditioning mode), or why there is none (permanent)."""
        out: dict[tuple[str, str], Compressor | str] = {}
        for model_id, mode in wanted:
            if mode == "context":
                out[model_id, mode] = self._compressors[model_id]
                continue
            try:  # the mode's wrapper around the loaded model: built once, cheap
                out[model_id, mode] = await asyncio.to_thread(self.registry.get, model_id, mode)
            except UnsupportedMode as exc:
                out[model_id, mode] = str(exc)
        return out

    async def _run_reporting(
        self, compressor: Compressor, tasks: list[Task], texts: dict[str, str], jobs: list[str]
    ) -> tuple[dict[str, float], dict[Task, str], dict[Task, str]]:
        """_run, adding the tokens it plans and codes to its jobs' records about once a second
        (best effort: progress is never worth failing or delaying a batch)."""
        loop = asyncio.get_running_loop()
        pending = [0, 0]  # coded, planned; touched on the event loop only

        def add(coded: int, planned: int) -> None:
            pending[0] += coded
            pending[1] += planned

        async def flush() -> None:
            coded, planned = pending
            if not (coded or planned):
                return
            pending[0] = pending[1] = 0
            with contextlib.suppress(*REDIS_ERRORS):
                pipe = self.redis.pipeline(transaction=False)
                for job_id in jobs:
                    await self._tokens(keys=[keys.job(job_id)], args=[coded, planned], client=pipe)
                await pipe.execute()

        async def reporter() -> None:
            while True:
                await asyncio.sleep(PROGRESS_FLUSH_S)
                await flush()

        task = asyncio.create_task(reporter())
        try:
            progress = lambda coded, planned: loop.call_soon_threadsafe(add, coded, planned)  # noqa: E731
            return await self._run(compressor, tasks, texts, progress)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await flush()

    async def _run(
        self, compressor: Compressor, tasks: list[Task], texts: dict[str, str], progress: Progress | None = None
    ) -> tuple[dict[str, float], dict[Task, str], dict[Task, str]]:
        """(values, permanent failures, transient errors). A batch that raises is run again one
        task at a time, so one bad input cannot fail its neighbours."""
        try:
            got, bad = await asyncio.to_thread(
                run_tasks_isolating, compressor, tasks, texts, self._symbols, progress
            )
            return got, {t: reason for t, reason in bad.items()}, {}
        except Exception as exc:
            if len(tasks) == 1:
                return {}, {}, {tasks[0]: f"{type(exc).__name__}: {exc}"}
            log.warning("batch of %d failed (%s); running its tasks one by one", len(tasks), exc)
        values: dict[str, float] = {}
        bad, broken = {}, {}
        for t in tasks:
            v, b, e = await self._run(compressor, [t], texts, progress)
            values.update(v)
            bad.update(b)
            broken.update(e)
        return values, bad, broken

    async def _write(self, batch: list[Entry], out: Outcome) -> None:
        """Cache `out.computed`, then per entry of the batch: acknowledge it (its job no longer
        wants it), dead-letter it (`out.failed`), note its error (`out.errors`), or RECORD its
        value (`out.recorded`)."""
        s = self.settings
        computed, failed, errors, recorded = out.computed, out.failed, out.errors, out.recorded
        now = repr(time.time())
        if computed:  # the cache first: a value is never recorded in a job before it is cached
            cache = self.cache.pipeline(transaction=False)
            for key, bits in computed.items():
                cache.set(key, repr(bits), ex=s.cache_ttl_s, nx=True)
            await cache.execute()
        pipe = self.redis.pipeline(transaction=False)
        live_ids = {e.id for e in out.live}
        for e in batch:
            if e.id not in live_ids:  # its job was cancelled, failed or expired
                self._count("skipped", 1)
                pipe.xack(e.stream, keys.GROUP, e.id)
            elif e.id in failed:
                fields = redis_state.entry_fields(e.job, e.ns, e.task, e.cost)
                await self._fail_entry(pipe, e.stream, e.id, fields, failed[e.id], e.job)
            elif e.id in errors:
                pipe.set(keys.item_error(e.id), errors[e.id], ex=s.job_ttl_s)
            else:
                args = [keys.GROUP, e.id, redis_state.task_id(e.task), recorded[e.id], now, s.job_ttl_s]
                await self._record(keys=[*keys.job_keys(e.job), e.stream], args=args, client=pipe)
        await pipe.execute()
        self._count("dead", len(failed))

    async def _fail_entry(
        self, pipe: aioredis.client.Pipeline, stream: str, entry_id: str, fields: dict, reason: str, job_id: str
    ) -> None:
        s = self.settings
        log.warning("dead-lettering %s of job %s: %s", entry_id, job_id, reason)
        extra = [v for kv in {**fields, "entry": entry_id, "stream": stream, "worker": self.name}.items() for v in kv]
        args = [keys.GROUP, entry_id, reason, repr(time.time()), s.job_ttl_s, s.dead_letter_max_len, *extra]
        job_keys = keys.job_keys(job_id if keys.is_job_id(job_id) else keys.NO_JOB)  # a junk entry names no job
        await self._fail(keys=[*job_keys, stream, keys.DEAD_LETTER], args=args, client=pipe)

    async def _dead(self, stream: str, entry_id: str, fields: dict, reason: str) -> None:
        """Dead-letter one entry now (outside a batch) and fail its job if it names one."""
        pipe = self.redis.pipeline(transaction=False)
        await self._fail_entry(pipe, stream, entry_id, fields, reason, str(fields.get("job", "")))
        await pipe.execute()
        self._held.pop(entry_id, None)
        self._count("dead", 1)


def read_count(room_items: int, room_bytes: int, mean_cost: float | None, empty: bool) -> int:
    """How many entries to read for a batch with room for `room_items` entries and `room_bytes`
    bytes, given the mean size of the entries read lately (None: none read yet). Entries read
    beyond the budget wait in this worker for its next batch, where no other worker can take
    them (until reclaimed): with large entries (a classifier's chunk of texts, a long dataset)
    a read of batch_max_items would hold a whole job while the other workers idle. 0: the batch
    is as full as the entries seen suggest; at least one entry is read into an empty batch."""
    if mean_cost is None or mean_cost <= 0:
        return room_items
    return max(1 if empty else 0, min(room_items, int(room_bytes // mean_cost)))


def task_label(task: Task) -> str:
    return f"C({task.hx[:12]}…)" if task.hy is None else f"C({task.hy[:12]}… | {task.hx[:12]}…)"


def run_worker(settings: Settings, name: str | None = None, metrics_port: int | None = None) -> int:
    """Run until SIGTERM or SIGINT; then finish the entries already read and exit (0), or exit 1
    after an unexpected error, for the supervisor to restart the process."""

    async def main() -> int:
        worker = Worker(settings, name)
        if metrics_port is not None:
            start_http_server(metrics_port, registry=worker.metrics.registry)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        await worker.run()
        return 1 if worker.failed else 0

    return asyncio.run(main())
