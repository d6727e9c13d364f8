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


STREAM = f"{QUEUE}:stream"
GROUP = "workers"
DEAD_LETTER = f"{QUEUE}:dead"


def job(job_id: str) -> str:
    return f"{QUEUE}:job:{job_id}"


def job_pairs(job_id: str) -> str:
    return f"{QUEUE}:job:{job_id}:pairs"


def job_results(job_id: str) -> str:
    return f"{QUEUE}:job:{job_id}:results"


def job_done(job_id: str) -> str:
    return f"{QUEUE}:job:{job_id}:done"


def idempotency(key_digest: str) -> str:
    return f"{QUEUE}:idem:{key_digest}"


def rate_limit(key_digest: str) -> str:
    return f"{QUEUE}:rate:{key_digest}"
