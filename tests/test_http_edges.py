"""HTTP edges a fuzzer and a hostile client found (issue 16): disconnects, methods, errors, limits."""

from __future__ import annotations

import re
import socket
import time
from urllib.parse import urlsplit

import httpx


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
