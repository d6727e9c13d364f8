"""Shared fixtures: a real HTTP server on a free port (uvicorn in a thread), settings for tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

from codelen.settings import Settings
from service.app import create_app
from service.http_limits import uvicorn_config

FAST_MODELS = "tiny-random,gzip,zlib,bz2,lzma,zstd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(settings: Settings) -> Iterator[str]:
    """Run the app on a free port in a background thread; yield its base URL."""
    port = free_port()
    config = uvicorn_config(create_app(settings), settings, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def fast_settings(**overrides: object) -> Settings:
    base: dict[str, object] = dict(models=FAST_MODELS, default_model="tiny-random", preload="", redis_url=None)
    base.update(overrides)
    return Settings(**base)


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with serve(fast_settings()) as url:
        yield url


@pytest.fixture()
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60) as client:
        yield client
