"""The FastAPI app: routers over a backend chosen by the settings (embedded or Redis)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

import codelen
from codelen.metrics import Metrics
from codelen.settings import Settings, get_settings
from models.registry import Registry
from service import openapi, problems
from service.classifiers import router as classifiers
from service.classifiers.serving import ClassifierService
from service.classifiers.store import store_for
from service.middleware import Gatekeeper
from service.routes import jobs, scores, system
from workers.backend import Backend

log = logging.getLogger("codelen.service")


def build_backend(settings: Settings, registry: Registry, metrics: Metrics) -> Backend:
    if settings.redis_url:
        from workers.redis_backend import RedisBackend

        return RedisBackend(settings, registry, metrics)
    from workers.embedded import EmbeddedBackend

    return EmbeddedBackend(settings, registry, metrics)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = Metrics()
    registry = Registry(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        backend = build_backend(settings, registry, metrics)
        app.state.backend = backend
        app.state.classifiers = ClassifierService(settings, registry, backend, store_for(settings))
        await backend.start()
        preload = asyncio.create_task(_preload(registry, settings))
        yield
        preload.cancel()
        await backend.stop()
        await app.state.classifiers.store.close()

    app = FastAPI(
        title="codelen",
        version=codelen.__version__,
        summary="How much two datasets share, measured by compressing them with a language model.",
        lifespan=lifespan,
    )
    app.state.settings, app.state.metrics, app.state.registry = settings, metrics, registry
    problems.install(app)
    for module in (scores, jobs, classifiers, system):
        app.include_router(module.router)
    app.add_middleware(Gatekeeper, settings=settings, metrics=metrics)
    openapi.install(app, settings)
    return app


async def _preload(registry: Registry, settings: Settings) -> None:
    if settings.redis_url:
        return  # distributed mode: the workers load the models, the API only reads what they publish
    for model_id in settings.preload_ids():
        try:
            await asyncio.to_thread(registry.get, model_id)
            log.info("loaded %s", model_id)
        except Exception:
            log.exception("could not load %s", model_id)
