"""One pure-ASGI middleware in front of the app: API keys, rate limit, body limits, JSON that
would crash a parser, and request metrics. It runs before routing, so a rejected request
never reaches the queue."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from codelen.metrics import Metrics
from codelen.settings import Settings
from service.fastpath import cached_score
from service.json_body import PARSED, expansion_estimate, is_json, parse
from service.problems import problem_body
from service.ratelimit import bucket_for

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = {"/healthz"}
ROUTE_KEY = "codelen.route"  # scope key naming the route for metrics when the fast path answered


class Gatekeeper:
    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics
        self.keys = settings.api_key_digests()
        self.bucket = bucket_for(settings.redis_url, settings.rate_limit_per_s, settings.rate_limit_burst)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] == "HEAD":  # answered as GET, without the body (RFC 9110 9.3.2)
            scope, send = {**scope, "method": "GET"}, _without_body(send)
        started = time.perf_counter()
        status: int | None = None  # the status sent; none sent and the client gone: 499 (client closed)
        client_gone = False

        async def receive_wrapper() -> Message:
            nonlocal client_gone
            message = await receive()
            if message["type"] == "http.disconnect" and status is None:
                client_gone = True
            return message

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive_wrapper, send_wrapper)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or scope.get(ROUTE_KEY, "unmatched")
            label = "499" if client_gone else str(status or 500)
            self.metrics.requests.labels(name, label).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - started)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.keys and scope["path"] not in OPEN_PATHS:
            auth = headers.get("authorization", "")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            digest = hashlib.sha256(token.encode()).hexdigest() if token else ""
            if digest not in self.keys:
                detail = "a valid API key is required: send 'Authorization: Bearer <key>'"
                return await _reply(send, 401, detail, {"www-authenticate": "Bearer"})
            if self.bucket is not None:
                wait = await self.bucket.take(digest)
                if wait > 0:
                    retry = str(max(1, round(wait + 0.5)))
                    return await _reply(send, 429, "rate limit for this API key exceeded", {"retry-after": retry})

        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)

        limit = self.settings.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _reply(send, 413, f"request body of {declared} bytes; at most {limit}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                return await _reply(send, 413, f"request body over {limit} bytes")
            chunks.append(body)
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        if raw and is_json(headers.get("content-type")):
            bound = self.settings.max_body_expansion_bytes
            if (estimate := expansion_estimate(raw, bound)) > bound:
                detail = f"this body would take about {estimate >> 20} MiB once parsed; at most {bound >> 20} MiB"
                return await _reply(send, 413, detail)
            try:
                parsed = parse(raw)
            except RecursionError:
                return await _reply(send, 422, "JSON nested too deeply")
            scope[PARSED] = parsed  # the route takes this document (JSONBodyRoute): one parse per body
            fast = self.settings.score_fast_path and scope["path"] == "/v1/score" and scope["method"] == "POST"
            if fast and parsed.error is None:
                answer = await cached_score(scope["app"].state, parsed.doc)
                if answer is not None:
                    scope[ROUTE_KEY] = "/v1/score"
                    return await _send_json(send, answer)

        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _without_body(send: Send) -> Send:
    async def send_headers_only(message: Message) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return send_headers_only


async def _send_json(send: Send, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _reply(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = problem_body(status, detail)
    raw_headers = [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})
