"""service/problems.py is where the layers' exceptions become problems: each one's status, detail
and headers, whichever route lets it through."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from codelen.datasets import DatasetError
from codelen.keys import UnknownId
from codelen.model_info import UnsupportedMode
from models.registry import ModelUnavailable, UnknownModel
from service import problems
from workers.jobs import JobConflict, Overloaded, TaskFailed, TooLarge, Unavailable

CASES: list[tuple[Exception, int, str, dict[str, str], dict[str, object]]] = [
    (UnknownModel("gpt-17"), 404, "unknown model 'gpt-17'; available: gzip, zstd", {}, {}),
    (UnknownId("no job 'x' (not an id we issue)"), 404, "no job 'x' (not an id we issue)", {}, {}),
    (JobConflict("key reused"), 409, "key reused", {}, {}),
    (DatasetError("too big", "/x/3", too_large=True), 413, "/x/3: too big", {}, {"pointer": "/x/3"}),
    (DatasetError("empty", ""), 422, "/: empty", {}, {"pointer": ""}),
    (TooLarge("needs 9 tasks; the queue holds 5"), 413, "needs 9 tasks; the queue holds 5", {}, {}),
    (UnsupportedMode("no adapt"), 422, "/conditioning: no adapt", {}, {"pointer": "/conditioning"}),
    (TaskFailed("not lossless"), 422, "not lossless", {}, {}),
    (Overloaded("queue holds 7 tasks"), 429, "overloaded: queue holds 7 tasks", {"retry-after": "5"}, {}),
    (ModelUnavailable("no weights"), 503, "no weights", {"retry-after": "30"}, {}),
    (Unavailable("Redis is full"), 503, "Redis is full", {"retry-after": "5"}, {}),
]


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    problems.install(app)
    app.state.settings = SimpleNamespace(retry_after_s=5)
    app.state.registry = SimpleNamespace(ids=lambda: ["gzip", "zstd"])

    @app.get("/raise/{k}")
    async def raise_case(k: int) -> None:
        raise CASES[k][0]

    return TestClient(app)


@pytest.mark.parametrize("k", range(len(CASES)), ids=[type(c[0]).__name__ for c in CASES])
def test_each_exception_becomes_its_problem(client: TestClient, k: int) -> None:
    _, status, detail, headers, extra = CASES[k]
    r = client.get(f"/raise/{k}")
    assert r.status_code == status and r.headers["content-type"] == "application/problem+json"
    title = problems.TITLES[status]
    assert r.json() == {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    for name, value in headers.items():
        assert r.headers[name] == value
