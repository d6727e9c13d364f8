"""Per-API-key rate limits: a token bucket in memory (embedded mode, one process) or in Redis
(distributed mode: every API process draws from the same bucket)."""

from __future__ import annotations

import logging
import time

from redis.exceptions import RedisError

from codelen import keys
from codelen.redis_client import connect

log = logging.getLogger("codelen.service")


class TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._state: dict[str, tuple[float, float]] = {}

    async def take(self, key: str) -> float:
        """0 if allowed, else seconds until a token is available."""
        now = time.monotonic()
        tokens, last = self._state.get(key, (float(self.burst), now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1:
            self._state[key] = (tokens - 1, now)
            return 0.0
        self._state[key] = (tokens, now)
        return (1 - tokens) / self.rate


# KEYS: bucket.  ARGV: rate per second, burst.  Returns the wait in seconds (a string), "0" if allowed.
# Redis' clock, so API processes on different machines agree.
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local s = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(s[1]) or burst
local last = tonumber(s[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - last) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return tostring(wait)
"""


class RedisTokenBucket:
    """The same bucket, kept in Redis under keys.rate_limit. If Redis cannot be reached the
    request is let through (the queue has its own back-pressure) and the error logged."""

    def __init__(self, url: str, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.redis = connect(url)
        self._take = self.redis.register_script(TAKE)

    async def take(self, key: str) -> float:
        try:
            return float(await self._take(keys=[keys.rate_limit(key)], args=[self.rate, self.burst]))
        except RedisError as exc:
            log.warning("rate limit not applied, Redis unavailable: %s", exc)
            return 0.0


def bucket_for(url: str | None, rate: float, burst: int) -> TokenBucket | RedisTokenBucket | None:
    if rate <= 0:
        return None
    return RedisTokenBucket(url, rate, burst) if url else TokenBucket(rate, burst)
