"""A typed client for API v1 (MISSION.md), sync (`Client`) and async (`AsyncClient`), on httpx.

One method per endpoint; errors come back as `CodelenError` carrying the problem+json fields.
Transient failures — connection errors, 5xx, 429 — are retried with exponential backoff and
jitter, and a `Retry-After` header is honoured. `POST /v1/jobs` always carries an
`Idempotency-Key` (a random one if the caller gives none), so a retried submission never makes a
second job. A 202 from `/v1/score` (the work took longer than the server waits) is followed by
polling the job, so `score()` always returns scores.

    with Client() as api:                     # CODELEN_URL, CODELEN_API_KEY or the defaults
        s = api.score("a text", ["a", "dataset"], model="zstd")
        print(s["ncd"], s["shared_information"])
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import os
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NotRequired, TypedDict

import httpx

import codelen

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "cancelled")
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})

Data = str | list[str]  # a dataset: one text, or a list of records


# -- response shapes (the JSON of API v1, as TypedDicts: plain dicts with known keys) -----------


class ModelRef(TypedDict):
    id: str
    revision: str


class CodeLengths(TypedDict):
    x: float
    y: float
    xy: float
    yx: float | None  # None with direction "y_given_x"


class Conditional(TypedDict):
    y_given_x: float
    x_given_y: float | None  # None with direction "y_given_x"


class XY(TypedDict):
    x: float
    y: float


class Scores(TypedDict):
    model: ModelRef
    bytes: dict[str, int]
    code_lengths: CodeLengths
    conditional: Conditional
    shared_information: float
    ncd: float
    bits_per_byte: XY
    window: dict[str, Any]
    conditioning: dict[str, Any]  # {"mode": ..., its parameters}; job rows: the mode only
    direction: Literal["both", "y_given_x"]


class ScoreResult(Scores):
    cached: bool


class PairResult(Scores):
    id: str


class Progress(TypedDict):
    done: int  # pairs
    total: int
    tokens_done: int  # tokens coded by the batches that ran the job's work (bytes for a classical model)
    tokens_total: int  # tokens of the work started so far (grows as batches start)


class JobStatus(TypedDict):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    model: str
    kind: Literal["pairs", "matrix"]
    conditioning: Literal["context", "memory", "adapt"]
    direction: Literal["both", "y_given_x"]
    progress: Progress
    created_at: float
    finished_at: float | None
    error: str | None


class MatrixDocument(TypedDict):
    ids: list[str]
    ncd: list[list[float]]
    shared_information: list[list[float]]
    code_lengths: list[float]


class JobResults(JobStatus):
    complete: bool
    results: list[PairResult]
    matrix: NotRequired[MatrixDocument]


class ModelEntry(TypedDict):
    id: str
    kind: Literal["lm", "classical"]
    revision: str
    context_tokens: int | None
    window: NotRequired[dict[str, Any] | None]
    description: NotRequired[str | None]
    convention: NotRequired[str | None]


class Readiness(TypedDict):
    status: str
    detail: str


class Pair(TypedDict):
    id: str
    x: Data
    y: Data


# -- errors -----------------------------------------------------------------------------------


class CodelenError(Exception):
    """An answer that is not the one asked for: the problem+json fields of the server's reply
    (RFC 9457), or `status=None` when no reply came (connection failed after every retry) or a
    job ended without results."""

    def __init__(
        self,
        status: int | None,
        title: str,
        detail: str,
        *,
        type: str = "about:blank",
        extra: Mapping[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status or ''} {title}: {detail}".strip())
        self.status, self.title, self.detail, self.type = status, title, detail, type
        self.extra = dict(extra or {})
        self.retry_after = retry_after

    @classmethod
    def from_response(cls, resp: httpx.Response) -> CodelenError:
        try:
            doc = resp.json()
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            return cls(resp.status_code, resp.reason_phrase or "Error", resp.text[:500], retry_after=retry_after(resp))
        known = {"type", "title", "status", "detail"}
        return cls(
            resp.status_code,
            str(doc.get("title") or resp.reason_phrase or "Error"),
            str(doc.get("detail") or ""),
            type=str(doc.get("type") or "about:blank"),
            extra={k: v for k, v in doc.items() if k not in known},
            retry_after=retry_after(resp),
        )


class JobFailed(CodelenError):
    """A job ended `failed` or `cancelled`; `job` is its last status."""

    def __init__(self, job: JobStatus) -> None:
        super().__init__(None, f"Job {job['status']}", job.get("error") or job["status"], extra={"job": job})
        self.job = job


def retry_after(resp: httpx.Response) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), or None."""
    value = resp.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: the n-th retry waits between half and all of
    min(max_backoff, backoff × 2ⁿ); a Retry-After is waited in full (up to max_retry_after)."""

    retries: int = 6
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_retry_after: float = 300.0

    def delay(self, attempt: int, after: float | None) -> float:
        if after is not None:
            return min(after, self.max_retry_after) + random.uniform(0, 0.1 + 0.1 * after)
        ceiling = min(self.max_backoff, self.backoff * 2**attempt)
        return ceiling / 2 + random.uniform(0, ceiling / 2)


# -- request bodies (shared by both clients; deterministic bytes, so a body hash names it) ----------


def encode_body(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def _options(doc: dict[str, Any], model: str | None, conditioning: str, direction: str = "both") -> bytes:
    """Only what differs from the defaults, so default requests keep their bytes (and keys)."""
    if model:
        doc["model"] = model
    if conditioning != "context":
        doc["conditioning"] = conditioning
    if direction != "both":
        doc["direction"] = direction
    return encode_body(doc)


def pairs_body(
    pairs: Iterable[Pair], model: str | None = None, *, conditioning: str = "context", direction: str = "both"
) -> bytes:
    """conditioning: "context", "memory" or "adapt"; direction "y_given_x": C(Y|X) only."""
    doc: dict[str, Any] = {"pairs": [{"id": p["id"], "x": p["x"], "y": p["y"]} for p in pairs]}
    return _options(doc, model, conditioning, direction)


def matrix_body(datasets: Mapping[str, Data], model: str | None = None, *, conditioning: str = "context") -> bytes:
    doc: dict[str, Any] = {"matrix": {"datasets": [{"id": k, "data": v} for k, v in datasets.items()]}}
    return _options(doc, model, conditioning)


def content_key(body: bytes, salt: str = "") -> str:
    """A deterministic Idempotency-Key for a request body: resending it returns the same job."""
    return "codelen-" + hashlib.sha256(body + salt.encode()).hexdigest()[:48]


def _score_from_job(results: JobResults) -> ScoreResult:
    if results["status"] != "succeeded" or not results["results"]:
        raise JobFailed(results)
    row: dict[str, Any] = dict(results["results"][0])
    row.pop("id", None)
    return {**row, "cached": False}  # type: ignore[typeddict-item]


RetryHook = Callable[[str, float], None]  # (what went wrong, seconds until the retry)
ProgressHook = Callable[[JobStatus], None]


class _Base:
    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        retry: RetryPolicy | None = None,
        poll_interval: float = 0.1,
        max_poll_interval: float = 2.0,
        on_retry: RetryHook | None = None,
    ) -> None:
        self.url = (url or os.environ.get("CODELEN_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("CODELEN_API_KEY", "")
        self.headers = {"User-Agent": f"codelen-client/{codelen.__version__}", "Accept": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        self.retry = retry or RetryPolicy()
        self.poll_interval, self.max_poll_interval = poll_interval, max_poll_interval
        self.on_retry = on_retry
        self.retries_made = 0  # how many requests were retried (for logs and tests)

    def _next_delay(self, attempt: int, resp: httpx.Response | None, exc: Exception | None) -> float | None:
        """Seconds to wait before retrying, or None to give up (the caller raises)."""
        if attempt >= self.retry.retries:
            return None
        if resp is not None and resp.status_code not in RETRY_STATUSES:
            return None
        after = retry_after(resp) if resp is not None else None
        delay = self.retry.delay(attempt, after)
        self.retries_made += 1
        if self.on_retry:
            why = f"HTTP {resp.status_code}" if resp is not None else f"{type(exc).__name__}: {exc}"
            self.on_retry(why, delay)
        return delay

    def _failure(self, resp: httpx.Response | None, exc: Exception | None) -> CodelenError:
        if resp is not None:
            return CodelenError.from_response(resp)
        return CodelenError(None, "Connection failed", f"{self.url}: {type(exc).__name__}: {exc}")

    def _poll_delays(self) -> Iterable[float]:
        delay = self.poll_interval
        while True:
            yield delay
            delay = min(self.max_poll_interval, delay * 1.5)


def _json_headers(idempotency_key: str | None = None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    return headers


def _score_request(
    x: Data, y: Data, model: str | None, conditioning: str = "context", direction: str = "both"
) -> bytes:
    return _options({"x": x, "y": y}, model, conditioning, direction)


def _ndjson(resp: httpx.Response) -> list[PairResult]:
    return [json.loads(line) for line in resp.text.splitlines() if line.strip()]


class Client(_Base):
    """Blocking client. Use as a context manager, or call close()."""

    def __init__(self, url: str | None = None, api_key: str | None = None, **kwargs: Any) -> None:
        transport = kwargs.pop("transport", None)
        super().__init__(url, api_key, **kwargs)
        self._http = httpx.Client(base_url=self.url, headers=self.headers, timeout=self.timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(
        self, method: str, path: str, *, content: bytes | None = None, headers: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> httpx.Response:
        """One API call with retries; a status outside `ok` raises CodelenError."""
        attempt = 0
        while True:
            resp: httpx.Response | None = None
            error: Exception | None = None
            try:
                resp = self._http.request(method, path, content=content, headers=headers)
                if resp.status_code in ok:
                    return resp
            except httpx.TransportError as exc:
                error = exc
            delay = self._next_delay(attempt, resp, error)
            if delay is None:
                raise self._failure(resp, error) from error
            attempt += 1
            time.sleep(delay)

    # scores
    def score(
        self,
        x: Data,
        y: Data,
        model: str | None = None,
        *,
        timeout: float | None = None,
        conditioning: str = "context",
        direction: str = "both",
        on_progress: ProgressHook | None = None,
    ) -> ScoreResult:
        """conditioning: "context", "memory" or "adapt"; direction "y_given_x": C(Y|X) only.
        A pair not done within the server's wait becomes a job: `on_progress` hears its status."""
        body = _score_request(x, y, model, conditioning, direction)
        resp = self.request("POST", "/v1/score", content=body, headers=_json_headers(), ok=(200, 202))
        if resp.status_code == 200:
            return resp.json()
        job_id = resp.json()["id"]
        self.wait(job_id, timeout=timeout, on_progress=on_progress)
        return _score_from_job(self.results(job_id))

    # jobs
    def submit(self, body: bytes, idempotency_key: str | None = None) -> JobStatus:
        """POST /v1/jobs with a ready body (see pairs_body / matrix_body)."""
        key = idempotency_key or f"codelen-{uuid.uuid4().hex}"
        return self.request("POST", "/v1/jobs", content=body, headers=_json_headers(key), ok=(202,)).json()

    def submit_pairs(
        self,
        pairs: Iterable[Pair],
        model: str | None = None,
        *,
        idempotency_key: str | None = None,
        conditioning: str = "context",
        direction: str = "both",
    ) -> JobStatus:
        body = pairs_body(pairs, model, conditioning=conditioning, direction=direction)
        return self.submit(body, idempotency_key)

    def submit_matrix(
        self,
        datasets: Mapping[str, Data],
        model: str | None = None,
        *,
        idempotency_key: str | None = None,
        conditioning: str = "context",
    ) -> JobStatus:
        return self.submit(matrix_body(datasets, model, conditioning=conditioning), idempotency_key)

    def job(self, job_id: str) -> JobStatus:
        return self.request("GET", f"/v1/jobs/{job_id}").json()

    def results(self, job_id: str, include: str = "all") -> JobResults:
        """include="matrix": a matrix job's matrices without its pair rows."""
        return self.request("GET", f"/v1/jobs/{job_id}/results?include={include}").json()

    def results_ndjson(self, job_id: str) -> list[PairResult]:
        resp = self.request("GET", f"/v1/jobs/{job_id}/results", headers={"Accept": "application/x-ndjson"})
        return _ndjson(resp)

    def cancel(self, job_id: str) -> JobStatus:
        return self.request("DELETE", f"/v1/jobs/{job_id}").json()

    def wait(self, job_id: str, *, timeout: float | None = None, on_progress: ProgressHook | None = None) -> JobStatus:
        """Poll until the job is finished; raises JobFailed unless it succeeded."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for delay in self._poll_delays():
            job = self.job(job_id)
            if on_progress:
                on_progress(job)
            if job["status"] in TERMINAL:
                if job["status"] != "succeeded":
                    raise JobFailed(job)
                return job
            if deadline is not None and time.monotonic() + delay > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout} s")
            time.sleep(delay)
        raise AssertionError("unreachable")

    # system
    def models(self) -> list[ModelEntry]:
        return self.request("GET", "/v1/models").json()["models"]

    def healthz(self) -> dict[str, Any]:
        return self.request("GET", "/healthz").json()

    def readyz(self) -> Readiness:
        """200 ready or 503 not ready (both answered, not raised)."""
        return self.request("GET", "/readyz", ok=(200, 503)).json()

    def metrics(self) -> str:
        return self.request("GET", "/metrics").text


class AsyncClient(_Base):
    """The same API for asyncio. Use `async with AsyncClient() as api:`, or await aclose()."""

    def __init__(self, url: str | None = None, api_key: str | None = None, **kwargs: Any) -> None:
        transport = kwargs.pop("transport", None)
        limits = kwargs.pop("limits", httpx.Limits(max_connections=64, max_keepalive_connections=16))
        super().__init__(url, api_key, **kwargs)
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=self.headers, timeout=self.timeout, transport=transport, limits=limits
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(
        self, method: str, path: str, *, content: bytes | None = None, headers: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> httpx.Response:
        attempt = 0
        while True:
            resp: httpx.Response | None = None
            error: Exception | None = None
            try:
                resp = await self._http.request(method, path, content=content, headers=headers)
                if resp.status_code in ok:
                    return resp
            except httpx.TransportError as exc:
                error = exc
            delay = self._next_delay(attempt, resp, error)
            if delay is None:
                raise self._failure(resp, error) from error
            attempt += 1
            await asyncio.sleep(delay)

    async def score(
        self,
        x: Data,
        y: Data,
        model: str | None = None,
        *,
        timeout: float | None = None,
        conditioning: str = "context",
        direction: str = "both",
        on_progress: ProgressHook | None = None,
    ) -> ScoreResult:
        body = _score_request(x, y, model, conditioning, direction)
        resp = await self.request("POST", "/v1/score", content=body, headers=_json_headers(), ok=(200, 202))
        if resp.status_code == 200:
            return resp.json()
        job_id = resp.json()["id"]
        await self.wait(job_id, timeout=timeout, on_progress=on_progress)
        return _score_from_job(await self.results(job_id))

    async def submit(self, body: bytes, idempotency_key: str | None = None) -> JobStatus:
        key = idempotency_key or f"codelen-{uuid.uuid4().hex}"
        return (await self.request("POST", "/v1/jobs", content=body, headers=_json_headers(key), ok=(202,))).json()

    async def submit_pairs(
        self,
        pairs: Iterable[Pair],
        model: str | None = None,
        *,
        idempotency_key: str | None = None,
        conditioning: str = "context",
        direction: str = "both",
    ) -> JobStatus:
        body = pairs_body(pairs, model, conditioning=conditioning, direction=direction)
        return await self.submit(body, idempotency_key)

    async def submit_matrix(
        self,
        datasets: Mapping[str, Data],
        model: str | None = None,
        *,
        idempotency_key: str | None = None,
        conditioning: str = "context",
    ) -> JobStatus:
        return await self.submit(matrix_body(datasets, model, conditioning=conditioning), idempotency_key)

    async def job(self, job_id: str) -> JobStatus:
        return (await self.request("GET", f"/v1/jobs/{job_id}")).json()

    async def results(self, job_id: str, include: str = "all") -> JobResults:
        return (await self.request("GET", f"/v1/jobs/{job_id}/results?include={include}")).json()

    async def results_ndjson(self, job_id: str) -> list[PairResult]:
        resp = await self.request("GET", f"/v1/jobs/{job_id}/results", headers={"Accept": "application/x-ndjson"})
        return _ndjson(resp)

    async def cancel(self, job_id: str) -> JobStatus:
        return (await self.request("DELETE", f"/v1/jobs/{job_id}")).json()

    async def wait(
        self, job_id: str, *, timeout: float | None = None, on_progress: ProgressHook | None = None
    ) -> JobStatus:
        deadline = None if timeout is None else time.monotonic() + timeout
        for delay in self._poll_delays():
            job = await self.job(job_id)
            if on_progress:
                on_progress(job)
            if job["status"] in TERMINAL:
                if job["status"] != "succeeded":
                    raise JobFailed(job)
                return job
            if deadline is not None and time.monotonic() + delay > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout} s")
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def models(self) -> list[ModelEntry]:
        return (await self.request("GET", "/v1/models")).json()["models"]

    async def healthz(self) -> dict[str, Any]:
        return (await self.request("GET", "/healthz")).json()

    async def readyz(self) -> Readiness:
        return (await self.request("GET", "/readyz", ok=(200, 503))).json()

    async def metrics(self) -> str:
        return (await self.request("GET", "/metrics")).text
