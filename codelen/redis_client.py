"""The one way every component (API backend, workers, rate limit, classifier store) opens Redis.

A Redis restart closes every connection; redis-py's default `Retry` retries only the errors listed
in `retry_on_error`, so without them the first command after a restart fails ("Connection closed
by server"). These clients retry a command that meets a closed connection or a timeout on a new
connection, with redis-py's default backoff (docs/RELIABILITY.md, "Redis restart").
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


def connect(url: str) -> aioredis.Redis:
    """A client that rides over a Redis restart (strings decoded). A retried command may run
    twice: safe for what codelen writes (values SET NX, job progress by the idempotent RECORD
    script, a duplicate stream entry is harmless, a classifier record is a plain SET)."""
    return aioredis.from_url(url, decode_responses=True, retry_on_error=[RedisConnectionError, RedisTimeoutError])
