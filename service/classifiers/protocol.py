"""Request and response bodies of /v1/classifiers."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

MethodName = Literal["conditional", "fusion", "probe", "knn-lm", "knn", "gzip-knn", "zstd-dict"]
Label = Annotated[StrictStr, Field(min_length=1, max_length=256)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExampleIn(_Strict):
    text: Annotated[StrictStr, Field(min_length=1, description="UTF-8 text; NUL and U+001E are not allowed")]
    label: Label


class ClassifierRequest(_Strict):
    model: StrictStr | None = Field(default=None, description="model id from /v1/models; baselines fix their own")
    method: MethodName = Field(
        default="conditional",
        description=(
            "conditional: argmin C(x | label's data); probe (recommended with an LM): C(label | x) under a linear "
            "coder over the LM's states of the text, trained on the examples; knn-lm: the LM mixed with a token "
            "memory of each label's examples, + gzip on the class corpus; fusion: the LM on each label's nearest "
            "examples + gzip; knn: NCD kNN; gzip-knn, zstd-dict: classical baselines"
        ),
    )
    examples: list[ExampleIn] = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict, description="method options; see docs/CLASSIFY.md")


class ClassifierInfo(BaseModel):
    id: str
    model: str
    method: MethodName
    options: dict[str, Any] = Field(description="every option, defaults filled in")
    labels: list[str]
    examples: int
    examples_per_label: dict[str, int]
    created_at: float
    fitted: dict[str, Any] | None = Field(
        default=None, description="what the fit chose, for methods that choose (probe: weight decay, CV accuracies)"
    )
    status: Literal["fitting", "ready", "failed"] = Field(
        default="ready", description="fitting while its fit job runs (GET /v1/jobs/{fit_job}); failed: see error"
    )
    fit_job: str | None = Field(default=None, description="the job that fits it, in /v1/jobs")
    error: str | None = Field(default=None, description="only when failed: why the fit failed")


class ClassifierPending(ClassifierInfo):
    job: dict[str, Any] = Field(description="the fit job (as GET /v1/jobs/{id}), still queued or running")


class PredictRequest(_Strict):
    texts: list[Annotated[StrictStr, Field(min_length=1)]] = Field(min_length=1)


class PredictionOut(BaseModel):
    label: str
    scores: dict[str, float] = Field(description="a distribution over labels: vote shares (knn), else p ∝ 2^-bits")
    bits: dict[str, float] | None = Field(
        default=None, description="C(x | label's data) in bits (saving if unconditional); for probe C(label | x)"
    )


class PredictResponse(BaseModel):
    id: str
    model: str
    method: MethodName
    predictions: list[PredictionOut]


class PredictionJob(BaseModel):
    """A prediction job in the shape this route always had; the same job, by the same id, is in
    /v1/jobs (status, progress, results as JSON or JSON lines, DELETE cancels)."""

    id: str
    classifier: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    done: int = Field(description="texts predicted so far (progress.done)")
    total: int
    resumes: int = Field(default=0, description="always 0: a dead worker's chunks are reclaimed by another worker")
    created_at: float
    updated_at: float = Field(description="when it finished, else the time of this answer")
    kind: Literal["predict"] = "predict"
    progress: dict[str, int] = Field(description="as GET /v1/jobs/{id}: done, total (texts), tokens_done, tokens_total")
    error: str | None = Field(default=None, description="only when failed")
    predictions: list[PredictionOut] | None = Field(default=None, description="only when succeeded, in input order")
