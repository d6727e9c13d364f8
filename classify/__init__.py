"""Text classification over the Compressor protocol: NCD kNN, conditional code length, and the
classical baselines (gzip-kNN, zstd dictionary per label). See docs/BENCHMARKS.md for numbers."""

from classify.base import Prediction
from classify.methods import BASELINES, METHODS, MethodError, build

__all__ = ["BASELINES", "METHODS", "MethodError", "Prediction", "build"]
