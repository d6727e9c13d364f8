"""Models, health, readiness and metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from models.registry import ModelUnavailable
from service.deps import backend_of
from service.schemas import ModelList

router = APIRouter(tags=["system"])


@router.get("/v1/models", response_model=ModelList)
async def models(request: Request) -> dict:
    backend = backend_of(request)
    ids = request.app.state.registry.ids()
    infos = await asyncio.gather(*(backend.model_info(m) for m in ids), return_exceptions=True)
    for i in infos:  # distributed mode: a model no worker has published yet is left out
        if isinstance(i, BaseException) and not isinstance(i, ModelUnavailable):
            raise i
    return {"models": [i.as_dict() for i in infos if not isinstance(i, BaseException)]}


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    ok, detail = await backend_of(request).ready()
    return JSONResponse({"status": "ready" if ok else "not ready", "detail": detail}, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    backend = backend_of(request)
    request.app.state.metrics.queue_depth.set(backend.queue_depth())
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")
