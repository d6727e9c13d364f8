"""The logic behind /v1/classifiers: validate, store the definition, fit, predict.

Definitions live in the store of the mode in use (memory or Redis); fitted classifiers (encoded
class contexts, zstd dictionaries, C(t) of kNN examples) are a small per-process LRU, rebuilt
from the definition when missing, so any API process can answer for any classifier. Fitting and
prediction run in a worker thread (they block on the model), one prediction per classifier at
a time. Predictions run in the API process on the registry's compressors, in both modes.

Prediction jobs (POST /v1/classifiers/{id}/predictions) run the same prediction as an asyncio task
of the API process, PREDICTION_CHUNK texts per worker-thread call, appending each chunk's
predictions to the store and a heartbeat (updated_at) every `prediction_heartbeat_s` while a chunk
runs. A queued or running job whose heartbeat stopped lost its process (crash, restart):
- with a persistent store (Redis), the next GET of it, in any API process, claims it and resumes
  it from its last saved chunk (texts and predictions so far are in the store); a job whose
  process stopped MAX_RESUMES times is failed instead (its input may be what stops it). A
  graceful shutdown saves the job as interrupted, to be resumed without counting;
- in memory it ended with its process: it reads as failed (`job_as_seen`).
"""

from __future__ import annotations

import asyncio
import logging
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
from classify.probe import ProbeClassifier
from classify.store import ClassifierStore
from codelen.datasets import DatasetError, check_record
from codelen.settings import Settings
from models.protocol import TokenizationError
from models.registry import Registry, UnknownModel

log = logging.getLogger("codelen.classify")

PREDICTION_CHUNK = 16  # texts per worker-thread call of a prediction job (progress is written after each)
STALE_HEARTBEATS = 6  # a queued/running job not refreshed for this many heartbeats lost its process
LOST = "the process running this prediction stopped (restart or crash); submit the texts again"
SHUTDOWN = "the service shut down while running this prediction; submit the texts again"
MAX_RESUMES = 3  # stops of its process (not graceful shutdowns) after which a job is failed
GIVEN_UP = f"the process running this prediction stopped {MAX_RESUMES + 1} times; submit the texts again"
_INTERNAL = ("interrupted",)  # job-record fields GET does not show


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
        "fitted": record.get("fitted"),
    }


def is_stale(record: dict, now: float, heartbeat_s: float) -> bool:
    """A running job refreshes `updated_at` every heartbeat, so a queued or running one older than
    STALE_HEARTBEATS heartbeats has lost the process that ran it (restart, crash)."""
    return record["status"] in ("queued", "running") and now - record["updated_at"] > STALE_HEARTBEATS * heartbeat_s


def public_job(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in _INTERNAL}


def job_as_seen(record: dict, now: float, heartbeat_s: float) -> dict:
    """A prediction job as GET reports it: a stale one (`is_stale`) reads as failed. Pure: the
    stored record is not changed."""
    shown = public_job(record)
    if is_stale(record, now, heartbeat_s):
        return {**shown, "status": "failed", "error": GIVEN_UP if record.get("resumes", 0) >= MAX_RESUMES else LOST}
    return shown


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
    if isinstance(clf, ProbeClassifier):
        return n_texts  # one LM pass per text
    return n_texts * len(clf.labels)


class ClassifierService:
    def __init__(self, settings: Settings, registry: Registry, store: ClassifierStore) -> None:
        self.settings, self.registry, self.store = settings, registry, store
        self._fitted: OrderedDict[str, Fitted] = OrderedDict()
        self._tasks: set[asyncio.Task] = set()  # running prediction jobs (a reference keeps each alive)

    def _check_text(self, text: str, pointer: str) -> int:
        try:
            return check_record(text, pointer, self.settings.max_record_bytes)
        except DatasetError as exc:
            if exc.too_large:
                raise TooLarge(f"{pointer}: {exc}") from None
            raise Invalid(f"{pointer}: {exc}", pointer) from None

    def _check_texts(self, texts: list[str], limit: int, where: str) -> None:
        if len(texts) > limit:
            raise TooLarge(f"{len(texts)} texts; at most {limit} {where}")
        for i, t in enumerate(texts):
            self._check_text(t, f"/texts/{i}")

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
        clf = (await self._fit(record)).classifier  # fails early on input the model cannot code
        if hasattr(clf, "fitted"):
            record["fitted"] = clf.fitted()  # what the fit chose (a refit from equal states chooses the same)
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
        self._check_texts(texts, s.max_predict_texts, "per request")
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

    async def submit_prediction(self, classifier_id: str, texts: list[str]) -> dict:
        """Validate everything first (bad input never becomes a failed job), store the job as
        queued, start it in the background and return the record."""
        self._check_texts(texts, self.settings.max_prediction_job_texts, "per prediction job")
        definition = await self.get(classifier_id)
        now = time.time()
        job = {
            "id": uuid.uuid4().hex,
            "classifier": classifier_id,
            "status": "queued",
            "done": 0,
            "total": len(texts),
            "resumes": 0,
            "created_at": now,
            "updated_at": now,
        }
        await self.store.put_job_texts(job["id"], list(texts))  # first: a stored job can always resume
        await self.store.put_job(job)
        self._start(definition, dict(job), list(texts), [])
        return job

    def _start(self, definition: dict, job: dict, texts: list[str], results: list[dict]) -> None:
        task = asyncio.create_task(self._run_prediction(definition, job, texts, results), name=f"predict-{job['id']}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def get_prediction(self, classifier_id: str, job_id: str) -> dict:
        job = await self.store.get_job(job_id)
        if job is None or job.get("classifier") != classifier_id:
            raise NotFound(f"no prediction job {job_id!r} of classifier {classifier_id!r} (unknown or expired)")
        now, heartbeat = time.time(), self.settings.prediction_heartbeat_s
        resumable = job.get("interrupted") or job.get("resumes", 0) < MAX_RESUMES
        if self.store.persistent and is_stale(job, now, heartbeat) and resumable:
            resumed = await self._resume(job, now)
            if resumed is not None:
                return public_job(resumed)
        return job_as_seen(job, now, heartbeat)

    async def _resume(self, job: dict, now: float) -> dict | None:
        """Claim a stale job and run it on from its saved predictions; None if another process
        claimed it first (it reads as running meanwhile) or its inputs are gone."""
        if not await self.store.claim_job(job["id"], STALE_HEARTBEATS * self.settings.prediction_heartbeat_s):
            return {**job, "status": "running"}
        texts = await self.store.get_job_texts(job["id"])
        definition = await self.store.get(job["classifier"])
        if texts is None or definition is None:
            return None  # expired or deleted: it reads as lost
        results = await self.store.get_job_results(job["id"])
        counts = 0 if job.get("interrupted") else 1  # a graceful shutdown is not held against the job
        job = {**job, "status": "running", "done": len(results), "resumes": job.get("resumes", 0) + counts}
        job.pop("interrupted", None)
        job["updated_at"] = now
        await self.store.put_job(job)
        log.info("resuming prediction job %s at text %d of %d", job["id"], len(results), job["total"])
        self._start(definition, dict(job), texts, results)
        return job

    async def _run_prediction(self, definition: dict, job: dict, texts: list[str], results: list[dict]) -> None:
        """Run the job from text len(results) on (the predictions before it are in the store)."""
        heartbeat = self.settings.prediction_heartbeat_s

        async def save(**changes: object) -> None:
            job.update(changes, updated_at=time.time())
            await self._write(job)

        async def beating(awaitable):
            """Await it, refreshing updated_at every heartbeat however long it takes."""
            future = asyncio.ensure_future(awaitable)
            try:
                while not (await asyncio.wait({future}, timeout=heartbeat))[0]:
                    await save()
                return future.result()
            finally:
                future.cancel()  # no-op when done; a thread already running finishes on its own

        where = "while fitting the classifier"
        predictions = list(results)
        try:
            await save(status="running")
            fitted = await beating(self._fit(definition))
            for start in range(len(predictions), len(texts), PREDICTION_CHUNK):
                chunk = texts[start : start + PREDICTION_CHUNK]
                where = f"on texts {start}..{start + len(chunk) - 1}"

                def run(chunk: list[str] = chunk) -> list[Prediction]:
                    with fitted.lock:
                        return fitted.classifier.predict(chunk)

                got = await beating(asyncio.to_thread(run))
                if len(got) != len(chunk):
                    raise RuntimeError(f"{len(got)} predictions for {len(chunk)} texts")
                new = [p.as_dict() for p in got]
                if await self.store.append_job_results(job["id"], new) != start + len(new):
                    # This process was taken for lost (a stall of many heartbeats) and another one
                    # resumed the job: that one owns it now.
                    log.warning("prediction job %s was resumed elsewhere; this runner stops", job["id"])
                    return
                predictions.extend(new)
                await save(done=len(predictions))
            await save(status="succeeded", predictions=predictions)
        except asyncio.CancelledError:
            if self.store.persistent:  # resumed by the next GET, in any process, without counting
                await self._save_quietly(job, status="queued", interrupted=True, updated_at=0.0)
            else:
                await self._fail(job, SHUTDOWN)
            raise
        except Exception as exc:
            reason = str(exc) if isinstance(exc, TokenizationError | Invalid) else f"{type(exc).__name__}: {exc}"
            log.warning("prediction job %s failed %s: %s", job["id"], where, reason, exc_info=True)
            await self._fail(job, f"prediction failed {where}: {reason}")

    async def _write(self, job: dict) -> None:
        """Store the job; a finished one drops what only a resume needed (texts, results so far)."""
        await (self.store.finish_job(job) if job["status"] in ("succeeded", "failed") else self.store.put_job(job))

    async def _fail(self, job: dict, error: str) -> None:
        await self._save_quietly(job, status="failed", error=error, updated_at=time.time())

    async def _save_quietly(self, job: dict, **changes: object) -> None:
        job.update(changes)
        try:
            await self._write(job)
        except Exception:  # the store is gone too: the stale rule reports the job as lost
            log.exception("could not record prediction job %s as %s", job["id"], job["status"])

    async def aclose(self) -> None:
        """At shutdown: stop the running prediction jobs, recording them as interrupted (Redis:
        resumed later) or failed (memory: the jobs end with the process)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


__all__ = ["ClassifierService", "Invalid", "NotFound", "TooLarge", "UnknownModel", "job_as_seen", "public"]
