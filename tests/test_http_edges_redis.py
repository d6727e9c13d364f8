"""The classifier store in distributed mode: a restarted Redis is ridden over, a Redis down is a 503."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import serve
from tests.redis_support import RedisServer, distributed_settings, redis_server, redis_url  # noqa: F401

pytestmark = pytest.mark.redis


def test_classifier_store_rides_over_a_restart_and_answers_503_when_redis_is_down(
    redis_server: RedisServer,  # noqa: F811
    redis_url: str,  # noqa: F811
) -> None:
    with serve(distributed_settings(redis_url)) as url, httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/v1/classifiers/nope").status_code == 404
        redis_server.restart()
        assert http.get("/v1/classifiers/nope").status_code == 404  # the first command after a restart is retried
        redis_server.stop()
        try:
            r = http.get("/v1/classifiers/nope")
            assert r.status_code == 503, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
            assert int(r.headers["retry-after"]) > 0
        finally:
            redis_server.start()
