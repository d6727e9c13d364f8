"""The OpenAPI document, made true to what the service sends, in one place.

FastAPI documents the routes' own answers; what the gate, the body parser and the exception
handlers add is documented here: problem+json for 400 (malformed JSON), 401 and the bearer scheme
(when API keys are configured), 413/415 (bodies), 422 (also on path and query parameters: FastAPI
would say application/json), 429 (rate limit), 503 (Redis or a model unavailable); `/readyz`'s
503, `/metrics` as Prometheus text. `tests/test_fuzz.py` holds the service to this document.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from codelen.settings import Settings
from service.middleware import OPEN_PATHS
from service.problems import TITLES

PROBLEM = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
    },
}
READINESS = {
    "type": "object",
    "required": ["status", "detail"],
    "properties": {"status": {"type": "string", "enum": ["ready", "not ready"]}, "detail": {"type": "string"}},
}
HEALTH = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string", "enum": ["ok"]}}}


def _problem(status: int, description: str | None = None) -> dict[str, Any]:
    return {
        "description": description or TITLES.get(status, "Error"),
        "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


def document(app: FastAPI, settings: Settings) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Problem"] = PROBLEM
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    components["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "an API key, when CODELEN_API_KEYS is set"}
    }
    keys = bool(settings.api_key_digests())
    for path, operations in doc["paths"].items():
        for operation in operations.values():
            responses: dict[str, Any] = operation["responses"]
            for status, answer in responses.items():  # the route's own problems: one shared schema
                if "application/problem+json" in answer.get("content", {}):
                    responses[status] = _problem(int(status), answer.get("description"))
            if operation.get("parameters") or "requestBody" in operation:
                responses["422"] = _problem(422, "Invalid input")
            if "requestBody" in operation:
                responses["400"] = _problem(400, "The body is not JSON (or not UTF-8)")
                responses["413"] = _problem(413, "The body is too large, or would be once parsed")
                responses["415"] = _problem(415, "The body is not application/json")
            if path not in OPEN_PATHS and keys:
                operation["security"] = [{"bearer": []}]
                responses["401"] = _problem(401, "A valid API key is required")
                if settings.rate_limit_per_s > 0:
                    responses["429"] = _problem(429, "Rate limit for this API key exceeded; see Retry-After")
            if path.startswith("/v1/"):
                responses["503"] = _problem(503, "Redis or the model is unavailable; see Retry-After")
    _system(doc["paths"])
    return doc


def _system(paths: dict[str, Any]) -> None:
    json_of = lambda schema: {"application/json": {"schema": schema}}  # noqa: E731
    paths["/healthz"]["get"]["responses"]["200"]["content"] = json_of(HEALTH)
    ready = paths["/readyz"]["get"]["responses"]
    ready["200"]["content"] = json_of(READINESS)
    ready["503"] = {"description": "Not ready (the detail says why)", "content": json_of(READINESS)}
    metrics = paths["/metrics"]["get"]["responses"]
    metrics["200"] = {
        "description": "Prometheus text exposition",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }


def install(app: FastAPI, settings: Settings) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(app, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
