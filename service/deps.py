"""What every route needs: the backend, the settings, and input turned into checked datasets.
An unknown model (UnknownModel) or a dataset past the limits (DatasetError) becomes its problem
in service/problems.py."""

from __future__ import annotations

from fastapi import Request

from codelen.datasets import Dataset, canonical
from codelen.settings import Settings
from workers.backend import Backend


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


def backend_of(request: Request) -> Backend:
    return request.app.state.backend


def model_id(request: Request, requested: str | None) -> str:
    model = requested or settings_of(request).default_model
    request.app.state.registry.check(model)
    return model


def dataset(request: Request, value: str | list[str], pointer: str) -> Dataset:
    s = settings_of(request)
    return canonical(
        value,
        max_record_bytes=s.max_record_bytes,
        max_records=s.max_records,
        max_bytes=s.max_dataset_bytes,
        pointer=pointer,
    )
