"""The whole key schema, for the embedded cache and for Redis alike. Nothing else builds keys.

Two prefixes on purpose: `clc:` is cache (safe to evict, has a TTL), `clq:` is queue and job
state (must never be evicted). See docs/RELIABILITY.md for the Redis memory policy.
"""

from __future__ import annotations

CACHE = "clc"
QUEUE = "clq"


def length(ns: str, hx: str) -> str:
    """C(X) in bits under model namespace `ns` (model id, revision, window)."""
    return f"{CACHE}:len:{ns}:{hx}"


def conditional(ns: str, hx: str, hy: str) -> str:
    """C(Y|X) in bits: Y coded after X."""
    return f"{CACHE}:cond:{ns}:{hx}:{hy}"


def data(sha: str) -> str:
    """Canonical text of a dataset, kept while work on it is queued."""
    return f"{QUEUE}:data:{sha}"


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
    """Hash: id, model, kind, status, total, done, error, created_at, finished_at, info, matrix_ids."""
    return f"{QUEUE}:job:{job_id}"


def job_pairs(job_id: str) -> str:
    """List, in pair order: JSON [pair id, sha x, sha y, bytes x, bytes y]."""
    return f"{QUEUE}:job:{job_id}:pairs"


def job_values(job_id: str) -> str:
    """Hash: task id → bits, every code length the job's pairs need (copied from the cache or
    written by a worker), so results never depend on cache entries surviving eviction."""
    return f"{QUEUE}:job:{job_id}:values"


def job_waiting(job_id: str) -> str:
    """Hash: task id → comma-separated indices of the pairs still waiting for it."""
    return f"{QUEUE}:job:{job_id}:waiting"


def job_remaining(job_id: str) -> str:
    """Hash: pair index → number of its code lengths not computed yet; 0 = the pair is done."""
    return f"{QUEUE}:job:{job_id}:remaining"


def job_keys(job_id: str) -> list[str]:
    """Every key of one job, for EXPIRE and for Lua scripts (KEYS order is fixed)."""
    return [job(job_id), job_pairs(job_id), job_values(job_id), job_waiting(job_id), job_remaining(job_id)]


def idempotency(key_digest: str) -> str:
    return f"{QUEUE}:idem:{key_digest}"


def rate_limit(key_digest: str) -> str:
    return f"{QUEUE}:rate:{key_digest}"


def classifier(classifier_id: str) -> str:
    """A classifier's definition (method, model, options, examples) as JSON; not evictable state."""
    return f"{QUEUE}:clf:{classifier_id}"


def classifier_prediction(job_id: str) -> str:
    """A prediction job of a classifier as JSON (status, progress, predictions when done); expires."""
    return f"{QUEUE}:clfpred:{job_id}"


def classifier_prediction_texts(job_id: str) -> str:
    """A prediction job's texts as one JSON list, written once at submit (what a resume reads)."""
    return f"{QUEUE}:clfpred:{job_id}:texts"


def classifier_prediction_results(job_id: str) -> str:
    """A prediction job's predictions so far: a list, one JSON prediction per text, in text order."""
    return f"{QUEUE}:clfpred:{job_id}:results"


def classifier_prediction_claim(job_id: str) -> str:
    """Held (SET NX, expiring) by the API process that resumes a job whose process stopped."""
    return f"{QUEUE}:clfpred:{job_id}:claim"
