"""HTTP edges a fuzzer and a hostile client found (issue 16): disconnects, methods, errors, limits."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import fast_settings, serve


def _connect(base_url: str) -> socket.socket:
    parts = urlsplit(base_url)
    return socket.create_connection((parts.hostname, parts.port), timeout=30)


def _count(exposition: str, status: str) -> float:
    found = re.findall(rf'^codelen_http_requests_total{{[^}}]*status="{status}"[^}}]*}} (\S+)$', exposition, re.M)
    return sum(float(v) for v in found)


def test_client_that_leaves_mid_body_is_counted_499_not_500(base_url: str, http: httpx.Client) -> None:
    before = _count(http.get("/metrics").text, "499")
    with _connect(base_url) as s:
        s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    deadline = time.monotonic() + 30
    while _count(exposition := http.get("/metrics").text, "499") == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _count(exposition, "499") == before + 1
    assert _count(exposition, "500") == 0


def test_405_allow_lists_every_method_of_the_path(http: httpx.Client) -> None:
    r = http.post("/v1/jobs/some-job")
    assert r.status_code == 405
    assert r.headers["content-type"].startswith("application/problem+json")
    assert set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "DELETE"}
    r = http.put("/healthz")
    assert r.status_code == 405 and set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}


def test_head_is_answered_like_get_without_a_body(http: httpx.Client) -> None:
    for path in ("/healthz", "/readyz", "/v1/models", "/metrics"):
        get, head = http.get(path), http.head(path)
        assert head.status_code == get.status_code == 200, path
        assert head.headers["content-type"] == get.headers["content-type"], path
        assert head.content == b"", path
    assert http.head("/v1/jobs/nope").status_code == 404


def test_a_500_does_not_name_the_exception() -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from tests.conftest import fast_settings

    app = create_app(fast_settings())

    async def boom() -> None:
        raise ValueError("secret internals")

    app.add_api_route("/boom", boom)
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/boom")
    assert r.status_code == 500 and r.headers["content-type"].startswith("application/problem+json")
    assert "ValueError" not in r.text and "secret" not in r.text
    assert r.json()["detail"]


def test_plot_without_the_plot_extra_says_what_to_install(tmp_path) -> None:
    import subprocess
    import sys

    matrix = tmp_path / "m.csv"
    matrix.write_text("ncd,a,b\na,0.1,0.9\nb,0.9,0.1\n")
    hide = "import sys; sys.modules['matplotlib'] = None; sys.modules['scipy'] = None; from codelen.cli import main; "
    code = hide + f"sys.exit(main(['plot', {str(matrix)!r}, '-o', {str(tmp_path / 'm.png')!r}]))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "pip install 'codelen[plot]'" in done.stderr
    assert "Traceback" not in done.stderr


def _body_of(n_items: int, item: bytes) -> bytes:
    return b"[" + b",".join([item] * n_items) + b"]"


def test_bodies_that_would_expand_in_memory_are_413_before_parsing(http: httpx.Client) -> None:
    for item in (b"{}", b"[]"):
        raw = _body_of(2_800_000, item)  # 8.4 MB: millions of objects once parsed
        assert len(raw) < 8 * 1024 * 1024 + 512 * 1024
        r = http.post("/v1/score", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 413, (item, r.status_code, r.text[:200])
        assert r.headers["content-type"].startswith("application/problem+json")
    big = {"x": ["a" * 1_000_000] * 3, "y": ["b" * 1_000_000] * 3, "model": "gzip"}  # large, but flat
    assert http.post("/v1/score", json=big).status_code == 200


def test_expansion_estimate_is_not_fooled_by_brackets_inside_strings() -> None:
    from service.json_body import expansion_estimate

    bound = 64 * 1024 * 1024
    text = b'{"x": "' + b"{[" * 2_000_000 + b'", "y": "b"}'
    assert expansion_estimate(text, bound) < 20 * 1024 * 1024
    assert expansion_estimate(_body_of(1_000_000, b"{}"), bound) > 80 * 1_000_000


def test_each_body_is_parsed_once(monkeypatch) -> None:
    import json

    from fastapi.testclient import TestClient

    from service.app import create_app
    from tests.conftest import fast_settings

    raw = json.dumps({"x": "parsed once?", "y": "only once", "model": "gzip"}).encode()
    calls: list[bytes] = []
    loads = json.loads

    def counting_loads(s, *args, **kwargs):
        if s == raw:
            calls.append(s)
        return loads(s, *args, **kwargs)

    with TestClient(create_app(fast_settings(score_fast_path=False))) as client:
        monkeypatch.setattr(json, "loads", counting_loads)
        r = client.post("/v1/score", content=raw, headers={"content-type": "application/json"})
        monkeypatch.undo()
    assert r.status_code == 200, r.text
    assert len(calls) == 1


def test_malformed_json_is_400_and_other_media_types_415(http: httpx.Client) -> None:
    for raw in (b'{"x": "a", "y": ', b'{"x": "\xff\xfe", "y": "b"}'):
        r = http.post("/v1/score", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.headers["content-type"].startswith("application/problem+json"), r.text
    r = http.post("/v1/score", content=b"x=a&y=b", headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and r.headers["content-type"].startswith("application/problem+json"), r.text
    r = http.post("/v1/jobs", content=b"x", headers={"content-type": "text/plain"})
    assert r.status_code == 415


@pytest.fixture(scope="module")
def strict_url() -> Iterator[str]:
    """A server with short read timeouts, so that a slow client is cut off while the test waits."""
    with serve(fast_settings(header_timeout_s=0.5, body_timeout_s=0.5, max_header_bytes=16 * 1024)) as url:
        yield url


def _read_all(s: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def test_slow_headers_get_408_and_a_close(strict_url: str) -> None:
    with _connect(strict_url) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        answer = _read_all(s)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
    assert b"application/problem+json" in answer


def test_a_connection_that_sends_nothing_is_closed(strict_url: str) -> None:
    with _connect(strict_url) as s:
        assert _read_all(s) == b""


def test_slow_body_gets_408_and_a_close(strict_url: str) -> None:
    with _connect(strict_url) as s:
        s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        answer = _read_all(s)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]


@pytest.mark.parametrize("size", [20 * 1024, 4 * 1024 * 1024])
def test_headers_over_the_limit_get_431_and_a_close(strict_url: str, size: int) -> None:
    with _connect(strict_url) as s:
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
        try:
            s.sendall(head)
        except OSError:
            pass  # the server closed before reading it all: that is the point
        answer = _read_all(s)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]


def test_requests_within_the_limits_still_work_on_a_kept_alive_connection(strict_url: str) -> None:
    with httpx.Client(base_url=strict_url, timeout=30) as client:
        for _ in range(3):
            r = client.post("/v1/score", json={"x": "a", "y": "b", "model": "gzip"}, headers={"X-Pad": "p" * 8000})
            assert r.status_code == 200
            assert client.get("/healthz").status_code == 200


def test_openapi_documents_what_the_service_sends() -> None:
    from service.app import create_app

    doc = create_app(fast_settings(api_keys="ab" * 32, rate_limit_per_s=1.0)).openapi()
    paths = doc["paths"]
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "an API key, when CODELEN_API_KEYS is set"
    }  # fmt: skip
    score = paths["/v1/score"]["post"]
    assert score["security"] == [{"bearer": []}]
    for status in ("400", "401", "413", "415", "422", "429", "503"):
        assert "application/problem+json" in score["responses"][status]["content"], status
    assert "application/problem+json" in paths["/v1/jobs/{job_id}"]["get"]["responses"]["422"]["content"]
    assert "application/json" not in paths["/v1/jobs/{job_id}"]["get"]["responses"]["422"]["content"]
    assert "503" in paths["/readyz"]["get"]["responses"]
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert "security" not in paths["/healthz"]["get"] and "401" not in paths["/healthz"]["get"]["responses"]


def test_a_body_is_not_counted_as_the_next_requests_headers(strict_url: str) -> None:
    """Request 1's body and the start of request 2 arrive in one read (request 1 answered early,
    or pipelined): request 2's headers limit counts its own bytes only, so it is answered, not
    refused with 431 (16 KiB header limit here; the body is 60 KB)."""
    body = b'{"x": "' + b"a" * 60_000 + b'", "y": "b", "model": "gzip"}'
    first = b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    first += b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    with _connect(strict_url) as s:
        s.sendall(first + b"GET /healthz HTTP/1.1\r\nHo")  # request 2's headers not yet complete
        time.sleep(0.2)
        s.sendall(b"st: x\r\nConnection: close\r\n\r\n")
        answer = _read_all(s)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)
    assert statuses == [b"200", b"200"], answer[:300]
