"""Request and response bodies of API v1 (MISSION.md). Strict: a number is not a text."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

Text = Annotated[StrictStr, Field(description="UTF-8 text; NUL and U+001E are not allowed")]
DatasetIn = Annotated[
    Text | list[Text],
    Field(description="A dataset: one text, or a list of records (serialized with a separator the model pays for)"),
]
Id = Annotated[StrictStr, Field(min_length=1, max_length=256)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoreRequest(_Strict):
    x: DatasetIn
    y: DatasetIn
    model: StrictStr | None = Field(default=None, description="model id from /v1/models; default: the service's")


class PairIn(_Strict):
    id: Id
    x: DatasetIn
    y: DatasetIn


class MatrixDataset(_Strict):
    id: Annotated[StrictStr, Field(min_length=1, max_length=256, pattern=r"^[^|]+$")]
    data: DatasetIn


class MatrixIn(_Strict):
    datasets: list[MatrixDataset] = Field(min_length=1)


class JobRequest(_Strict):
    model: StrictStr | None = None
    pairs: list[PairIn] | None = Field(default=None, min_length=1)
    matrix: MatrixIn | None = None


class ModelRef(BaseModel):
    id: str
    revision: str


class XY(BaseModel):
    x: float
    y: float


class CodeLengths(BaseModel):
    x: float
    y: float
    xy: float
    yx: float


class Conditional(BaseModel):
    y_given_x: float
    x_given_y: float


class Bytes(BaseModel):
    x: int
    y: int


class ScoreResponse(BaseModel):
    model: ModelRef
    bytes: Bytes
    code_lengths: CodeLengths = Field(description="bits")
    conditional: Conditional = Field(description="bits")
    shared_information: float = Field(description="C(X) + C(Y) - min(C(XY), C(YX)), bits")
    ncd: float
    bits_per_byte: XY
    window: dict[str, object]
    cached: bool


class Progress(BaseModel):
    done: int
    total: int


class JobStatus(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    model: str
    kind: Literal["pairs", "matrix"]
    progress: Progress
    created_at: float
    finished_at: float | None = None
    error: str | None = None


class ModelEntry(BaseModel):
    id: str
    kind: Literal["lm", "classical"]
    revision: str
    context_tokens: int | None
    window: dict[str, object] | None = None
    description: str | None = None
    convention: str | None = None


class ModelList(BaseModel):
    models: list[ModelEntry]
