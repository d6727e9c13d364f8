"""POST /v1/score: one pair, answered at once from the cache or after the work, else a job."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from codelen.scores import score_document
from service.deps import backend_of, dataset, model_id, settings_of
from service.json_body import JSONBodyRoute
from service.problems import problem_schema
from service.schemas import JobStatus, ScoreRequest, ScoreResponse

router = APIRouter(tags=["scores"], route_class=JSONBodyRoute)


@router.post(
    "/v1/score",
    response_model=ScoreResponse,
    responses={
        202: {"model": JobStatus, "description": "Not done within the wait: poll the job"},
        **problem_schema(404, 413, 422, 429),
    },
)
async def score(body: ScoreRequest, request: Request) -> JSONResponse:
    model = model_id(request, body.model)
    x = dataset(request, body.x, "/x")
    y = dataset(request, body.y, "/y")
    backend = backend_of(request)
    wait = settings_of(request).score_wait_s
    # Overloaded (429), a text that cannot be coded (TaskFailed, 422), ...: service/problems.py
    lengths, cached, job = await backend.score(model, x, y, wait, body.conditioning, body.direction)
    if job is not None:
        return JSONResponse(job, status_code=202, headers={"Location": f"/v1/jobs/{job['id']}"})
    info = await backend.model_info(model, body.conditioning)
    return JSONResponse(score_document(info, x, y, lengths, cached))
