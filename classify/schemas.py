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
    id: str
    classifier: str
    status: Literal["queued", "running", "succeeded", "failed"] = Field(
        description=(
            "a queued or running job whose updated_at is older than 6 heartbeats lost its process: with Redis "
            "the next GET resumes it from its last saved predictions (at most 3 times); in memory it reads as failed"
        )
    )
    done: int = Field(description="texts predicted so far")
    total: int
    resumes: int = Field(default=0, description="times the job was resumed after its process stopped")
    created_at: float
    updated_at: float = Field(description="last progress or heartbeat (every CODELEN_PREDICTION_HEARTBEAT_S)")
    error: str | None = Field(default=None, description="only when failed")
    predictions: list[PredictionOut] | None = Field(default=None, description="only when succeeded, in input order")
