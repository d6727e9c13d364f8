"""The methods by name: which compressor each needs, its options, and how to build it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ValidationError

from classify.base import Classifier, LabeledData
from classify.conditional import ConditionalClassifier, ConditionalOptions
from classify.fusion import FusionClassifier, FusionOptions
from classify.knn import KnnClassifier, KnnOptions
from classify.knn_lm import KnnLmClassifier, KnnLmOptions, StateCompressor
from classify.probe import ProbeClassifier, ProbeOptions
from classify.zstd_dict import ZstdDictClassifier, ZstdDictOptions
from models.classical import CODECS
from models.protocol import Compressor


class MethodError(ValueError):
    """Unknown method, options that do not fit it, or a model it cannot use."""


@dataclass(frozen=True)
class Method:
    name: str
    options: type[BaseModel]
    fixed_model: str | None  # the compressor the method always uses, if any
    description: str
    needs_lm: bool = False  # needs a language model's token states


METHODS = {
    m.name: m
    for m in (
        Method("knn", KnnOptions, None, "kNN over NCD with the model, fair ties"),
        Method("conditional", ConditionalOptions, None, "argmin over labels of C(x | label's examples)"),
        Method(
            "fusion",
            FusionOptions,
            None,
            "the model on each label's nearest examples in context + gzip on the whole class corpus",
        ),
        Method(
            "knn-lm",
            KnnLmOptions,
            None,
            "C(x | label): the LM mixed with a token memory of each label's examples (kNN-LM), "
            "+ gzip on the class corpus; one LM pass per text",
            needs_lm=True,
        ),
        Method(
            "probe",
            ProbeOptions,
            None,
            "recommended with an LM: C(label | x) under a linear coder of the label over the LM's states of the text, "
            "trained on the examples; one LM pass per text",
            needs_lm=True,
        ),
        Method("gzip-knn", KnnOptions, "gzip", "baseline: kNN over gzip NCD (npc_gzip, fair ties)"),
        Method("zstd-dict", ZstdDictOptions, "zstd", "baseline: zstd dictionary per label (FTCC)"),
    )
}
BASELINES = ("gzip-knn", "zstd-dict")


def method(name: str) -> Method:
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; one of {', '.join(METHODS)}")
    return METHODS[name]


def resolve_model(name: str, requested: str | None, default: str) -> str:
    """The model a method runs on: its fixed compressor for a baseline, else the one asked for."""
    m = method(name)
    if m.fixed_model is not None:
        if requested not in (None, m.fixed_model):
            raise MethodError(f"method {name!r} always uses model {m.fixed_model!r}, not {requested!r}")
        return m.fixed_model
    model = requested or default
    if m.needs_lm and model in CODECS:
        raise MethodError(f"method {name!r} needs a language model, not the classical compressor {model!r}")
    return model


def parse_options(name: str, options: dict | None) -> BaseModel:
    try:
        return method(name).options.model_validate(options or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "/".join(str(p) for p in first["loc"])
        raise MethodError(f"options/{where}: {first['msg']}") from None


def build(
    name: str,
    compressor: Callable[[], Compressor],
    texts: Sequence[str],
    labels: Sequence[str],
    options: dict | BaseModel | None = None,
    fitted: dict | None = None,
) -> Classifier:
    """A fitted classifier. `compressor` is called only by methods that need one (blocking).
    `fitted`: what an earlier fit of the same definition chose (`probe`: skips its cross-validation)."""
    opts = options if isinstance(options, BaseModel) else parse_options(name, options)
    data = LabeledData(list(texts), list(labels))
    if name == "zstd-dict":
        return ZstdDictClassifier(data, opts)  # type: ignore[arg-type]
    if name in ("knn", "gzip-knn"):
        return KnnClassifier(compressor(), data, opts)  # type: ignore[arg-type]
    if name == "conditional":
        return ConditionalClassifier(compressor(), data, opts)  # type: ignore[arg-type]
    if name == "fusion":
        return FusionClassifier(compressor(), data, opts)  # type: ignore[arg-type]
    if name in ("knn-lm", "probe"):
        c = compressor()
        if not isinstance(c, StateCompressor):
            raise MethodError(f"method {name!r} needs a language model, not {c.info.id!r}")
        if name == "probe":
            return ProbeClassifier(c, data, opts, fitted)  # type: ignore[arg-type]
        return KnnLmClassifier(c, data, opts)  # type: ignore[arg-type]
    raise MethodError(f"unknown method {name!r}")
