"""Every error is application/problem+json (RFC 9457): type, title, status, detail, and extras.

The one place where exceptions become HTTP problems: routes raise `Problem` for what they check
themselves and let the exceptions of the layers below (datasets, models, jobs, the backends)
through; `install` maps each of those to its status, detail and headers.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

from codelen.datasets import DatasetError
from codelen.keys import UnknownId
from codelen.model_info import UnsupportedMode
from models.registry import ModelUnavailable, UnknownModel
from workers.jobs import JobConflict, Overloaded, TaskFailed, TooLarge, Unavailable

log = logging.getLogger("codelen.service")

TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Content too large",
    415: "Unsupported media type",
    422: "Unprocessable content",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}


class Problem(Exception):
    def __init__(self, status: int, detail: str, *, headers: dict[str, str] | None = None, **extra: object) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers, self.extra = status, detail, headers or {}, extra


def problem_body(status: int, detail: str, **extra: object) -> bytes:
    doc = {"type": "about:blank", "title": TITLES.get(status, "Error"), "status": status, "detail": detail, **extra}
    return json.dumps(doc, default=str).encode()


def problem_response(status: int, detail: str, headers: dict[str, str] | None = None, **extra: object) -> Response:
    return Response(
        problem_body(status, detail, **extra), status, headers=headers, media_type="application/problem+json"
    )


def problem_schema(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI `responses` entries for the problems a route can answer."""
    doc = {
        "content": {
            "application/problem+json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                    },
                }
            }
        }
    }
    return {s: {"description": TITLES.get(s, "Error"), **doc} for s in statuses}


def _validation_errors(exc: RequestValidationError) -> list[dict[str, object]]:
    out = []
    for e in exc.errors():
        loc = [str(p) for p in e.get("loc", ())]
        out.append(
            {"pointer": "/" + "/".join(loc[1:] if loc and loc[0] == "body" else loc), "message": e.get("msg", "")}
        )
    return out[:20]


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(_: Request, exc: Problem) -> Response:
        return problem_response(exc.status, exc.detail, exc.headers, **exc.extra)

    # The layers' exceptions, by status.
    @app.exception_handler(UnknownModel)
    async def _unknown_model(request: Request, exc: UnknownModel) -> Response:
        available = ", ".join(request.app.state.registry.ids())
        return problem_response(404, f"unknown model {exc.args[0]!r}; available: {available}")

    @app.exception_handler(UnknownId)
    async def _unknown_id(_: Request, exc: UnknownId) -> Response:
        return problem_response(404, str(exc))

    @app.exception_handler(JobConflict)
    async def _job_conflict(_: Request, exc: JobConflict) -> Response:
        return problem_response(409, str(exc))

    @app.exception_handler(DatasetError)
    async def _dataset(_: Request, exc: DatasetError) -> Response:
        return problem_response(413 if exc.too_large else 422, f"{exc.pointer or '/'}: {exc}", pointer=exc.pointer)

    @app.exception_handler(TooLarge)
    async def _too_large(_: Request, exc: TooLarge) -> Response:
        return problem_response(413, str(exc))

    @app.exception_handler(UnsupportedMode)
    async def _unsupported_mode(_: Request, exc: UnsupportedMode) -> Response:
        return problem_response(422, f"/conditioning: {exc}", pointer="/conditioning")

    @app.exception_handler(TaskFailed)
    async def _task_failed(_: Request, exc: TaskFailed) -> Response:
        return problem_response(422, str(exc))  # e.g. a text the tokenizer cannot code losslessly

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded) -> Response:
        retry = str(request.app.state.settings.retry_after_s)
        return problem_response(429, f"overloaded: {exc}", {"Retry-After": retry})

    @app.exception_handler(ModelUnavailable)
    async def _unavailable(_: Request, exc: ModelUnavailable) -> Response:
        return problem_response(503, str(exc), {"Retry-After": "30"})

    @app.exception_handler(Unavailable)
    async def _backend_unavailable(request: Request, exc: Unavailable) -> Response:
        return problem_response(503, str(exc), {"Retry-After": str(request.app.state.settings.retry_after_s)})

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    async def _redis_down(request: Request, exc: Exception) -> Response:
        # e.g. the classifier store: its client retries, and past the retries the answer is "later", not 500
        log.warning("Redis unreachable: %s", exc)
        retry = str(request.app.state.settings.retry_after_s)
        return problem_response(503, "Redis is unreachable; retry later", {"Retry-After": retry})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Response:
        errors = _validation_errors(exc)
        detail = "; ".join(f"{e['pointer']}: {e['message']}" for e in errors[:3]) or "invalid request"
        return problem_response(422, detail, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # Starlette names only the first route's methods; a path has several
            headers["Allow"] = ", ".join(allowed_methods(request))
        return problem_response(exc.status_code, str(exc.detail), headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error")  # the log names the exception; the client learns nothing internal
        return problem_response(500, "internal error; the request can be retried")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the request's path answers (HEAD wherever GET is: the gate answers it)."""
    routes = request.app.router.routes
    methods = set()
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in routes):
            methods.add(method)
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)
