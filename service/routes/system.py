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
    # which models this process holds: none in distributed mode, where only the workers load them
    held = request.app.state.registry.loaded_ids()
    doc = {"status": "ready" if ok else "not ready", "detail": detail, "models_loaded": held}
    return JSONResponse(doc, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    backend = backend_of(request)
    metrics = request.app.state.metrics
    metrics.queue_depth.set(backend.queue_depth())
    for model_id in request.app.state.registry.ids():
        metrics.models_loaded.labels(model_id).set(int(request.app.state.registry.loaded(model_id)))
    return Response(metrics.render(), media_type="text/plain; version=0.0.4")
