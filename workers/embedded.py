"""Embedded mode: an in-process queue, one worker and a bounded cache, so the service runs with
no other program. The worker has the same stages as a Redis worker: read → batch → run → write.

The event loop owns all state (no locks); model work runs in one worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator

from classify.caching import caching
from codelen.datasets import Dataset
from codelen.metrics import Metrics
from codelen.scores import PairLengths
from codelen.settings import Settings
from models.protocol import Compressor, ModelInfo, Progress
from models.registry import Registry
from workers.classifying import FittedClassifiers, MemoryBlobs, run_classify
from workers.compute import ClassifyTask, SymbolCache, Task, pair_tasks, run_tasks_isolating
from workers.jobs import (
    TERMINAL,
    ClassifySpec,
    JobConflict,
    JobSpec,
    JobState,
    Overloaded,
    PairSpec,
    TaskFailed,
    matrix_document,
    new_job_id,
)
from workers.results import ClassifyResults, JobResults, release_memory

JOB_WINDOW = 256  # pairs of one job in flight at once: bounds memory and lets cancel stop work
CLASSIFY_WINDOW = 8  # classify tasks (chunks) of one job queued at once: cancel stops the rest
BIG_JOB_PAIRS = 10_000  # once a job this big is finished or dropped, freed memory goes back to the OS


class LRUCache:
    """Code lengths by cache key, least recently used dropped first past `max_entries` or
    `max_bytes`. A key (~200 characters) is held as its 16-byte digest, so an entry costs
    ENTRY_BYTES in all."""

    # measured with tracemalloc, full and churning (750k sets): digest 49 + float 24 + the
    # OrderedDict's slots, links and the room it keeps for deleted entries
    ENTRY_BYTES = 264

    def __init__(self, max_entries: int, max_bytes: int | None = None) -> None:
        self._d: OrderedDict[bytes, float] = OrderedDict()
        self._max = min(max_entries, max_entries if max_bytes is None else max(1, max_bytes // self.ENTRY_BYTES))

    @staticmethod
    def _digest(key: str) -> bytes:
        return hashlib.blake2b(key.encode(), digest_size=16).digest()

    def get(self, key: str) -> float | None:
        d = self._digest(key)
        v = self._d.get(d)
        if v is not None:
            self._d.move_to_end(d)
        return v

    def set(self, key: str, value: float) -> None:
        d = self._digest(key)
        self._d[d] = value
        self._d.move_to_end(d)
        while len(self._d) > self._max:
            self._d.popitem(last=False)

    @property
    def nbytes(self) -> int:
        return len(self._d) * self.ENTRY_BYTES

    def __len__(self) -> int:
        return len(self._d)


class _BatchTokens:
    """Tokens planned and coded so far by one running batch, and the jobs credited with them."""

    def __init__(self) -> None:
        self.done = self.total = 0
        self.jobs: dict[int, JobState] = {}

    def join(self, job: JobState) -> None:
        if id(job) not in self.jobs:  # a job waiting on two tasks of one batch counts it once
            self.jobs[id(job)] = job
            job.tokens_done += self.done
            job.tokens_total += self.total

    def credit(self, coded: int, planned: int) -> None:
        self.done += coded
        self.total += planned
        for j in self.jobs.values():
            j.tokens_done += coded
            j.tokens_total += planned


class Engine:
    """Code lengths on demand: cache first, then the queue; concurrent askers share one run."""

    def __init__(self, settings: Settings, registry: Registry, metrics: Metrics) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.cache = LRUCache(settings.cache_max_entries, settings.cache_max_bytes)
        self._texts: dict[str, str] = {}
        self._text_refs: dict[str, int] = {}
        self._queue: asyncio.Queue[Task | ClassifyTask] = asyncio.Queue()
        self._inflight: dict[Task, asyncio.Future[float]] = {}
        self._watchers: dict[Task, list[JobState]] = {}  # jobs credited with a queued task's tokens
        self._running: dict[Task, _BatchTokens] = {}  # tasks of the batch now running
        self._symbols = SymbolCache()
        self._worker: asyncio.Task | None = None
        # classifier work: each queued task's future, definition and texts; fitted classifiers and
        # the values of their model passes (classify/caching.py)
        self._classify: dict[ClassifyTask, tuple[asyncio.Future[object], dict, list[str]]] = {}
        self.fitted = FittedClassifiers(settings.fitted_classifiers)
        self.blobs = MemoryBlobs(settings.classifier_cache_bytes, metrics.classify_values)

    async def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name="codelen-embedded-worker")

    async def stop(self) -> None:
        if self._worker:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    async def compressor(self, model_id: str, mode: str = "context") -> Compressor:
        """The model's compressor in conditioning `mode` (UnsupportedMode if it has none)."""
        if self.registry.loaded(model_id) and mode == "context":
            return self.registry.get(model_id)
        return await asyncio.to_thread(self.registry.get, model_id, mode)

    def queue_depth(self) -> int:
        return self._queue.qsize()

    # -- asking -----------------------------------------------------------------------------

    def lookup(self, info: ModelInfo, tasks: Iterable[Task]) -> dict[Task, float] | None:
        """All values from the cache, or None if any is missing."""
        out = {}
        for t in tasks:
            v = self.cache.get(t.key(info.cache_namespace))
            if v is None:
                self.metrics.cache.labels("miss").inc()
                return None
            out[t] = v
        self.metrics.cache.labels("hit").inc(len(out))
        return out

    def request(
        self,
        info: ModelInfo,
        tasks: list[Task],
        texts: dict[str, str],
        *,
        admit: bool = True,
        job: JobState | None = None,
    ) -> dict[Task, asyncio.Future[float]]:
        """A future per task: done at once if cached, shared if already queued, else queued.

        `admit` applies the queue bound (429): new work is refused, but a job already accepted
        keeps feeding its bounded window whatever the depth."""
        ns = info.cache_namespace
        cached = {t: self.cache.get(t.key(ns)) for t in tasks}  # one lookup per task
        missing = [t for t, v in cached.items() if v is None and t not in self._inflight]
        if admit and missing and self._queue.qsize() + len(missing) > self.settings.max_queue_items:
            raise Overloaded(f"queue holds {self._queue.qsize()} tasks")
        loop = asyncio.get_running_loop()
        out: dict[Task, asyncio.Future[float]] = {}
        for t in tasks:
            v = cached[t]
            if v is not None:
                fut = loop.create_future()
                fut.set_result(v)
            elif t in self._inflight:
                fut = self._inflight[t]
                if job is not None:
                    self._watchers.setdefault(t, []).append(job)
                    if t in self._running:
                        self._running[t].join(job)
            else:
                fut = loop.create_future()
                self._inflight[t] = fut
                if job is not None:
                    self._watchers.setdefault(t, []).append(job)
                for sha in t.shas():
                    self._texts.setdefault(sha, texts[sha])
                    self._text_refs[sha] = self._text_refs.get(sha, 0) + 1
                self._queue.put_nowait(t)
            out[t] = fut
        self.metrics.queue_depth.set(self._queue.qsize())
        return out

    def request_classify(
        self, task: ClassifyTask, definition: dict, texts: list[str], *, admit: bool = True
    ) -> asyncio.Future[object]:
        """Queue a classify task; its future holds the task's value (workers/classifying.py).
        Cancelling the future drops the task if it has not run yet."""
        if admit and self._queue.qsize() + 1 > self.settings.max_queue_items:
            raise Overloaded(f"queue holds {self._queue.qsize()} tasks")
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._classify[task] = (fut, definition, texts)
        self._queue.put_nowait(task)
        self.metrics.queue_depth.set(self._queue.qsize())
        return fut

    async def pair_lengths(
        self,
        info: ModelInfo,
        x: Dataset,
        y: Dataset,
        *,
        direction: str = "both",
        admit: bool = True,
        job: JobState | None = None,
    ) -> PairLengths:
        tasks = pair_tasks(info.id, x.sha256, y.sha256, info.conditioning.mode, direction)
        futs = self.request(info, tasks, {x.sha256: x.text, y.sha256: y.text}, admit=admit, job=job)
        return PairLengths.of(await asyncio.gather(*(asyncio.shield(futs[t]) for t in tasks)))

    # -- the worker: read → batch → run → write ---------------------------------------------

    async def _run(self) -> None:
        s = self.settings
        while True:
            first = await self._queue.get()
            batch = [first]
            deadline = time.monotonic() + s.batch_wait_ms / 1000
            while len(batch) < s.batch_max_items:
                timeout = deadline - time.monotonic()
                if self._queue.empty() and timeout <= 0:
                    break
                try:
                    batch.append(
                        self._queue.get_nowait()
                        if not self._queue.empty()
                        else await asyncio.wait_for(self._queue.get(), timeout)
                    )
                except TimeoutError:
                    break
            self.metrics.queue_depth.set(self._queue.qsize())
            by_model: dict[tuple[str, str], list[Task]] = {}
            by_classifier: dict[str, list[ClassifyTask]] = {}
            for t in batch:
                if isinstance(t, ClassifyTask):
                    by_classifier.setdefault(t.classifier, []).append(t)
                else:
                    by_model.setdefault((t.model, t.mode), []).append(t)
            for (model, mode), tasks in by_model.items():
                await self._run_batch(model, mode, tasks)
            for ctasks in by_classifier.values():
                await self._run_classify(ctasks)

    def _progress(self, tasks: list[Task]) -> Progress:
        """Credit the jobs waiting on `tasks` (and jobs that start waiting while they run) with
        the tokens their batch plans and codes. Called from the worker thread; the counters are
        updated on the event loop."""
        loop = asyncio.get_running_loop()
        batch = _BatchTokens()
        for t in tasks:
            self._running[t] = batch
            for j in self._watchers.get(t, ()):
                batch.join(j)
        return lambda coded, planned: loop.call_soon_threadsafe(batch.credit, coded, planned)

    async def _run_batch(self, model: str, mode: str, tasks: list[Task]) -> None:
        texts = {sha: self._texts[sha] for t in tasks for sha in t.shas()}
        started = time.perf_counter()
        try:
            compressor = await self.compressor(model, mode)
            progress = self._progress(tasks)
            results, failed = await asyncio.to_thread(
                run_tasks_isolating, compressor, tasks, texts, self._symbols, progress
            )
            error: BaseException | None = None
        except Exception as exc:  # a broken model fails the batch, not the worker
            results, failed, error = {}, {}, exc
        self.metrics.stage.labels("inference").observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(tasks))
        for t in tasks:
            fut = self._inflight.pop(t)
            self._watchers.pop(t, None)
            self._running.pop(t, None)
            for sha in t.shas():
                self._text_refs[sha] -= 1
                if not self._text_refs[sha]:
                    del self._text_refs[sha], self._texts[sha]
            if error is not None:
                self.metrics.task_failures.labels(model).inc()
                fut.set_exception(RuntimeError(f"{model} failed: {type(error).__name__}: {error}"))
            elif t in failed:
                self.metrics.task_failures.labels(model).inc()
                fut.set_exception(TaskFailed(failed[t]))
            else:
                key = t.key(compressor.info.cache_namespace)
                self.cache.set(key, results[key])
                self.metrics.tasks.labels(model).inc()
                fut.set_result(results[key])
            if fut.done() and fut.exception() is not None:
                fut.exception()  # mark retrieved: nobody may be waiting any more


    async def _run_classify(self, tasks: list[ClassifyTask]) -> None:
        """Classify tasks of one classifier, in the model thread like a batch of code lengths."""
        items = [(t, *self._classify.pop(t)) for t in tasks]
        live = [(t, fut, definition, texts) for t, fut, definition, texts in items if not fut.done()]  # else cancelled
        if not live:
            return
        definition, model = live[0][2], live[0][0].model
        started = time.perf_counter()
        try:
            base = await self.compressor(model)
            values, failed = await asyncio.to_thread(
                run_classify,
                self.fitted,
                definition,
                lambda: caching(base, self.blobs),
                [(t, texts) for t, _, _, texts in live],
            )
            error: BaseException | None = None
        except Exception as exc:  # a broken model fails these tasks, not the worker
            values, failed, error = {}, {}, exc
        self.metrics.stage.labels("inference").observe(time.perf_counter() - started)
        for t, fut, _, _ in live:
            if fut.done():  # cancelled while it ran
                continue
            if error is not None:
                self.metrics.task_failures.labels(model).inc()
                fut.set_exception(RuntimeError(f"{model} failed: {type(error).__name__}: {error}"))
            elif t in failed:
                self.metrics.task_failures.labels(model).inc()
                fut.set_exception(TaskFailed(failed[t]))
            else:
                self.metrics.tasks.labels(model).inc()
                fut.set_result(values[t])
            fut.exception()  # an exception is marked retrieved: nobody may be waiting any more


class EmbeddedBackend:
    """Jobs on top of the Engine. The service talks to this (or to the Redis backend)."""

    mode = "embedded"

    def __init__(self, settings: Settings, registry: Registry, metrics: Metrics) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.engine = Engine(settings, registry, metrics)
        self._jobs: OrderedDict[str, JobState] = OrderedDict()
        self._specs: dict[str, JobSpec | ClassifySpec] = {}
        self._results: dict[str, JobResults | ClassifyResults] = {}
        self._runners: dict[str, asyncio.Task] = {}
        self._idempotency: dict[str, tuple[str, str]] = {}
        self._idempotency_of: dict[str, str] = {}  # job id → its Idempotency-Key digest

    async def start(self) -> None:
        gc.freeze()  # what start-up built lives on: later collections need not walk it
        await self.engine.start()

    async def stop(self) -> None:
        for runner in list(self._runners.values()):
            runner.cancel()
        await self.engine.stop()

    async def ready(self) -> tuple[bool, str]:
        pending = [m for m in self.settings.preload_ids() if not self.registry.loaded(m)]
        return (not pending, f"loading {', '.join(pending)}" if pending else "ok")

    async def model_info(self, model_id: str, mode: str = "context") -> ModelInfo:
        """The model's info in conditioning `mode` (UnsupportedMode if it offers none)."""
        return (await self.engine.compressor(model_id, mode)).info

    def queue_depth(self) -> int:
        return self.engine.queue_depth()

    async def lookup(
        self, model_id: str, x: Dataset, y: Dataset, mode: str = "context", direction: str = "both"
    ) -> PairLengths | None:
        """The pair's code lengths if all are cached, else None; never queues work."""
        info = await self.model_info(model_id, mode)
        tasks = pair_tasks(model_id, x.sha256, y.sha256, mode, direction)
        cached = self.engine.lookup(info, tasks)
        return None if cached is None else PairLengths.of([cached[t] for t in tasks])

    async def score(
        self, model_id: str, x: Dataset, y: Dataset, wait_s: float, mode: str = "context", direction: str = "both"
    ) -> tuple[PairLengths | None, bool, dict | None]:
        """(lengths, cached, None) if answered within wait_s, else (None, False, job)."""
        cached = await self.lookup(model_id, x, y, mode, direction)
        if cached is not None:
            return cached, True, None
        info = await self.model_info(model_id, mode)
        work = asyncio.ensure_future(self.engine.pair_lengths(info, x, y, direction=direction))
        try:
            return await asyncio.wait_for(asyncio.shield(work), wait_s), False, None
        except TimeoutError:
            spec = JobSpec(model_id, [PairSpec("0", x, y)], mode=mode, direction=direction)
            job = await self.submit(spec, None)  # shares the queued tasks before `work` lets go of them
            work.cancel()
            return None, False, job

    # -- jobs -------------------------------------------------------------------------------

    async def submit(self, spec: JobSpec | ClassifySpec, idempotency_key: str | None) -> dict[str, object]:
        if idempotency_key:
            digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
            if digest in self._idempotency:
                job_id, fingerprint = self._idempotency[digest]
                if fingerprint != spec.fingerprint:
                    raise JobConflict("this Idempotency-Key was used with a different request body")
                if job_id in self._jobs:
                    return self._jobs[job_id].public()
        if self.engine.queue_depth() >= self.settings.max_queue_items:
            raise Overloaded(f"queue holds {self.engine.queue_depth()} tasks")
        info = await self.model_info(spec.model, spec.mode)
        if isinstance(spec, ClassifySpec):
            job = JobState(new_job_id(), spec.model, spec.kind, spec.total, classifier=spec.classifier)
            tasks = spec.tasks(job.id)
            self._results[job.id] = ClassifyResults(info, spec.kind, spec.classifier, tasks)
            runner = self._run_classify_job(job, spec, tasks)
        else:
            kind = "matrix" if spec.matrix_ids else "pairs"
            job = JobState(
                new_job_id(),
                spec.model,
                kind,
                len(spec.pairs),
                matrix_ids=spec.matrix_ids,
                mode=spec.mode,
                direction=spec.direction,
            )
            pair_ids = None if spec.matrix_ids else [p.id for p in spec.pairs]
            self._results[job.id] = JobResults(info, len(spec.pairs), pair_ids, spec.matrix_ids)
            runner = self._run_job(job, spec, info)
        self._jobs[job.id] = job
        self._specs[job.id] = spec
        if idempotency_key:
            self._idempotency[digest] = (job.id, spec.fingerprint)
            self._idempotency_of[job.id] = digest
        self._runners[job.id] = asyncio.create_task(runner)
        self._forget_old_jobs()
        return job.public()

    def _forget_old_jobs(self) -> None:
        """Drop finished jobs past job_ttl_s, then the oldest finished ones while more than
        max_jobs are kept or all results together take more than max_job_result_bytes."""
        s, now = self.settings, time.time()
        held = sum(r.nbytes for r in self._results.values())
        big = False
        for job_id, job in list(self._jobs.items()):
            if job.status not in TERMINAL:
                continue
            expired = job.finished_at is not None and now - job.finished_at > s.job_ttl_s
            if expired or len(self._jobs) > s.max_jobs or held > s.max_job_result_bytes:
                results = self._forget(job_id)
                held -= results.nbytes if results else 0
                big = big or (results is not None and results.n >= BIG_JOB_PAIRS)
        if big:
            release_memory()

    def _forget(self, job_id: str) -> JobResults | ClassifyResults | None:
        """Drop a job and everything kept for it; its results, if it had any."""
        self._jobs.pop(job_id, None)
        self._specs.pop(job_id, None)
        digest = self._idempotency_of.pop(job_id, None)
        if digest is not None:
            self._idempotency.pop(digest, None)
        return self._results.pop(job_id, None)

    async def _run_job(self, job: JobState, spec: JobSpec, info: ModelInfo) -> None:
        job.status = "running"
        results = self._results[job.id]
        pending: set[asyncio.Future] = set()
        index: dict[asyncio.Future, int] = {}
        try:
            next_pair = 0
            while next_pair < len(spec.pairs) or pending:
                while next_pair < len(spec.pairs) and len(pending) < JOB_WINDOW:
                    p = spec.pairs[next_pair]
                    fut = asyncio.ensure_future(
                        self.engine.pair_lengths(info, p.x, p.y, direction=spec.direction, admit=False, job=job)
                    )
                    index[fut] = next_pair
                    pending.add(fut)
                    next_pair += 1
                finished, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                pending -= finished
                for fut in finished:
                    i = index.pop(fut)
                    exc = fut.exception()
                    if exc is not None:
                        raise TaskFailed(f"pair {spec.pairs[i].id!r}: {exc}")
                    results.set(i, spec.pairs[i], fut.result())
                    job.done += 1
            job.status = "succeeded"
        except asyncio.CancelledError:
            job.status = "cancelled"
        except Exception as exc:
            job.status, job.error = "failed", str(exc)
        finally:
            self._job_ended(job, pending)
            if len(spec.pairs) >= BIG_JOB_PAIRS:
                release_memory()  # the pair specs just dropped

    async def _run_classify_job(self, job: JobState, spec: ClassifySpec, tasks: list[ClassifyTask]) -> None:
        """Feed the job's tasks to the engine, CLASSIFY_WINDOW at a time, in order; a task that
        fails fails the job. Cancelling it drops the tasks still queued."""
        job.status = "running"
        results = self._results[job.id]
        assert isinstance(results, ClassifyResults)
        texts = spec.texts
        pending: dict[asyncio.Future, int] = {}
        try:
            following = 0
            while following < len(tasks) or pending:
                while following < len(tasks) and len(pending) < CLASSIFY_WINDOW:
                    t = tasks[following]
                    chunk = [] if t.start < 0 else texts[t.start : t.start + t.count]
                    pending[self.engine.request_classify(t, spec.definition, chunk, admit=False)] = following
                    following += 1
                finished, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for fut in finished:
                    k = pending.pop(fut)
                    exc = fut.exception()
                    if exc is not None:
                        raise TaskFailed(str(exc))
                    results.set(k, fut.result())
                    job.done += tasks[k].count
            job.status = "succeeded"
        except asyncio.CancelledError:
            job.status = "cancelled"
        except Exception as exc:
            job.status, job.error = "failed", str(exc)
        finally:
            self._job_ended(job, pending)

    def _job_ended(self, job: JobState, pending: Iterable[asyncio.Future]) -> None:
        """A job runner's last step, whatever its outcome: its work still in flight is cancelled,
        and it stops holding its texts; the byte bound of finished jobs then counts its results."""
        for fut in pending:
            fut.cancel()
        job.finished_at = time.time()
        self.metrics.jobs.labels(job.status).inc()
        self._runners.pop(job.id, None)
        self._specs.pop(job.id, None)  # the texts are no longer needed
        self._forget_old_jobs()

    async def job(self, job_id: str) -> dict[str, object] | None:
        job = self._jobs.get(job_id)
        return job.public() if job else None

    async def results(self, job_id: str) -> tuple[dict[str, object], Iterator[dict], dict | None] | None:
        """(job, finished results in pair order, built as they are read, matrix document or None)."""
        job = self._jobs.get(job_id)
        results = self._results.get(job_id)
        if job is None or results is None:
            return None
        matrix = None
        if isinstance(results, JobResults) and job.matrix_ids and job.status == "succeeded":  # no one writes now
            matrix = await asyncio.to_thread(matrix_document, job.matrix_ids, results.rows())
        conditioning = results.info.conditioning.as_dict()
        return {**job.public(), "conditioning_parameters": conditioning}, results.rows(), matrix

    async def cancel(self, job_id: str) -> dict[str, object] | None:
        """Cancel a queued or running job (kept, as cancelled, with the pairs it finished); delete a
        succeeded or failed one (its last state is returned; then it is unknown)."""
        job = self._jobs.get(job_id)
        if job is None:
            return None
        runner = self._runners.get(job_id)
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        elif job.status in ("succeeded", "failed"):
            results = self._forget(job_id)
            if results is not None and results.n >= BIG_JOB_PAIRS:
                release_memory()
        return job.public()
