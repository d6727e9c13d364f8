"""What every route needs: the backend, the settings, and input turned into checked datasets."""

from __future__ import annotations

from fastapi import Request

from codelen.datasets import Dataset, DatasetError, canonical
from codelen.settings import Settings
from models.registry import UnknownModel
from service.problems import Problem
from workers.backend import Backend


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


def backend_of(request: Request) -> Backend:
    return request.app.state.backend


def model_id(request: Request, requested: str | None) -> str:
    model = requested or settings_of(request).default_model
    try:
        request.app.state.registry.check(model)
    except UnknownModel:
        available = ", ".join(request.app.state.registry.ids())
        raise Problem(404, f"unknown model {model!r}; available: {available}") from None
    return model


def dataset(request: Request, value: str | list[str], pointer: str) -> Dataset:
    s = settings_of(request)
    try:
        return canonical(
            value,
            max_record_bytes=s.max_record_bytes,
            max_records=s.max_records,
            max_bytes=s.max_dataset_bytes,
            pointer=pointer,
        )
    except DatasetError as exc:
        raise Problem(413 if exc.too_large else 422, f"{exc.pointer or '/'}: {exc}", pointer=exc.pointer) from None
