"""The logic behind /v1/classifiers: validate, store the definition, and run fits and predictions
as jobs of the one job system (/v1/jobs), on the workers.

This process never fits or predicts, and never loads a model for it: a create is a `fit` job, a
prediction a `predict` job of `CODELEN_CLASSIFY_CHUNK_TEXTS` texts per task
(workers/classifying.py), queued like score work (the same 429 past `CODELEN_MAX_QUEUE_ITEMS`,
cancel, reclaim of a dead worker's tasks, dead letters). The synchronous routes (`POST
/v1/classifiers`, `.../predict`) wait for their job up to `CODELEN_SCORE_WAIT_S`, as /v1/score
does, then answer 202 with the job. The old prediction-job route reads the new job in the old shape.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections import Counter

from classify.fusion import FusionOptions
from classify.methods import MethodError, parse_options, resolve_model
from codelen.datasets import DatasetError, check_record
from codelen.settings import Settings
from models.registry import Registry
from service.classifiers.store import ClassifierStore
from workers.backend import Backend
from workers.jobs import TERMINAL, ClassifySpec

POLL_FIRST_S = 0.002  # first pause while waiting on a job; doubles up to score_poll_max_s


class NotFound(LookupError):
    pass


class TooLarge(ValueError):
    pass


class Invalid(ValueError):
    def __init__(self, message: str, pointer: str = "") -> None:
        super().__init__(message)
        self.pointer = pointer


class Cancelled(RuntimeError):
    """The job a synchronous request waited on was cancelled (DELETE /v1/jobs/{id}): 409."""


class Pending(Exception):  # noqa: N818 (not an error: the answer is 202 with the job)
    """The work outlasted the wait: answer 202 with `job`."""

    def __init__(self, job: dict, body: dict | None = None) -> None:
        super().__init__(job["id"])
        self.job, self.body = job, body if body is not None else job


def public(record: dict) -> dict:
    labels = [e["label"] for e in record["examples"]]
    per_label = dict(sorted(Counter(labels).items()))
    out = {
        "id": record["id"],
        "model": record["model"],
        "method": record["method"],
        "options": record["options"],
        "labels": list(per_label),
        "examples": len(labels),
        "examples_per_label": per_label,
        "created_at": record["created_at"],
        "fitted": record.get("fitted"),
        "status": record.get("status", "ready"),
        "fit_job": record.get("job"),
    }
    if record.get("error"):
        out["error"] = record["error"]
    return out


def segments_needed(record: dict, n_texts: int) -> int:
    """Code lengths a prediction of n_texts costs at most (the unit of max_predict_segments),
    from the definition alone: this process does not fit."""
    method, n = record["method"], len(record["examples"])
    labels = len({e["label"] for e in record["examples"]})
    opts = parse_options(method, record["options"])

    def conditional(o) -> int:  # noqa: ANN001 (ConditionalOptions)
        windows = labels * o.max_windows if o.max_windows else n  # at most one window per example
        return windows + int(o.unconditional)

    if method in ("knn", "gzip-knn"):
        return n_texts * n * (2 if opts.symmetric else 1)  # type: ignore[attr-defined]
    if method == "conditional":
        return n_texts * conditional(opts)
    if method == "fusion":
        assert isinstance(opts, FusionOptions)
        alone = int(opts.normalize == "relative")
        return n_texts * sum(conditional(opts.expert(w)) + alone for w in ("model", "classical"))
    if method == "knn-lm":
        return n_texts * (1 + (labels if opts.classical_weight > 0 else 0))  # type: ignore[attr-defined]
    if method == "probe":
        return n_texts  # one LM pass per text
    return n_texts * labels


def predictions_of(rows: list[dict]) -> list[dict]:
    """A prediction job's rows without their index: the per-text objects of /predict."""
    return [{k: v for k, v in r.items() if k != "index"} for r in rows]


class ClassifierService:
    def __init__(self, settings: Settings, registry: Registry, backend: Backend, store: ClassifierStore) -> None:
        self.settings, self.registry, self.backend, self.store = settings, registry, backend, store

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

    async def _wait(self, job_id: str, timeout_s: float) -> dict | None:
        """The job once it is finished, or as it is when `timeout_s` has passed (None: gone)."""
        deadline = time.monotonic() + timeout_s
        pause = POLL_FIRST_S
        while True:
            job = await self.backend.job(job_id)
            if job is None or job["status"] in TERMINAL or time.monotonic() >= deadline:
                return job
            await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, self.settings.score_poll_max_s)

    async def _rows(self, job_id: str) -> list[dict]:
        found = await self.backend.results(job_id)
        if found is None:
            raise NotFound(f"job {job_id!r} expired before its results were read")
        return list(found[1])

    # -- create, inspect, delete --------------------------------------------------------------

    async def create(
        self,
        model: str | None,
        method: str,
        examples: list[dict],
        options: dict,
        *,
        fingerprint: str = "",
        idempotency_key: str | None = None,
    ) -> dict:
        """Store the definition and fit it as a job; the classifier's info once the fit succeeded
        (within the wait), else Pending (202). A fit that fails removes the classifier (422)."""
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
            "status": "fitting",
        }
        await self.store.put(record)  # first: a worker reads the definition when the fit task runs
        try:
            job = await self.backend.submit(ClassifySpec("fit", record, fingerprint=fingerprint), idempotency_key)
        except BaseException:
            await self.store.delete(record["id"])
            raise
        if job.get("classifier") != record["id"]:  # the Idempotency-Key named an earlier create
            await self.store.delete(record["id"])
            found = await self.store.get(str(job.get("classifier")))
            if found is None:
                raise NotFound(f"the classifier this Idempotency-Key created ({job.get('classifier')}) is gone")
            record = found
        else:
            record["job"] = job["id"]
            await self.store.put(record)
        record = await self._settle(record, await self._wait(job["id"], s.score_wait_s), created=True)
        if record["status"] == "fitting":
            raise Pending(await self.backend.job(record["job"]) or job, {**public(record), "job": job})
        return public(record)

    async def _settle(self, record: dict, job: dict | None, created: bool = False) -> dict:
        """The record updated from its fit job: `ready` with what the fit chose, or `failed` with
        why (a create that waited for its fit deletes the classifier and answers 422 instead)."""
        if record.get("status", "ready") != "fitting":
            return record
        if job is None:  # the job expired: predictions fit again where they run
            record = {**record, "status": "ready"}
        elif job["status"] == "succeeded":
            rows = await self._rows(str(job["id"]))
            record = {**record, "status": "ready", "fitted": rows[0]["fitted"] if rows else None}
        elif job["status"] in ("failed", "cancelled"):
            error = str(job.get("error") or f"the fit job was {job['status']}")
            if created:
                await self.store.delete(record["id"])
                raise Invalid(f"/examples: {error}", "/examples")
            record = {**record, "status": "failed", "error": error}
        else:
            return record
        await self.store.put(record)
        return record

    async def get(self, classifier_id: str) -> dict:
        record = await self.store.get(classifier_id)
        if record is None:
            raise NotFound(f"no classifier {classifier_id!r} (unknown, deleted, or expired)")
        if record.get("status") == "fitting":
            job = await self.backend.job(record["job"]) if record.get("job") else None
            record = await self._settle(record, job)
        return record

    async def delete(self, classifier_id: str) -> dict:
        record = await self.get(classifier_id)
        await self.store.delete(classifier_id)
        return public(record)

    # -- predictions ----------------------------------------------------------------------

    async def _usable(self, classifier_id: str) -> dict:
        record = await self.get(classifier_id)
        if record.get("status") == "failed":
            raise Invalid(f"classifier {classifier_id!r} could not be fitted: {record.get('error')}")
        return record

    def _spec(self, record: dict, texts: list[str]) -> ClassifySpec:
        fingerprint = hashlib.sha256(json.dumps([record["id"], texts]).encode()).hexdigest()
        return ClassifySpec(
            "predict", record, list(texts), chunk=self.settings.classify_chunk_texts, fingerprint=fingerprint
        )

    async def predict(self, classifier_id: str, texts: list[str]) -> dict:
        """Predict a few texts as a job and wait for it (Pending past the wait: 202)."""
        s = self.settings
        self._check_texts(texts, s.max_predict_texts, "per request")
        record = await self._usable(classifier_id)
        needed = segments_needed(record, len(texts))
        if needed > s.max_predict_segments:
            raise TooLarge(
                f"this prediction needs {needed} code lengths; at most {s.max_predict_segments} per request "
                "(send fewer texts per request)"
            )
        job = await self.backend.submit(self._spec(record, texts), None)
        job = await self._wait(str(job["id"]), s.score_wait_s) or job
        if job["status"] == "failed":
            raise Invalid(f"/texts: {job.get('error')}", "/texts")
        if job["status"] == "cancelled":
            raise Cancelled(f"prediction job {job['id']} was cancelled")
        if job["status"] != "succeeded":
            raise Pending(job)
        return {
            "id": record["id"],
            "model": record["model"],
            "method": record["method"],
            "predictions": predictions_of(await self._rows(str(job["id"]))),
        }

    async def submit_prediction(self, classifier_id: str, texts: list[str], idempotency_key: str | None) -> dict:
        """Validate everything first (bad input never becomes a failed job), then queue the job."""
        self._check_texts(texts, self.settings.max_prediction_job_texts, "per prediction job")
        record = await self._usable(classifier_id)
        job = await self.backend.submit(self._spec(record, texts), idempotency_key)
        return self._old_shape(job, [])

    async def get_prediction(self, classifier_id: str, job_id: str) -> dict:
        """A prediction job in the shape of the replaced prediction-job system."""
        found = await self.backend.results(job_id)
        if found is None or found[0].get("classifier") != classifier_id or found[0].get("kind") != "predict":
            raise NotFound(f"no prediction job {job_id!r} of classifier {classifier_id!r} (unknown or expired)")
        job, rows, _ = found
        return self._old_shape(job, list(rows) if job["status"] == "succeeded" else [])

    @staticmethod
    def _old_shape(job: dict, rows: list[dict]) -> dict:
        """The job as the replaced system showed it (done/total at the top, predictions when
        succeeded), with the job system's fields beside it (`progress`, `kind`)."""
        progress = job["progress"]
        assert isinstance(progress, dict)
        out = {
            "id": job["id"],
            "classifier": job["classifier"],
            "status": job["status"],
            "done": progress["done"],
            "total": progress["total"],
            "resumes": 0,
            "created_at": job["created_at"],
            "updated_at": job.get("finished_at") or time.time(),
            "kind": job["kind"],
            "progress": progress,
        }
        if job.get("error"):
            out["error"] = job["error"]
        if job["status"] == "succeeded":
            out["predictions"] = predictions_of(rows)
        return out


__all__ = ["Cancelled", "ClassifierService", "Invalid", "NotFound", "Pending", "TooLarge", "public"]
