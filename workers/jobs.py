"""Job descriptions and result documents, shared by the embedded and the Redis backends."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from codelen.datasets import Dataset
from codelen.scores import PairLengths, score_document
from models.protocol import ModelInfo
from workers.compute import FIT, ClassifyTask

TERMINAL = ("succeeded", "failed", "cancelled")


class JobConflict(ValueError):
    """An Idempotency-Key reused with a different request body."""


class TaskFailed(ValueError):
    """A code length could not be computed for this input (e.g. the tokenizer is lossy on it)."""


class Overloaded(RuntimeError):
    """The queue is past its configured depth; the client should retry later."""


class TooLarge(ValueError):
    """The request needs more queue room than the queue ever has: 413 at once, never a 429 to
    retry forever."""


@dataclass(frozen=True)
class PairSpec:
    id: str
    x: Dataset
    y: Dataset


@dataclass
class JobSpec:
    model: str
    pairs: list[PairSpec]
    matrix_ids: list[str] | None = None  # set for a matrix job: pairs are (i, j), i <= j
    fingerprint: str = ""  # hash of the request body, for Idempotency-Key reuse checks
    mode: str = "context"  # conditioning (models/conditioning.py)
    direction: str = "both"  # or "y_given_x": C(X|Y) is not computed


@dataclass
class ClassifySpec:
    """A classifier job: `fit` the classifier of `definition` (total: its examples), or `predict`
    `texts` with it, `chunk` texts per task (workers/classifying.py)."""

    kind: str  # "fit" | "predict"
    definition: dict  # id, model, method, options, examples (the embedded engine runs from it)
    texts: list[str] = field(default_factory=list)
    chunk: int = 16
    fingerprint: str = ""
    mode: str = "context"
    direction: str = "both"

    @property
    def model(self) -> str:
        return self.definition["model"]

    @property
    def classifier(self) -> str:
        return self.definition["id"]

    @property
    def total(self) -> int:
        return len(self.definition["examples"]) if self.kind == "fit" else len(self.texts)

    def tasks(self, job_id: str) -> list[ClassifyTask]:
        """The job's tasks: one fit, or one per chunk of texts."""
        if self.kind == "fit":
            return [ClassifyTask(self.model, self.classifier, job_id, FIT, self.total)]
        n, size = len(self.texts), self.chunk
        return [ClassifyTask(self.model, self.classifier, job_id, i, min(size, n - i)) for i in range(0, n, size)]


def classify_rows(kind: str, classifier: str, tasks: list[ClassifyTask], values: list[object]) -> Iterator[dict]:
    """A classifier job's result rows from its tasks' values (None: not finished): a fit's one row
    {"classifier", "fitted"}, a prediction's {"index", "label", "scores", "bits"?} per text, in order."""
    for t, value in zip(tasks, values, strict=True):
        if value is None:
            continue
        if kind == "fit":
            yield {"classifier": classifier, **value}  # type: ignore[dict-item]
        else:
            for i, p in enumerate(value):  # type: ignore[arg-type]
                yield {"index": t.start + i, **p}


def new_job_id() -> str:
    return "job_" + uuid.uuid4().hex


def matrix_pairs(ids: list[str], datasets: list[Dataset]) -> list[PairSpec]:
    """Every unordered pair i <= j (the diagonal too: NCD(x, x) is not 0 with a real compressor),
    ordered by row so that one X meets all its Y in neighbouring batches."""
    return [
        PairSpec(f"{ids[i]}|{ids[j]}", datasets[i], datasets[j])
        for i in range(len(ids))
        for j in range(i, len(ids))
    ]


def pair_result(info: ModelInfo, pair: PairSpec, lengths: PairLengths) -> dict[str, object]:
    """A result row: the score document without `cached`, and only the mode's name (the results
    document states its parameters once, under `conditioning_parameters`)."""
    doc = score_document(info, pair.x, pair.y, lengths, cached=False)
    doc.pop("cached")
    doc["conditioning"] = {"mode": info.conditioning.mode}
    return {"id": pair.id, **doc}


def matrix_document(ids: list[str], results: list[dict]) -> dict[str, object]:
    """N × N NCD and shared information from the pair results of a matrix job."""
    n = len(ids)
    index = {d: i for i, d in enumerate(ids)}
    ncd = [[0.0] * n for _ in range(n)]
    shared = [[0.0] * n for _ in range(n)]
    lengths = [0.0] * n
    for r in results:
        a, b = r["id"].split("|", 1)  # matrix ids contain no "|" (checked at submission)
        i, j = index[a], index[b]
        ncd[i][j] = ncd[j][i] = r["ncd"]
        shared[i][j] = shared[j][i] = r["shared_information"]
        lengths[i] = r["code_lengths"]["x"]
        lengths[j] = r["code_lengths"]["y"]
    return {"ids": ids, "ncd": ncd, "shared_information": shared, "code_lengths": lengths}


@dataclass
class JobState:
    id: str
    model: str
    kind: str
    total: int
    status: str = "queued"
    done: int = 0
    error: str | None = None
    matrix_ids: list[str] | None = None
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    mode: str = "context"
    direction: str = "both"
    tokens_done: int = 0  # tokens coded in batches that ran this job's tasks
    tokens_total: int = 0  # tokens of those batches, counted when each starts
    classifier: str | None = None  # a classifier job's classifier

    def public(self) -> dict[str, object]:
        return {
            "id": self.id,
            "status": self.status,
            "model": self.model,
            "kind": self.kind,
            "conditioning": self.mode,
            "direction": self.direction,
            "progress": {
                "done": self.done,
                "total": self.total,
                "tokens_done": self.tokens_done,
                "tokens_total": self.tokens_total,
            },
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "error": self.error,
            "classifier": self.classifier,  # a classifier job's (fit, predict); None for score jobs
        }


class Unavailable(RuntimeError):
    """The service cannot do this now (Redis unreachable, no worker serves the model): 503."""
