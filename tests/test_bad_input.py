"""Malformed and hostile requests: every one gets a 4xx problem+json, none a 5xx or a hang."""

from __future__ import annotations

import json

import httpx
import pytest

from codelen.settings import Settings

BIG = "a" * (Settings.model_fields["max_record_bytes"].default + 1)  # one byte over the default record limit

BAD_JSON_BODIES: list[tuple[str, object]] = [
    ("not an object", [1, 2, 3]),
    ("string body", "hello"),
    ("null body", None),
    ("missing y", {"x": "a"}),
    ("missing x", {"y": "a"}),
    ("x number", {"x": 1, "y": "a"}),
    ("y bool", {"x": "a", "y": True}),
    ("x object", {"x": {"a": 1}, "y": "a"}),
    ("x list of numbers", {"x": [1, 2], "y": "a"}),
    ("x nested list", {"x": [["a"]], "y": "a"}),
    ("empty list", {"x": [], "y": "a"}),
    ("empty string", {"x": "", "y": "a"}),
    ("list of empty strings", {"x": [""], "y": "a"}),
    ("unknown model", {"x": "a", "y": "b", "model": "gpt-17"}),
    ("model number", {"x": "a", "y": "b", "model": 3}),
    ("NUL byte", {"x": "a\u0000b", "y": "b"}),
    ("NUL in record", {"x": ["ok", "\u0000"], "y": "b"}),
    ("record separator", {"x": "a\u001eb", "y": "b"}),
    ("extra field", {"x": "a", "y": "b", "evil": 1}),
    ("huge record", {"x": BIG, "y": "b"}),
    ("too many records", {"x": ["a"] * 10_001, "y": "b"}),
    ("float x", {"x": 1.5, "y": "b"}),
]

BAD_JOBS: list[tuple[str, object]] = [
    ("no pairs no matrix", {"model": "gzip"}),
    ("both", {"pairs": [{"id": "1", "x": "a", "y": "b"}], "matrix": {"datasets": [{"id": "a", "data": "x"}]}}),
    ("empty pairs", {"pairs": []}),
    ("pair without id", {"pairs": [{"x": "a", "y": "b"}]}),
    ("pair id number", {"pairs": [{"id": 1, "x": "a", "y": "b"}]}),
    ("duplicate ids", {"pairs": [{"id": "1", "x": "a", "y": "b"}, {"id": "1", "x": "a", "y": "c"}]}),
    ("pair empty x", {"pairs": [{"id": "1", "x": "", "y": "b"}]}),
    ("too many pairs", {"model": "gzip", "pairs": [{"id": str(i), "x": "a", "y": "b"} for i in range(10_001)]}),
    ("matrix empty", {"matrix": {"datasets": []}}),
    ("matrix id with bar", {"matrix": {"datasets": [{"id": "a|b", "data": "x"}]}}),
    ("matrix duplicate ids", {"matrix": {"datasets": [{"id": "a", "data": "x"}, {"id": "a", "data": "y"}]}}),
    ("matrix data number", {"matrix": {"datasets": [{"id": "a", "data": 5}]}}),
    ("pairs not a list", {"pairs": {"id": "1"}}),
    ("unknown model job", {"model": "nope", "pairs": [{"id": "1", "x": "a", "y": "b"}]}),
]


def check_problem(r: httpx.Response, label: str) -> None:
    assert 400 <= r.status_code < 500, f"{label}: {r.status_code} {r.text[:200]}"
    assert r.headers["content-type"].startswith("application/problem+json"), label
    doc = r.json()
    assert doc["status"] == r.status_code and doc["title"] and doc["detail"], label


@pytest.mark.parametrize("label,body", BAD_JSON_BODIES, ids=[b[0] for b in BAD_JSON_BODIES])
def test_bad_score_bodies(http: httpx.Client, label: str, body: object) -> None:
    check_problem(http.post("/v1/score", json=body), label)


@pytest.mark.parametrize("label,body", BAD_JOBS, ids=[b[0] for b in BAD_JOBS])
def test_bad_jobs(http: httpx.Client, label: str, body: object) -> None:
    check_problem(http.post("/v1/jobs", json=body), label)


RAW: list[tuple[str, bytes, dict[str, str]]] = [
    ("invalid JSON", b'{"x": "a", "y": ', {}),
    ("trailing garbage", b'{"x": "a", "y": "b"} xx', {}),
    ("empty body", b"", {}),
    ("lone surrogate", b'{"x": "\\ud800", "y": "b"}', {}),
    ("invalid UTF-8", b'{"x": "\xff\xfe", "y": "b"}', {}),
    ("deeply nested", b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b', "y": "b"}', {}),
    ("deeply nested objects", b'{"a":' * 50_000 + b"1" + b"}" * 50_000, {}),
    ("10 MB body", b'{"x": "' + b"a" * (10 * 1024 * 1024) + b'", "y": "b"}', {}),
    ("form content type", b"x=a&y=b", {"content-type": "application/x-www-form-urlencoded"}),
    ("NaN", b'{"x": NaN, "y": "b"}', {}),
]


@pytest.mark.parametrize("label,raw,headers", RAW, ids=[r[0] for r in RAW])
def test_raw_bodies(http: httpx.Client, label: str, raw: bytes, headers: dict[str, str]) -> None:
    check_problem(http.post("/v1/score", content=raw, headers={"content-type": "application/json", **headers}), label)


def test_chunked_body_over_limit_without_length(http: httpx.Client) -> None:
    def chunks():
        for _ in range(10):
            yield b"a" * (1024 * 1024)

    check_problem(http.post("/v1/score", content=chunks(), headers={"content-type": "application/json"}), "chunked")


def test_wrong_methods_and_paths(http: httpx.Client) -> None:
    check_problem(http.get("/v1/score"), "GET score")
    check_problem(http.get("/v1/jobs/job_does_not_exist"), "unknown job")
    check_problem(http.get("/v1/jobs/job_does_not_exist/results"), "unknown job results")
    check_problem(http.delete("/v1/jobs/job_does_not_exist"), "cancel unknown job")
    check_problem(http.get("/v2/anything"), "unknown path")
    check_problem(http.post("/v1/jobs", content=b"[]", headers={"content-type": "application/json"}), "list job")


def test_still_answers_after_abuse(http: httpx.Client) -> None:
    for _ in range(3):
        http.post("/v1/score", content=b"{" * 10_000, headers={"content-type": "application/json"})
    assert http.get("/healthz").status_code == 200
    ok = http.post("/v1/score", json={"x": "still", "y": "alive", "model": "gzip"})
    assert ok.status_code == 200 and json.loads(ok.text)["ncd"] >= 0
