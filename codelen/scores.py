"""From four code lengths to the numbers API v1 returns. The definitions are MISSION.md's."""

from __future__ import annotations

from dataclasses import dataclass

from codelen.datasets import Dataset
from models.protocol import ModelInfo


@dataclass(frozen=True)
class PairLengths:
    x: float  # C(X)
    y: float  # C(Y)
    y_given_x: float  # C(Y|X)
    x_given_y: float  # C(X|Y)


def score_document(info: ModelInfo, x: Dataset, y: Dataset, lengths: PairLengths, cached: bool) -> dict[str, object]:
    xy = lengths.x + lengths.y_given_x
    yx = lengths.y + lengths.x_given_y
    joint = min(xy, yx)
    return {
        "model": {"id": info.id, "revision": info.revision},
        "bytes": {"x": x.n_bytes, "y": y.n_bytes},
        "code_lengths": {"x": lengths.x, "y": lengths.y, "xy": xy, "yx": yx},
        "conditional": {"y_given_x": lengths.y_given_x, "x_given_y": lengths.x_given_y},
        "shared_information": lengths.x + lengths.y - joint,
        "ncd": ncd(lengths.x, lengths.y, joint),
        "bits_per_byte": {"x": lengths.x / x.n_bytes, "y": lengths.y / y.n_bytes},
        "window": info.window.as_dict() if info.window else {"policy": "whole", "context_tokens": None, "stride": None},
        "cached": cached,
    }


def ncd(cx: float, cy: float, joint: float) -> float:
    """(min(C(XY), C(YX)) − min(C(X), C(Y))) / max(C(X), C(Y)); datasets are never empty."""
    return (joint - min(cx, cy)) / max(cx, cy)
