"""The whole key schema, for the embedded cache and for Redis alike. Nothing else builds keys.

Two prefixes on purpose: `clc:` is cache (safe to evict, has a TTL), `clq:` is queue and job
state (must never be evicted). See docs/RELIABILITY.md for the Redis memory policy.
"""

from __future__ import annotations

import re

CACHE = "clc"
QUEUE = "clq"


class UnknownId(LookupError):
    """An id that is not of the form this service issues: it names nothing (404), and it never
    becomes part of a key name (a `:` or `*` in it would name, or match, another key)."""


JOB_ID = re.compile(r"job_[0-9a-f]{32}")  # workers/jobs.py: new_job_id
# classifiers: the service issues uuid4().hex; any short name of these characters names nothing else
NAME = re.compile(r"[0-9A-Za-z_-]{1,64}")
DIGEST = re.compile(r"[0-9a-f]{64}")  # sha256 hex: datasets, Idempotency-Keys, API keys


def _checked(value: str, form: re.Pattern[str], what: str) -> str:
    if not (isinstance(value, str) and form.fullmatch(value)):
        shown = value if len(value) <= 80 else value[:80] + "…"  # a long id is shown cut
        raise UnknownId(f"no {what} {shown!r} (not an id this service issues)")
    return value


NO_JOB = "job_" + "0" * 32  # of the form, yet names no job (a uuid4 is never all zeros)


def is_job_id(value: str) -> bool:
    return JOB_ID.fullmatch(value) is not None


def length(ns: str, hx: str) -> str:
    """C(X) in bits under model namespace `ns` (model id, revision, window)."""
    return f"{CACHE}:len:{ns}:{hx}"


def conditional(ns: str, hx: str, hy: str) -> str:
    """C(Y|X) in bits: Y coded after X."""
    return f"{CACHE}:cond:{ns}:{hx}:{hy}"


def data(sha: str) -> str:
    """Canonical text of a dataset, kept while work on it is queued."""
    return f"{QUEUE}:data:{_checked(sha, DIGEST, 'dataset')}"


def stream(model_id: str) -> str:
    """The work queue of one model: an entry per missing task of a job (fields job, model, ns,
    hx, hy, bytes). One stream per model, so a worker reads only the models it has loaded."""
    return f"{QUEUE}:stream:{model_id}"


GROUP = "workers"  # the consumer group every worker reads through
DEAD_LETTER = f"{QUEUE}:dead"  # entries that could not be computed, with the reason


def model_info(model_id: str) -> str:
    """ModelInfo (JSON) published by the workers that serve the model; the API builds cache keys
    from it, so it never loads weights just to learn the revision."""
    return f"{QUEUE}:model:{model_id}"


WORKERS = f"{QUEUE}:workers"  # sorted set: consumer name → time of its last heartbeat (s)


def item_error(entry_id: str) -> str:
    """Last error of a stream entry that raised, for the dead-letter reason."""
    return f"{QUEUE}:itemerr:{entry_id}"


def job(job_id: str) -> str:
    """Hash: id, model, kind, status, total, done, error, created_at, finished_at, info, matrix_ids;
    a classifier job (kind fit or predict) also its classifier and chunk (texts per task)."""
    return f"{QUEUE}:job:{_checked(job_id, JOB_ID, 'job')}"


def job_pairs(job_id: str) -> str:
    """List, in pair order: JSON [pair id, sha x, sha y, bytes x, bytes y]; a prediction job's texts."""
    return f"{job(job_id)}:pairs"


def job_values(job_id: str) -> str:
    """Hash: task id → bits, every code length the job's pairs need (copied from the cache or
    written by a worker), so results never depend on cache entries surviving eviction; a classifier
    job's: task id (`fit`, `p<first text>`) → its JSON value (workers/classifying.py)."""
    return f"{job(job_id)}:values"


def job_waiting(job_id: str) -> str:
    """Hash: task id → comma-separated indices of the pairs (a classifier job: texts) still waiting for it."""
    return f"{job(job_id)}:waiting"


def job_remaining(job_id: str) -> str:
    """Hash: pair index → number of its code lengths not computed yet; 0 = the pair is done."""
    return f"{job(job_id)}:remaining"


def job_keys(job_id: str) -> list[str]:
    """Every key of one job, for EXPIRE and for Lua scripts (KEYS order is fixed)."""
    return [job(job_id), job_pairs(job_id), job_values(job_id), job_waiting(job_id), job_remaining(job_id)]


def idempotency(key_digest: str) -> str:
    return f"{QUEUE}:idem:{_checked(key_digest, DIGEST, 'key digest')}"


def rate_limit(key_digest: str) -> str:
    return f"{QUEUE}:rate:{_checked(key_digest, DIGEST, 'key digest')}"


def classifier(classifier_id: str) -> str:
    """A classifier's definition (method, model, options, examples) as JSON; not evictable state."""
    return f"{QUEUE}:clf:{_checked(classifier_id, NAME, 'classifier')}"


def classify_value(ns: str, name: str) -> str:
    """A value a classifier's model pass produced (classify/caching.py: `seg:`, `states:`, `rows:`
    and the sha256 of the symbols), under model namespace `ns`: cache, evictable, expires."""
    return f"{CACHE}:clf:{ns}:{name}"
