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
Mode = Annotated[
    Literal["context", "memory", "adapt"],
    Field(
        description=(
            "How X conditions Y: 'context' (the model's window; default), 'memory' (a nearest-neighbour "
            "memory of the tokens within a horizon before the window, and a copy model over every earlier "
            "token) or 'adapt' (the model trained on X as it codes it, with the same copy model). "
            "/v1/models lists what each model offers, with the parameters"
        )
    ),
]
Direction = Annotated[
    Literal["both", "y_given_x"],
    Field(description="'y_given_x': compute C(Y|X) only, not C(X|Y) (half the cost for a large X and small Y)"),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoreRequest(_Strict):
    x: DatasetIn
    y: DatasetIn
    model: StrictStr | None = Field(default=None, description="model id from /v1/models; default: the service's")
    conditioning: Mode = "context"
    direction: Direction = "both"


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
    conditioning: Mode = "context"
    direction: Direction = Field("both", description="'y_given_x' (pairs only): compute C(Y|X), not C(X|Y)")
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
    yx: float | None = Field(description="null when only C(Y|X) was computed")


class Conditional(BaseModel):
    y_given_x: float
    x_given_y: float | None = Field(description="null when only C(Y|X) was computed")


class Bytes(BaseModel):
    x: int
    y: int


class ScoreResponse(BaseModel):
    model: ModelRef
    bytes: Bytes
    code_lengths: CodeLengths = Field(description="bits")
    conditional: Conditional = Field(description="bits")
    shared_information: float = Field(
        description="C(X) + C(Y) - min(C(XY), C(YX)), bits (C(XY) alone with direction y_given_x)"
    )
    ncd: float
    bits_per_byte: XY
    window: dict[str, object]
    conditioning: dict[str, object] = Field(description="the mode and all its parameters")
    direction: Direction
    cached: bool


class Progress(BaseModel):
    done: int = Field(description="pairs finished")
    total: int = Field(description="pairs in the job")
    tokens_done: int = Field(
        0,
        description="tokens (bytes for a classical model) coded so far by the batches that ran this job's "
        "work (a batch shared with other jobs counts for each)",
    )
    tokens_total: int = Field(
        0, description="tokens of the work started so far for this job (grows as batches start)"
    )


class JobStatus(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    model: str
    kind: Literal["pairs", "matrix", "fit", "predict"] = Field(
        description="fit, predict: a classifier's fit or prediction job (/v1/classifiers); progress counts texts"
    )
    conditioning: Literal["context", "memory", "adapt"] = "context"
    direction: Literal["both", "y_given_x"] = "both"
    progress: Progress
    created_at: float
    finished_at: float | None = None
    error: str | None = None
    classifier: str | None = Field(default=None, description="only for fit and predict jobs")


class ModelEntry(BaseModel):
    id: str
    kind: Literal["lm", "classical"]
    revision: str
    context_tokens: int | None
    window: dict[str, object] | None = None
    description: str | None = None
    convention: str | None = None
    conditioning: dict[str, dict[str, object]] = Field(
        description="the conditioning modes this model offers, each with its fixed parameters"
    )


class ModelList(BaseModel):
    models: list[ModelEntry]
