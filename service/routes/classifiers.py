"""Classifiers: create from labeled examples, predict labels of texts, inspect, delete."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from classify.schemas import ClassifierInfo, ClassifierRequest, PredictionJob, PredictRequest, PredictResponse
from classify.serving import ClassifierService, Invalid, NotFound, TooLarge, UnknownModel, public
from service.json_body import JSONBodyRoute
from service.problems import Problem, problem_schema

router = APIRouter(tags=["classifiers"], route_class=JSONBodyRoute)


def _service(request: Request) -> ClassifierService:
    return request.app.state.classifiers


async def _call(request: Request, coro):
    try:
        return await coro
    except NotFound as exc:
        raise Problem(404, str(exc)) from None
    except UnknownModel as exc:
        available = ", ".join(request.app.state.registry.ids())
        raise Problem(404, f"unknown model {exc.args[0]!r}; available: {available}") from None
    except TooLarge as exc:
        raise Problem(413, str(exc)) from None
    except Invalid as exc:
        raise Problem(422, str(exc), pointer=exc.pointer) from None


@router.post("/v1/classifiers", status_code=201, response_model=ClassifierInfo, responses=problem_schema(404, 413, 422))
async def create(body: ClassifierRequest, request: Request) -> JSONResponse:
    examples = [e.model_dump() for e in body.examples]
    info = await _call(request, _service(request).create(body.model, body.method, examples, body.options))
    return JSONResponse(info, status_code=201, headers={"Location": f"/v1/classifiers/{info['id']}"})


@router.get("/v1/classifiers/{classifier_id}", response_model=ClassifierInfo, responses=problem_schema(404))
async def get(classifier_id: str, request: Request) -> dict:
    return public(await _call(request, _service(request).get(classifier_id)))


@router.post(
    "/v1/classifiers/{classifier_id}/predict", response_model=PredictResponse, responses=problem_schema(404, 413, 422)
)
async def predict(classifier_id: str, body: PredictRequest, request: Request) -> dict:
    return await _call(request, _service(request).predict(classifier_id, body.texts))


@router.post(
    "/v1/classifiers/{classifier_id}/predictions",
    status_code=202,
    response_model=PredictionJob,
    responses=problem_schema(404, 413, 422),
)
async def submit_prediction(classifier_id: str, body: PredictRequest, request: Request) -> JSONResponse:
    """Predict many texts as a job: 202 now, then poll the Location until succeeded or failed."""
    job = await _call(request, _service(request).submit_prediction(classifier_id, body.texts))
    location = f"/v1/classifiers/{classifier_id}/predictions/{job['id']}"
    return JSONResponse(job, status_code=202, headers={"Location": location})


@router.get(
    "/v1/classifiers/{classifier_id}/predictions/{job_id}",
    response_model=PredictionJob,
    responses=problem_schema(404),
)
async def get_prediction(classifier_id: str, job_id: str, request: Request) -> JSONResponse:
    # a plain JSONResponse: `error` and `predictions` appear only when they apply
    return JSONResponse(await _call(request, _service(request).get_prediction(classifier_id, job_id)))


@router.delete("/v1/classifiers/{classifier_id}", response_model=ClassifierInfo, responses=problem_schema(404))
async def delete(classifier_id: str, request: Request) -> dict:
    return await _call(request, _service(request).delete(classifier_id))
