"""`fusion`: two conditional experts, the model on retrieved examples and a classical compressor on
the whole class corpus, combined per text (docs/CLASSIFY.md). `probe` is the recommended LM method.

The two experts see different things. The LM, conditioned on the label's few examples nearest to
x (`select="nearest"`), knows the language and the topics but reads ~8 examples per label; gzip
(or another classical compressor) reads every example of the label but only copies strings. Their
errors differ, and on AG News their product beats either (docs/BENCHMARKS.md, "Text
classification").

The label's score is the sum of the two code lengths (`normalize="bits"`, the default):

    F(label) = C_m(x | label) + weight · C_c(x | label)

(C_m the model, C_c the classical compressor): the code length of x under the product of the two
coders, with no parameter to tune at weight 1. The prediction is argmin F, ties broken fairly
(seeded by text); `bits` reports F and `scores` its posterior ∝ 2^-F (a product of experts, not a
calibrated probability). gzip spends ~4× more bits per text than the LM, and its differences
between labels are larger too, so it weighs more in the sum; measured, that is right: on AG News
the sum beats putting both experts on the scale of x first (`normalize="relative"`:
C_m(x | label) + weight · C_m(x)/C_c(x) · C_c(x | label), which needs weight ≈ 4 to match it).

Cost per text: the model's conditional (one prefix of ~8 examples per label, no sharing between
texts) plus C_m(x) alone for `relative`; the classical expert is ~1000× cheaper.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from classify.base import LabeledData, Prediction, argmin_label, posterior, text_rng
from classify.conditional import ConditionalClassifier, ConditionalOptions
from models.classical import ClassicalCompressor
from models.protocol import Compressor, Segment


def _default_model_expert() -> dict:
    return {"select": "nearest", "max_examples": 8}


class FusionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_options: dict = Field(
        default_factory=_default_model_expert,
        description="ConditionalOptions of the model's expert, over the default: 8 gzip-nearest examples per label",
    )
    classical: Literal["gzip", "zlib", "zstd", "bz2", "lzma"] = Field(
        default="gzip", description="the second expert's compressor"
    )
    classical_options: dict = Field(
        default_factory=dict, description="ConditionalOptions of the classical expert (default: whole class corpus)"
    )
    weight: float = Field(default=1.0, ge=0.0, description="weight of the classical expert (0: the model alone)")
    normalize: Literal["bits", "relative"] = Field(
        default="bits", description="bits: sum of the code lengths; relative: each expert's C(x|label) / C(x)"
    )
    seed: int = 0

    @model_validator(mode="after")
    def _experts_valid(self) -> FusionOptions:
        # model_options given by a client change the defaults, they do not replace them
        self.model_options = {**_default_model_expert(), **self.model_options}
        for which in ("model", "classical"):  # bad nested options fail at creation (422)
            try:
                self.expert(which)  # type: ignore[arg-type]
            except ValidationError as exc:
                first = exc.errors()[0]
                where = "/".join(str(p) for p in first["loc"])
                raise ValueError(f"{which}_options/{where}: {first['msg']}") from None
        return self

    def expert(self, which: Literal["model", "classical"]) -> ConditionalOptions:
        raw = self.model_options if which == "model" else self.classical_options
        return ConditionalOptions.model_validate({**raw, "seed": self.seed, "unconditional": False})


class FusionClassifier:
    def __init__(self, compressor: Compressor, data: LabeledData, opts: FusionOptions) -> None:
        self.opts, self.data = opts, data
        self.labels = data.classes
        self.model = ConditionalClassifier(compressor, data, opts.expert("model"))
        self.classical = ConditionalClassifier(ClassicalCompressor(opts.classical), data, opts.expert("classical"))

    def segments_per_text(self) -> int:
        """Code lengths one text costs (both experts, and C(x) alone for `relative`)."""
        alone = int(self.opts.normalize == "relative")
        return sum(
            (sum(e.windows().values()) if e.opts.select == "all" else len(self.labels) * (e.opts.max_windows or 1))
            + alone
            for e in (self.model, self.classical)
        )

    @staticmethod
    def _alone(expert: ConditionalClassifier, texts: Sequence[str]) -> list[float]:
        c = expert.compressor
        return [b.target_bits for b in c.score([Segment((), c.encode(t)) for t in texts])]

    def experts(self, texts: Sequence[str], alone: bool | None = None) -> dict[str, list]:
        """The inputs of the fusion, per text: each expert's C(x | label), and with `alone` (default:
        when `normalize` is relative) each one's C(x)."""
        texts = list(texts)
        out = {"model": self.model.lengths(texts)[0], "classical": self.classical.lengths(texts)[0]}
        if self.opts.normalize == "relative" if alone is None else alone:
            out["model_alone"] = self._alone(self.model, texts)
            out["classical_alone"] = self._alone(self.classical, texts)
        return out

    def fuse(self, texts: Sequence[str], experts: dict[str, list]) -> list[Prediction]:
        w, out = self.opts.weight, []
        for i, text in enumerate(texts):
            scale = 1.0
            if self.opts.normalize == "relative":  # classical bits -> the model's bits of this text
                scale = experts["model_alone"][i] / max(experts["classical_alone"][i], 1e-9)
            m, c = experts["model"][i], experts["classical"][i]
            fused = {lab: m[lab] + w * scale * c[lab] for lab in self.labels}
            out.append(Prediction(argmin_label(fused, text_rng(self.opts.seed, text)), posterior(fused), fused))
        return out

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        return self.fuse(texts, self.experts(texts))
