"""Labeled text files in, a clean train/test split out.

Readers: CSV, TSV or JSONL with `label` and `text` columns (and an optional `group`), the AG News
CSV layout (no header: "label","title","description"; `\\` stands for a newline), and header-less
`label<TAB>text` files such as R8. Column names or 0-based indices pick other layouts (SMS spam:
`--text-col SMS`).

The split is what published gzip-kNN numbers got wrong (ANCHORS.md): a group never straddles
train and test, and a training text that is an exact duplicate of a test text is dropped.
"""

from __future__ import annotations

import csv
import json
import random
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    group: str | None = None


@dataclass
class Split:
    train: list[Example]
    test: list[Example]
    duplicates_dropped: int = 0  # training examples dropped because their text is also a test text
    notes: list[str] = field(default_factory=list)


class DataError(ValueError):
    pass


FORMATS = ("auto", "csv", "tsv", "jsonl", "agnews")


def _column(header: list[str] | None, wanted: str | None, fallback: int | None) -> int | None:
    """Index of column `wanted` (a name, case-insensitive, or a 0-based index)."""
    if wanted is not None and wanted.isdigit():
        return int(wanted)
    if header is not None and wanted is not None:
        lowered = [h.strip().lower() for h in header]
        if wanted.lower() in lowered:
            return lowered.index(wanted.lower())
        return None
    return fallback


def _detect(path: Path, first_rows: list[list[str]], fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix == ".csv":
        row = first_rows[0] if first_rows else []
        if len(row) == 3 and row[0].strip().isdigit():
            return "agnews"
        return "csv"
    return "tsv"


def _rows(path: Path, delimiter: str) -> list[list[str]]:
    csv.field_size_limit(sys.maxsize)
    with path.open(newline="", encoding="utf-8") as f:
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        return [row for row in csv.reader(f, delimiter=delimiter, quoting=quoting) if row]


def load_examples(
    path: str | Path,
    fmt: str = "auto",
    label_col: str = "label",
    text_col: str = "text",
    group_col: str | None = "group",
    header: bool | None = None,
) -> list[Example]:
    """Read a labeled file. `header=None` detects it: the first row is a header when it names the
    label column. A header with a label column and exactly one other column takes that as text."""
    path = Path(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    if fmt == "jsonl" or (fmt == "auto" and path.suffix.lower() in (".jsonl", ".ndjson", ".json")):
        return _load_jsonl(path, label_col, text_col, group_col)
    delimiter = "," if fmt in ("csv", "agnews") or (fmt == "auto" and path.suffix.lower() == ".csv") else "\t"
    rows = _rows(path, delimiter)
    if not rows:
        raise DataError(f"{path}: no rows")
    fmt = _detect(path, rows[:1], fmt)
    if fmt == "agnews":
        return [Example(f"{r[1]}. {r[2]}".replace("\\", "\n"), r[0].strip()) for r in rows if len(r) >= 3]
    first = rows[0]
    has_header = (
        header
        if header is not None
        else (not label_col.isdigit() and label_col.lower() in [c.strip().lower() for c in first])
    )
    head = first if has_header else None
    body = rows[1:] if has_header else rows
    li = _column(head, label_col, 0)
    ti = _column(head, text_col, 1)
    if head is not None and ti is None and li is not None and len(head) == 2:
        ti = 1 - li
    if li is None or ti is None:
        raise DataError(f"{path}: columns {label_col!r} and {text_col!r} not found in header {first}")
    gi = _column(head, group_col, None) if group_col and head is not None else None
    out = []
    for n, r in enumerate(body):
        if max(li, ti) >= len(r):
            raise DataError(f"{path}: row {n + 1 + has_header} has {len(r)} columns")
        out.append(Example(r[ti], r[li].strip(), r[gi] if gi is not None and gi < len(r) and r[gi] else None))
    return out


def _load_jsonl(path: Path, label_col: str, text_col: str, group_col: str | None) -> list[Example]:
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                text, label = doc[text_col], doc[label_col]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"{path}:{n}: needs an object with {label_col!r} and {text_col!r} ({exc})") from None
            group = doc.get(group_col) if group_col else None
            out.append(Example(str(text), str(label), None if group is None else str(group)))
    return out


def split(
    examples: Sequence[Example],
    train_per_class: int | None,
    test_per_class: int,
    seed: int = 0,
    test_examples: Sequence[Example] | None = None,
) -> Split:
    """Seeded split with at most `test_per_class` test and `train_per_class` training examples per
    label (None: all the rest). Units are groups (an example without a group is its own unit), so a
    group never straddles train and test. Test is filled first, unit by unit in seeded order: a unit
    gives the examples whose label still has room (in seeded order within the unit); the rest of a
    unit that gave any is then unused, and untouched units go on to training, which is filled the
    same way. So the quotas are met exactly whenever the data holds enough, even with large groups
    of mixed labels. A training example whose text equals a test text is dropped. With
    `test_examples` (a separate test file), those are sampled for test and `examples` for train."""
    rng = random.Random(seed)

    def units(items: Sequence[Example], tag: str) -> list[list[Example]]:
        by_group: dict[str, list[Example]] = defaultdict(list)
        for i, e in enumerate(items):
            by_group[f"g:{e.group}" if e.group is not None else f"{tag}:{i}"].append(e)
        out = list(by_group.values())
        for unit in out:
            rng.shuffle(unit)
        rng.shuffle(out)
        return out

    def fill(pool: list[list[Example]], quota: int | None, exclude: set[str]) -> tuple[list[Example], list, int]:
        taken: list[Example] = []
        rest: list[list[Example]] = []
        counts: Counter[str] = Counter()
        dropped = 0
        for unit in pool:
            kept = [e for e in unit if e.text not in exclude]
            dropped += len(unit) - len(kept)
            given = []
            for e in kept:
                if quota is None or counts[e.label] < quota:
                    given.append(e)
                    counts[e.label] += 1
            if given:
                taken.extend(given)
            else:
                rest.append(unit)
        return taken, rest, dropped

    test_pool = units(test_examples if test_examples is not None else examples, "test")
    test, rest, _ = fill(test_pool, test_per_class, set())
    train_pool = units(examples, "train") if test_examples is not None else rest
    if test_examples is not None:
        test_groups = {e.group for e in test if e.group is not None}
        train_pool = [u for u in train_pool if not any(e.group in test_groups for e in u if e.group is not None)]
    train, _, dropped = fill(train_pool, train_per_class, {e.text for e in test})
    notes = []
    short = [lab for lab, c in Counter(e.label for e in train).items() if train_per_class and c < train_per_class]
    if short:
        notes.append(f"fewer than {train_per_class} training examples for: {', '.join(sorted(short))}")
    return Split(train, test, dropped, notes)
