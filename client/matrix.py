"""`codelen matrix`: N datasets from files and folders → one matrix job → a labelled matrix file.

Datasets from the command line:
- a file is one dataset of one text;
- a folder of files: each file is a dataset;
- a folder of folders: each subfolder is a dataset, each file in it one record.
Hidden files are skipped; names are the labels (file stems, or names if stems collide).

Matrix files (what `codelen plot` reads back):
- `.csv`: the chosen metric; the corner cell names it (`ncd` or `shared_information`), then a
  header row and a first column of labels;
- `.npy`: the chosen metric, with the labels in `<name>.labels.json` beside it;
- `.json`: `{"model", "ids", "ncd", "shared_information", "code_lengths"}`, both matrices.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.api import Data

METRICS = {"ncd": "ncd", "shared": "shared_information"}


class MatrixInputError(ValueError):
    pass


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _read(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MatrixInputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text:
        raise MatrixInputError(f"{path}: empty file (a dataset needs at least one byte)")
    return text


def _labels(paths: Sequence[Path]) -> list[str]:
    stems = [p.stem if p.is_file() else p.name for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in paths]


def collect(args: Sequence[str | Path]) -> dict[str, Data]:
    """Label → dataset, in command-line order, then sorted within a folder."""
    entries: list[tuple[Path, Data]] = []
    for arg in map(Path, args):
        if arg.is_file():
            entries.append((arg, _read(arg)))
        elif arg.is_dir():
            children = _visible(arg)
            subdirs = [c for c in children if c.is_dir()]
            if subdirs:
                for d in subdirs:
                    records = [_read(f) for f in _visible(d) if f.is_file()]
                    if not records:
                        raise MatrixInputError(f"{d}: no files (each file in it would be one record)")
                    entries.append((d, records))
            else:
                entries.extend((f, _read(f)) for f in children if f.is_file())
        else:
            raise MatrixInputError(f"{arg}: no such file or folder")
    if len(entries) < 2:
        raise MatrixInputError(f"{len(entries)} dataset(s); a matrix needs at least 2")
    labels = _labels([p for p, _ in entries])
    for label in labels:
        if "|" in label:
            raise MatrixInputError(f"{label!r}: a dataset name must not contain '|'")
    return dict(zip(labels, (d for _, d in entries), strict=True))


@dataclass
class Matrix:
    ids: list[str]
    values: np.ndarray  # N × N, symmetric
    metric: str  # "ncd" | "shared_information"


def write(doc: dict[str, Any], path: Path, metric: str, model: str | None) -> None:
    """Write the matrix document of a finished job in the format the suffix names."""
    ids = list(doc["ids"])
    values = np.asarray(doc[metric], dtype=float)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow([metric, *ids])
            for label, row in zip(ids, values, strict=True):
                w.writerow([label, *(repr(float(v)) for v in row)])
    elif suffix == ".npy":
        np.save(path, values)
        labels_path(path).write_text(json.dumps({"ids": ids, "metric": metric, "model": model}, ensure_ascii=False))
    elif suffix == ".json":
        keep = {k: doc[k] for k in ("ids", "ncd", "shared_information", "code_lengths") if k in doc}
        path.write_text(json.dumps({"model": model, "metric": metric, **keep}, ensure_ascii=False, indent=1))
    else:
        raise MatrixInputError(f"{path}: write .csv, .npy or .json")


def labels_path(npy: Path) -> Path:
    return npy.with_name(npy.stem + ".labels.json")


def read(path: Path, metric: str | None = None) -> Matrix:
    """A matrix file written by `write` (for .json, `metric` picks which; default its own)."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        header = rows[0]
        ids = header[1:]
        if [r[0] for r in rows[1:]] != ids:
            raise MatrixInputError(f"{path}: row labels differ from the column labels")
        values = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
        found = header[0] if header[0] in METRICS.values() else "ncd"
    elif suffix == ".npy":
        side = json.loads(labels_path(path).read_text())
        ids, values, found = side["ids"], np.load(path), side.get("metric", "ncd")
    elif suffix == ".json":
        doc = json.loads(path.read_text())
        found = metric or doc.get("metric", "ncd")
        ids, values = doc["ids"], np.asarray(doc[found], dtype=float)
    else:
        raise MatrixInputError(f"{path}: read .csv, .npy or .json")
    if values.shape != (len(ids), len(ids)):
        raise MatrixInputError(f"{path}: a {values.shape} matrix for {len(ids)} labels")
    return Matrix(list(ids), values, found)
