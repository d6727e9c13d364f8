"""Cached /v1/score answered before routing: the hot path of a cache in front of a GPU fleet.

The Gatekeeper has already read and parsed the body (for its limits); when it is a well-formed
score request whose code lengths (four, three for `direction: y_given_x`) are all cached, the
answer is built here, skipping FastAPI's routing, validation and response machinery (about half
the CPU time of a cached answer). Anything else (a miss, a malformed or unusual body, an unknown
model, any error) returns None and the request takes the normal route, which gives the same
answer or the proper problem+json. The document is the same bytes the route would send
(`score_document` rendered by JSONResponse).
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from codelen.datasets import canonical
from codelen.model_info import MODES
from codelen.scores import score_document

FIELDS = {"x", "y", "model", "conditioning", "direction"}
DIRECTIONS = ("both", "y_given_x")


def _dataset_like(value: object) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(r, str) for r in value))


async def cached_score(state: Any, doc: object) -> bytes | None:
    """The JSON body of a 200 answer if `doc` is a score request answered from the cache."""
    if not isinstance(doc, dict) or not {"x", "y"} <= doc.keys() <= FIELDS:
        return None
    x, y, model = doc["x"], doc["y"], doc.get("model")
    if not (_dataset_like(x) and _dataset_like(y)) or not (model is None or isinstance(model, str)):
        return None
    mode, direction = doc.get("conditioning", "context"), doc.get("direction", "both")
    if mode not in MODES or direction not in DIRECTIONS:
        return None
    s = state.settings
    model = model or s.default_model
    if model not in state.registry.ids():
        return None
    try:
        limits = dict(max_record_bytes=s.max_record_bytes, max_records=s.max_records, max_bytes=s.max_dataset_bytes)
        dx, dy = canonical(x, **limits), canonical(y, **limits)
        lengths = await state.backend.lookup(model, dx, dy, mode, direction)
        if lengths is None:
            return None
        info = await state.backend.model_info(model, mode)
    except Exception:  # DatasetError, Redis down...: the normal route answers (and reports) it
        return None
    return JSONResponse(score_document(info, dx, dy, lengths, cached=True)).body
