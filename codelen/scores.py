"""From the code lengths of a pair to the numbers API v1 returns. The definitions are MISSION.md's."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from codelen.datasets import Dataset
from codelen.model_info import ModelInfo


@dataclass(frozen=True)
class PairLengths:
    x: float  # C(X)
    y: float  # C(Y)
    y_given_x: float  # C(Y|X)
    x_given_y: float | None = None  # C(X|Y); None when only C(Y|X) was asked for (direction y_given_x)

    @classmethod
    def of(cls, values: Sequence[float]) -> PairLengths:
        """From the values of `workers.compute.pair_tasks`, in its order (three or four)."""
        return cls(*values)

    @property
    def direction(self) -> str:
        return "both" if self.x_given_y is not None else "y_given_x"


def score_document(info: ModelInfo, x: Dataset, y: Dataset, lengths: PairLengths, cached: bool) -> dict[str, object]:
    """With one direction only, C(Y·X) and C(X|Y) are null and the joint is C(X·Y)."""
    xy = lengths.x + lengths.y_given_x
    yx = None if lengths.x_given_y is None else lengths.y + lengths.x_given_y
    joint = xy if yx is None else min(xy, yx)
    return {
        "model": {"id": info.id, "revision": info.revision},
        "bytes": {"x": x.n_bytes, "y": y.n_bytes},
        "code_lengths": {"x": lengths.x, "y": lengths.y, "xy": xy, "yx": yx},
        "conditional": {"y_given_x": lengths.y_given_x, "x_given_y": lengths.x_given_y},
        "shared_information": lengths.x + lengths.y - joint,
        "ncd": ncd(lengths.x, lengths.y, joint),
        "bits_per_byte": {"x": lengths.x / x.n_bytes, "y": lengths.y / y.n_bytes},
        "window": info.window.as_dict() if info.window else {"policy": "whole", "context_tokens": None, "stride": None},
        "conditioning": info.conditioning.as_dict(),
        "direction": lengths.direction,
        "cached": cached,
    }


def ncd(cx: float, cy: float, joint: float) -> float:
    """(min(C(XY), C(YX)) − min(C(X), C(Y))) / max(C(X), C(Y)); datasets are never empty."""
    return (joint - min(cx, cy)) / max(cx, cy)
