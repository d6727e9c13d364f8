"""Results of embedded jobs, held compactly: what bounds a finished job's memory by bytes.

A pair's result is six numbers (its four code lengths, the bytes of X and Y); a job keeps them in
flat arrays, 49 bytes a pair, not a result document per pair (~2 KB of dicts and floats). The
documents are built when they are read, one at a time (`rows` is a generator), so reading never
holds more than the chunk being sent. A 500-dataset matrix (125,250 pairs) is 6 MB.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import sys
from array import array
from collections.abc import Callable, Iterator

from codelen.datasets import Dataset
from codelen.scores import PairLengths
from models.protocol import ModelInfo
from workers.compute import ClassifyTask
from workers.jobs import PairSpec, classify_rows, pair_result


class JobResults:
    """The finished pairs of one job, in pair order. A matrix job's pair ids are not stored: pair k
    is (i, j), i <= j, row by row (workers/jobs.py: matrix_pairs)."""

    def __init__(self, info: ModelInfo, n_pairs: int, pair_ids: list[str] | None, matrix_ids: list[str] | None) -> None:
        assert (pair_ids is None) != (matrix_ids is None)
        self.info = info
        self.n = n_pairs
        self._pair_ids = pair_ids
        self._matrix_ids = matrix_ids
        self._lengths = array("d", bytes(8 * 4 * n_pairs))  # x, y, y_given_x, x_given_y per pair
        self._sizes = array("q", bytes(8 * 2 * n_pairs))  # bytes of x and y per pair
        self._done = bytearray(n_pairs)
        ids = pair_ids if pair_ids is not None else matrix_ids
        self.nbytes = (
            self._lengths.itemsize * len(self._lengths)
            + self._sizes.itemsize * len(self._sizes)
            + n_pairs
            + sum(sys.getsizeof(i) + 8 for i in ids or ())
        )

    def set(self, k: int, pair: PairSpec, lengths: PairLengths) -> None:
        x_given_y = math.nan if lengths.x_given_y is None else lengths.x_given_y  # NaN: not computed
        self._lengths[4 * k : 4 * k + 4] = array("d", (lengths.x, lengths.y, lengths.y_given_x, x_given_y))
        self._sizes[2 * k], self._sizes[2 * k + 1] = pair.x.n_bytes, pair.y.n_bytes
        self._done[k] = 1

    def _ids(self) -> Iterator[str]:
        if self._pair_ids is not None:
            yield from self._pair_ids
            return
        ids = self._matrix_ids or []
        for i in range(len(ids)):
            for j in range(i, len(ids)):
                yield f"{ids[i]}|{ids[j]}"

    def rows(self) -> Iterator[dict[str, object]]:
        """The result document of each finished pair, in pair order, built as it is asked for."""
        for k, pair_id in enumerate(self._ids()):
            if not self._done[k]:
                continue
            x, y, y_given_x, x_given_y = self._lengths[4 * k : 4 * k + 4]
            pair = PairSpec(pair_id, Dataset("", "", self._sizes[2 * k], 0), Dataset("", "", self._sizes[2 * k + 1], 0))
            lengths = PairLengths(x, y, y_given_x, None if math.isnan(x_given_y) else x_given_y)
            yield pair_result(self.info, pair, lengths)


class ClassifyResults:
    """The values of a classifier job's finished tasks (a fit's choice, each chunk's predictions),
    in task order; `nbytes` is their JSON size, what the byte bound of finished jobs counts."""

    def __init__(self, info: ModelInfo, kind: str, classifier: str, tasks: list[ClassifyTask]) -> None:
        self.info, self.kind, self.classifier, self.tasks = info, kind, classifier, tasks
        self.n = sum(t.count for t in tasks)
        self._values: list[object] = [None] * len(tasks)
        self.nbytes = 0

    def set(self, k: int, value: object) -> None:
        self._values[k] = value
        self.nbytes += len(json.dumps(value))

    def rows(self) -> Iterator[dict]:
        return classify_rows(self.kind, self.classifier, self.tasks, self._values)


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


MALLOC_TRIM = _malloc_trim()


def release_memory() -> None:
    """Give what was freed back to the OS: a full collection, then glibc's malloc_trim (freed
    memory otherwise stays in the process, in pymalloc arenas and malloc's free lists). Called
    after a big job's inputs or results are dropped; a few milliseconds."""
    gc.collect()
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)
