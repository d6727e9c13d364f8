"""What one unit of work is, and how a batch of them becomes cache entries.

Two kinds of task, each answering one cache key:
- LEN(X): C(X), always computed as the segment ((), X), so C(X) never depends on which Y it
  was requested with, nor on which worker or mode ran it;
- COND(X, Y): C(Y|X), the target part of the segment (X, Y).
A pair (X, Y) needs LEN X, LEN Y, COND X→Y and COND Y→X (three without COND Y→X when it asks for
`direction: y_given_x`).
A classifier job's tasks are of a third kind, `ClassifyTask` (run by workers/classifying.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from codelen import keys
from models.protocol import Compressor, Progress, Segment, Symbols


@dataclass(frozen=True)
class Task:
    model: str
    hx: str
    hy: str | None = None  # None: C(X); else C(Y|X)
    mode: str = "context"  # conditioning (models/conditioning.py); part of the cache namespace

    def key(self, ns: str) -> str:
        """The cache key under `ns`, the namespace of this task's model in this task's mode."""
        return keys.length(ns, self.hx) if self.hy is None else keys.conditional(ns, self.hx, self.hy)

    def shas(self) -> tuple[str, ...]:
        return (self.hx,) if self.hy is None else (self.hx, self.hy)


FIT = -1  # ClassifyTask.start of a fit


@dataclass(frozen=True)
class ClassifyTask:
    """Fit classifier `classifier` (start FIT), or predict texts start .. start+count-1 of job `job`."""

    model: str
    classifier: str
    job: str
    start: int
    count: int
    mode: str = "context"  # classifiers code in context mode; kept so tasks group like score tasks

    @property
    def tid(self) -> str:
        """The task's name in its job (the value it writes is stored under it)."""
        return "fit" if self.start == FIT else f"p{self.start}"


DIRECTIONS = ("both", "y_given_x")


def pair_tasks(model: str, hx: str, hy: str, mode: str = "context", direction: str = "both") -> list[Task]:
    """C(X), C(Y), C(Y|X) and, unless only that direction is asked for, C(X|Y)."""
    tasks = [Task(model, hx, None, mode), Task(model, hy, None, mode), Task(model, hx, hy, mode)]
    return tasks if direction == "y_given_x" else [*tasks, Task(model, hy, hx, mode)]


class SymbolCache:
    """Symbols of recently seen datasets, so a matrix row's X is tokenized once."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._items: OrderedDict[tuple[str, str], Symbols] = OrderedDict()
        self._max = max_entries

    def get(self, compressor: Compressor, sha: str, text: str) -> Symbols:
        key = (f"{compressor.info.id}@{compressor.info.revision}", sha)  # the same tokens in every mode
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        symbols = compressor.encode(text)
        self._items[key] = symbols
        if len(self._items) > self._max:
            self._items.popitem(last=False)
        return symbols


def run_tasks(
    compressor: Compressor,
    tasks: Iterable[Task],
    texts: Mapping[str, str],
    symbols: SymbolCache,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Score `tasks` (all of one model and mode) in one call of the compressor; returns cache
    key → bits. Only C(Y|X) is needed of a segment (X, Y), never C(X) from it: C(X) is a task of
    its own, so the compressor may skip X's windows. `progress` hears tokens planned and coded.

    Raises TokenizationError for a text the model cannot code; the caller decides which
    tasks that fails (see `run_tasks_isolating`)."""
    tasks = list(tasks)
    ns = compressor.info.cache_namespace
    segments = []
    for t in tasks:
        sx = symbols.get(compressor, t.hx, texts[t.hx])
        if t.hy is None:
            segments.append(Segment(prefix=(), target=sx))
        else:
            segments.append(Segment(prefix=sx, target=symbols.get(compressor, t.hy, texts[t.hy])))
    bits = compressor.score(segments, need_prefix=False, progress=progress)
    return {t.key(ns): b.target_bits for t, b in zip(tasks, bits, strict=True)}


def run_tasks_isolating(
    compressor: Compressor,
    tasks: list[Task],
    texts: Mapping[str, str],
    symbols: SymbolCache,
    progress: Progress | None = None,
) -> tuple[dict[str, float], dict[Task, str]]:
    """Like run_tasks, but a task whose text cannot be encoded fails alone: returns
    (results, {failed task: reason}). Other exceptions (a broken model) propagate."""
    good, failed = [], {}
    for t in tasks:
        try:
            for sha in t.shas():
                symbols.get(compressor, sha, texts[sha])
            good.append(t)
        except ValueError as exc:  # TokenizationError is a ValueError
            failed[t] = str(exc)
    return (run_tasks(compressor, good, texts, symbols, progress) if good else {}), failed
