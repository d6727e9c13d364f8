"""The FTCC baseline: one zstd dictionary per label, C(x | label) = 8 × bytes of x compressed with it.

"raw": the label's training texts themselves, concatenated, are the dictionary (zstd uses them as
history, like a class corpus in front of x); "trained": zstd's dictionary builder (COVER) on the
label's texts as samples, `dict_size` bytes. Trained dictionaries need enough samples; labels with
too few fall back to raw.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import zstandard
from pydantic import BaseModel, ConfigDict, Field

from classify.base import DEFAULT_SEPARATOR, LabeledData, Prediction, argmin_label, posterior, text_rng


class ZstdDictOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    level: int = Field(default=19, ge=1, le=22, description="zstd compression level")
    dict_type: Literal["raw", "trained"] = "raw"
    dict_size: int = Field(default=112_640, ge=1024, le=16 * 1024 * 1024, description="bytes, trained only")
    separator: str = DEFAULT_SEPARATOR
    seed: int = Field(default=0, description="breaks exact ties between labels")


class ZstdDictClassifier:
    def __init__(self, data: LabeledData, opts: ZstdDictOptions) -> None:
        self.opts = opts
        self.labels = data.classes
        self.kinds: dict[str, str] = {}
        self._compressors: dict[str, zstandard.ZstdCompressor] = {}
        for lab, texts in data.by_label.items():
            dictionary, kind = self._dictionary(texts)
            self.kinds[lab] = kind
            self._compressors[lab] = zstandard.ZstdCompressor(
                level=opts.level, dict_data=dictionary, write_checksum=False
            )

    def _dictionary(self, texts: list[str]) -> tuple[zstandard.ZstdCompressionDict, str]:
        sep = self.opts.separator
        if self.opts.dict_type == "trained":
            try:
                samples = [t.encode("utf-8") for t in texts]
                return zstandard.train_dictionary(self.opts.dict_size, samples, level=self.opts.level), "trained"
            except zstandard.ZstdError:
                pass  # too few or too small samples
        raw = (sep.join(texts) + sep).encode("utf-8")
        return zstandard.ZstdCompressionDict(raw, dict_type=zstandard.DICT_TYPE_RAWCONTENT), "raw"

    def bits(self, text: str) -> dict[str, float]:
        data = text.encode("utf-8")
        return {lab: 8.0 * len(c.compress(data)) for lab, c in self._compressors.items()}

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        out = []
        for text in texts:
            bits = self.bits(text)
            out.append(Prediction(argmin_label(bits, text_rng(self.opts.seed, text)), posterior(bits), bits))
        return out
