"""Classifiers: create from labeled examples, predict labels of texts, inspect, delete. Fits and
predictions are jobs of /v1/jobs (serving.py)."""

from __future__ import annotations

import hashlib

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from service.classifiers.protocol import (
    ClassifierInfo,
    ClassifierPending,
    ClassifierRequest,
    PredictionJob,
    PredictRequest,
    PredictResponse,
)
from service.classifiers.serving import (
    Cancelled,
    ClassifierService,
    Invalid,
    NotFound,
    Pending,
    TooLarge,
    public,
)
from service.json_body import JSONBodyRoute
from service.problems import Problem, problem_schema

router = APIRouter(tags=["classifiers"], route_class=JSONBodyRoute)
IdempotencyKey = Header(default=None, max_length=256)


def _service(request: Request) -> ClassifierService:
    return request.app.state.classifiers


async def _call(request: Request, coro):
    """The feature's own exceptions as problems; the layers' (unknown model, queue full, reused
    Idempotency-Key, Redis down) pass to service/problems.py."""
    try:
        return await coro
    except NotFound as exc:
        raise Problem(404, str(exc)) from None
    except TooLarge as exc:
        raise Problem(413, str(exc)) from None
    except Invalid as exc:
        raise Problem(422, str(exc), pointer=exc.pointer) from None
    except Cancelled as exc:
        raise Problem(409, str(exc)) from None


def _accepted(pending: Pending, location: str) -> JSONResponse:
    return JSONResponse(pending.body, status_code=202, headers={"Location": location})


@router.post(
    "/v1/classifiers",
    status_code=201,
    response_model=ClassifierInfo,
    responses={202: {"model": ClassifierPending}, **problem_schema(404, 409, 413, 422, 429, 503)},
)
async def create(
    body: ClassifierRequest, request: Request, idempotency_key: str | None = IdempotencyKey
) -> JSONResponse:
    """201 with the classifier once its fit job succeeded (within CODELEN_SCORE_WAIT_S), else 202
    with it (`status` fitting) and the job; `Idempotency-Key`: the same key, the same classifier."""
    examples = [e.model_dump() for e in body.examples]
    fingerprint = hashlib.sha256(await request.body()).hexdigest()
    service = _service(request)
    try:
        info = await _call(
            request,
            service.create(
                body.model,
                body.method,
                examples,
                body.options,
                fingerprint=fingerprint,
                idempotency_key=idempotency_key,
            ),
        )
    except Pending as pending:
        return _accepted(pending, f"/v1/classifiers/{pending.body['id']}")
    return JSONResponse(info, status_code=201, headers={"Location": f"/v1/classifiers/{info['id']}"})


@router.get("/v1/classifiers/{classifier_id}", response_model=ClassifierInfo, responses=problem_schema(404))
async def get(classifier_id: str, request: Request) -> JSONResponse:
    return JSONResponse(public(await _call(request, _service(request).get(classifier_id))))


@router.post(
    "/v1/classifiers/{classifier_id}/predict",
    response_model=PredictResponse,
    responses={202: {"description": "the prediction job, still running"}, **problem_schema(404, 409, 413, 422, 429)},
)
async def predict(classifier_id: str, body: PredictRequest, request: Request) -> JSONResponse:
    """The predictions, once their job finished within CODELEN_SCORE_WAIT_S; else 202 with the job."""
    try:
        return JSONResponse(await _call(request, _service(request).predict(classifier_id, body.texts)))
    except Pending as pending:
        return _accepted(pending, f"/v1/jobs/{pending.job['id']}")


@router.post(
    "/v1/classifiers/{classifier_id}/predictions",
    status_code=202,
    response_model=PredictionJob,
    responses=problem_schema(404, 409, 413, 422, 429),
)
async def submit_prediction(
    classifier_id: str, body: PredictRequest, request: Request, idempotency_key: str | None = IdempotencyKey
) -> JSONResponse:
    """Predict many texts as a job: 202 now; poll the Location (this shape) or /v1/jobs/{id}
    (progress, results as JSON or JSON lines, DELETE cancels)."""
    job = await _call(request, _service(request).submit_prediction(classifier_id, body.texts, idempotency_key))
    location = f"/v1/classifiers/{classifier_id}/predictions/{job['id']}"
    related = f'</v1/jobs/{job["id"]}>; rel="related"'
    return JSONResponse(job, status_code=202, headers={"Location": location, "Link": related})


@router.get(
    "/v1/classifiers/{classifier_id}/predictions/{job_id}",
    response_model=PredictionJob,
    responses=problem_schema(404),
)
async def get_prediction(classifier_id: str, job_id: str, request: Request) -> JSONResponse:
    # a plain JSONResponse: `error` and `predictions` appear only when they apply
    return JSONResponse(await _call(request, _service(request).get_prediction(classifier_id, job_id)))


@router.delete("/v1/classifiers/{classifier_id}", response_model=ClassifierInfo, responses=problem_schema(404))
async def delete(classifier_id: str, request: Request) -> JSONResponse:
    return JSONResponse(await _call(request, _service(request).delete(classifier_id)))
