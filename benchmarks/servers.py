"""The real service under test, started as subprocesses for the benchmarks that talk to it over HTTP.

Several benchmarks measure `codelen serve` the way a user meets it: embedded mode (one `codelen
serve`) or distributed mode (a redis-server on a free port, `codelen worker` processes and `codelen
serve`). Starting, waiting for and stopping those processes is the same in each of them, so it
lives here once; what a benchmark does with the running service stays in the benchmark.

    with service("distributed", models="gzip", workers=2, log_dir=tmp) as svc:
        httpx.get(svc.url + "/v1/models")   # svc.port, svc.pid (the API process, e.g. for its RSS)
        svc.worker_pids                         # e.g. to SIGKILL one mid-job
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextmanager
def process(cmd: list[str], env: Mapping[str, str], log: Path | None) -> Iterator[subprocess.Popen]:
    """Run `cmd` (in the repository root) with stdout and stderr to `log`, or to ours when None; on
    exit SIGTERM, wait up to 30 s, then SIGKILL."""
    with open(log, "w") if log else nullcontext() as out:
        stderr = subprocess.STDOUT if out else None
        proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(env), stdout=out, stderr=stderr)
        try:
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_ready(
    url: str,
    path: str = "/readyz",
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    until: Callable[[httpx.Response], bool] = lambda r: r.status_code == 200,
    procs: Sequence[subprocess.Popen] = (),
) -> None:
    """GET url+path every 0.1 s until `until(answer)` (default: 200); RuntimeError after `timeout`
    seconds, or as soon as one of `procs` has exited."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if until(httpx.get(url + path, headers=dict(headers or {}), timeout=2)):
                return
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        dead = [p.args for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"exited: {dead}" if dead else f"no answer within {timeout} s"
            raise RuntimeError(f"{url}{path} not ready ({why})")
        time.sleep(0.1)


@dataclass(frozen=True)
class Service:
    url: str  # http://127.0.0.1:PORT
    port: int
    pid: int  # of the `codelen serve` process
    worker_pids: tuple[int, ...] = ()  # of the `codelen worker` processes, in order (distributed)
    worker_metrics_ports: tuple[int, ...] = ()  # their `--metrics-port`s (worker_metrics=True), same order
    redis_url: str | None = None  # distributed: the service's own redis-server


@contextmanager
def service(
    mode: str = "embedded",
    *,
    models: str,
    default_model: str | None = None,
    preload: str = "",
    workers: int = 1,
    worker_models: str | None = None,
    worker_metrics: bool = False,
    env: Mapping[str, str] | None = None,
    api_key: str | None = None,
    fast_path: bool | None = None,
    inherit: bool = False,
    log_dir: Path | None = None,
    ready_path: str = "/readyz",
    timeout: float = 60.0,
) -> Iterator[Service]:
    """Start the service and yield it once `ready_path` answers 200 (distributed: and a worker has
    published its models); stop every process on exit.

    mode: "embedded" (`codelen serve` alone) or "distributed" (redis-server without persistence,
    `workers` x `codelen worker --models worker_models` (default: `models`), `codelen serve`).
    worker_metrics: each worker serves Prometheus metrics on a free port (`Service.worker_metrics_ports`).
    models, default_model (default: the first of models), preload: CODELEN_MODELS, _DEFAULT_MODEL,
    _PRELOAD. env: more CODELEN_* settings. api_key: the only accepted key (its SHA-256 in
    CODELEN_API_KEYS; the readiness checks send it). fast_path: CODELEN_SCORE_FAST_PATH (None: the
    default). inherit: keep this process's CODELEN_* settings under those given here (default: drop
    them, so a run is under the stated settings only; REDIS_URL is always the service's own).
    log_dir: each process's output to api-MODE.log, worker-I.log, redis.log there; None: to our
    stdout/stderr (redis-server's to a temporary folder).
    """
    if mode not in ("embedded", "distributed"):
        raise ValueError(f"mode {mode!r}: embedded or distributed")
    penv = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "CODELEN_REDIS_URL")}
    penv = {k: v for k, v in penv.items() if inherit or not k.startswith("CODELEN_")}
    penv.update(CODELEN_MODELS=models, CODELEN_DEFAULT_MODEL=default_model or models.split(",")[0])
    penv["CODELEN_PRELOAD"] = preload
    if fast_path is not None:
        penv["CODELEN_SCORE_FAST_PATH"] = "true" if fast_path else "false"
    headers = {}
    if api_key:
        penv["CODELEN_API_KEYS"] = hashlib.sha256(api_key.encode()).hexdigest()
        headers["Authorization"] = f"Bearer {api_key}"
    penv.update(env or {})
    codelen = [sys.executable, "-m", "codelen.cli"]
    with ExitStack() as stack:
        procs = []
        worker_procs: list[subprocess.Popen] = []
        metrics_ports: list[int] = []
        if mode == "distributed":
            binary = shutil.which("redis-server")
            if binary is None:
                raise RuntimeError("redis-server is missing (apt-get install redis-server)")
            redis_dir = log_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="codelen-redis-")))
            redis_port = free_port()
            redis_cmd = [binary, "--port", str(redis_port), "--bind", HOST, "--save", "", "--appendonly", "no",
                         "--dir", str(redis_dir)]  # fmt: skip
            procs.append(stack.enter_context(process(redis_cmd, penv, redis_dir / "redis.log")))
            _wait_port(redis_port, timeout, procs)
            penv["REDIS_URL"] = f"redis://{HOST}:{redis_port}/0"
            for i in range(workers):
                cmd = [*codelen, "worker", "--models", worker_models or models, "--name", f"w{i}",
                       "--log-level", "warning"]  # fmt: skip
                if worker_metrics:
                    metrics_ports.append(free_port())
                    cmd += ["--metrics-port", str(metrics_ports[-1])]
                worker_procs.append(stack.enter_context(process(cmd, penv, log_dir and log_dir / f"worker-{i}.log")))
                procs.append(worker_procs[-1])
        port = free_port()
        url = f"http://{HOST}:{port}"
        serve = [*codelen, "serve", "--host", HOST, "--port", str(port), "--log-level", "warning"]
        api = stack.enter_context(process(serve, penv, log_dir and log_dir / f"api-{mode}.log"))
        procs.append(api)
        wait_ready(url, ready_path, headers=headers, timeout=timeout, procs=procs)
        if mode == "distributed":
            wait_ready(url, "/v1/models", headers=headers, timeout=timeout, until=_published, procs=procs)
        yield Service(
            url,
            port,
            api.pid,
            tuple(w.pid for w in worker_procs),
            tuple(metrics_ports),
            penv.get("REDIS_URL") if mode == "distributed" else None,
        )


def _published(answer: httpx.Response) -> bool:
    return answer.status_code == 200 and bool(answer.json()["models"])


def _wait_port(port: int, timeout: float, procs: Sequence[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"nothing listens on {HOST}:{port}") from None
            time.sleep(0.05)
