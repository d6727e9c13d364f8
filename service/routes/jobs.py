"""Jobs: many pairs or a whole matrix, with progress, results (JSON or JSON lines) and cancel."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from service.deps import backend_of, dataset, model_id, settings_of
from service.json_body import JSONBodyRoute
from service.problems import Problem, problem_schema
from service.schemas import JobRequest, JobStatus
from service.streaming import json_document, json_lines
from workers.jobs import JobSpec, PairSpec, matrix_pairs

router = APIRouter(tags=["jobs"], route_class=JSONBodyRoute)


def _spec(request: Request, body: JobRequest, raw: bytes) -> JobSpec:
    s = settings_of(request)
    if (body.pairs is None) == (body.matrix is None):
        raise Problem(422, "send exactly one of 'pairs' or 'matrix'")
    model = model_id(request, body.model)
    mode = body.conditioning
    fingerprint = hashlib.sha256(raw).hexdigest()
    if body.pairs is not None:
        if len(body.pairs) > s.max_pairs:
            raise Problem(413, f"{len(body.pairs)} pairs; at most {s.max_pairs} per job")
        ids = [p.id for p in body.pairs]
        if len(set(ids)) != len(ids):
            raise Problem(422, "pair ids must be unique within a job")
        pairs = [
            PairSpec(p.id, dataset(request, p.x, f"/pairs/{i}/x"), dataset(request, p.y, f"/pairs/{i}/y"))
            for i, p in enumerate(body.pairs)
        ]
        return JobSpec(model, pairs, fingerprint=fingerprint, mode=mode, direction=body.direction)
    assert body.matrix is not None
    if body.direction != "both":
        raise Problem(422, "/direction: a matrix needs both directions; use 'pairs' for C(Y|X) alone")
    entries = body.matrix.datasets
    if len(entries) > s.max_matrix_datasets:
        raise Problem(413, f"{len(entries)} datasets; at most {s.max_matrix_datasets} per matrix")
    ids = [d.id for d in entries]
    if len(set(ids)) != len(ids):
        raise Problem(422, "dataset ids must be unique within a matrix")
    data = [dataset(request, d.data, f"/matrix/datasets/{i}/data") for i, d in enumerate(entries)]
    return JobSpec(model, matrix_pairs(ids, data), matrix_ids=ids, fingerprint=fingerprint, mode=mode)


@router.post(
    "/v1/jobs",
    status_code=202,
    response_model=JobStatus,
    responses=problem_schema(404, 409, 413, 422, 429),
)
async def submit(
    body: JobRequest, request: Request, idempotency_key: str | None = Header(default=None, max_length=256)
) -> JSONResponse:
    # in a thread: a 500-dataset matrix is 125,250 pairs to build (~0.15 s the event loop would stall)
    spec = await asyncio.to_thread(_spec, request, body, await request.body())
    job = await backend_of(request).submit(spec, idempotency_key)  # Overloaded 429, JobConflict 409: problems.py
    return JSONResponse(job, status_code=202, headers={"Location": f"/v1/jobs/{job['id']}"})


async def _job_or_404(request: Request, job_id: str) -> dict:
    job = await backend_of(request).job(job_id)
    if job is None:
        raise Problem(404, f"no job {job_id!r} (unknown, or expired)")
    return job


@router.get("/v1/jobs/{job_id}", response_model=JobStatus, responses=problem_schema(404))
async def status(job_id: str, request: Request) -> dict:
    return await _job_or_404(request, job_id)


@router.get(
    "/v1/jobs/{job_id}/results",
    responses={
        200: {
            "description": "Finished results in pair order: JSON, or JSON lines with Accept: application/x-ndjson",
            "content": {"application/json": {}, "application/x-ndjson": {}},
        },
        **problem_schema(404),
    },
)
async def results(
    job_id: str,
    request: Request,
    include: Literal["all", "matrix"] = Query(
        "all", description="'matrix': only the N x N matrices of a matrix job, without its N(N+1)/2 pair rows"
    ),
) -> Response:
    found = await backend_of(request).results(job_id)
    if found is None:
        raise Problem(404, f"no job {job_id!r} (unknown, or expired)")
    job, rows, matrix = found
    if "application/x-ndjson" in request.headers.get("accept", ""):
        lines = json_lines(rows)
        return StreamingResponse(lines, media_type="application/x-ndjson", headers={"X-Job-Status": str(job["status"])})
    head = {**job, "complete": job["status"] == "succeeded"}
    doc = json_document(head, rows if include == "all" else None, matrix)
    return StreamingResponse(doc, media_type="application/json")


@router.delete("/v1/jobs/{job_id}", response_model=JobStatus, responses=problem_schema(404))
async def cancel(job_id: str, request: Request) -> dict:
    job = await backend_of(request).cancel(job_id)
    if job is None:
        raise Problem(404, f"no job {job_id!r} (unknown, or expired)")
    return job
