"""Real redis-server and real `codelen worker` processes for the distributed-mode tests.

Import the fixtures into a test module: `from tests.redis_support import redis_server, redis_url`.
Each Redis runs on a free port in a temporary directory with AOF on, so it can be restarted from
its append-only file. Never the machine's own Redis on 6379.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from codelen import keys
from codelen.settings import Settings
from tests.conftest import fast_settings, free_port

ROOT = Path(__file__).resolve().parent.parent

# Small timeouts so reclaiming a dead worker's entries takes about a second, not a minute.
FAST_RELIABILITY = {
    "reclaim_idle_s": 1.5,
    "reclaim_interval_s": 0.3,
    "heartbeat_s": 0.3,
    "max_deliveries": 3,
    "max_crash_deliveries": 3,
    "model_info_refresh_s": 0.5,
}


class RedisServer:
    """redis-server on a free port, AOF in `directory`; `restart()` reloads from the AOF."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is missing: `./dev test` installs it (apt-get install redis-server)")
        self.binary, self.directory = binary, directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.ping():
                    break
            except redis.exceptions.BusyLoadingError:
                pass
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
            time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        """SIGTERM: Redis fsyncs its AOF and exits, like `systemctl stop redis`."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=20)

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def redis_url(redis_server: RedisServer) -> str:
    """A clean Redis for each test (the server itself is shared by the module)."""
    if redis_server.process is None or redis_server.process.poll() is not None:
        redis_server.start()
    with redis_server.client() as r:
        r.flushall()
    return redis_server.url


def distributed_settings(redis_url: str, **overrides: object) -> Settings:
    return fast_settings(redis_url=redis_url, **{**FAST_RELIABILITY, **overrides})


class WorkerProcess:
    """A real `codelen worker` subprocess; its log goes to a file the test can read."""

    def __init__(
        self, redis_url: str, models: str, log_dir: Path, name: str, metrics_port: int | None = None, **settings: object
    ) -> None:
        env = {**os.environ, "REDIS_URL": redis_url, "CODELEN_MODELS": models, "PYTHONUNBUFFERED": "1"}
        env.setdefault("OMP_NUM_THREADS", "1")  # several workers and the API share 2 cores
        env.update({f"CODELEN_{k.upper()}": str(v) for k, v in {**FAST_RELIABILITY, **settings}.items()})
        env.pop("CODELEN_API_KEYS", None)
        self.name = name
        self.log_path = log_dir / f"worker-{name}-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        cmd = [sys.executable, "-m", "codelen.cli", "worker", "--name", name, "--log-level", "info"]
        if metrics_port is not None:
            cmd += ["--metrics-port", str(metrics_port)]
        self.process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=20)
        self._log.close()

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture()
def workers(redis_url: str, tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    """Start workers with `workers.append(start_worker(...))`-style helpers; all stopped at the end."""
    started: list[WorkerProcess] = []
    yield started
    for w in started:
        if w.process.poll() is None:
            w.stop()


def start_worker(
    redis_url: str, models: str, log_dir: Path, name: str, metrics_port: int | None = None, **settings: object
) -> WorkerProcess:
    return WorkerProcess(redis_url, models, log_dir, name, metrics_port, **settings)


def wait_published(redis_url: str, models: list[str], timeout: float = 60, *, workers: int = 1) -> None:
    """Until `workers` workers beat and every model's info is published."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        beating = r.zcount(keys.WORKERS, time.time() - 2, "+inf")
        if beating >= workers and all(r.exists(keys.model_info(m)) for m in models):
            r.close()
            return
        time.sleep(0.05)
    r.close()
    raise AssertionError(f"workers did not publish {models} within {timeout} s")
