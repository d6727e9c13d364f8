"""Canonical serialization of datasets, so the same records give the same bytes and cache key.

A dataset is an ordered list of records. A single string is a one-record dataset and serializes
to itself. Records are joined by RECORD_SEPARATOR, which records may not contain, so the message
decodes back into its records, and the model pays for every separator.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

RECORD_SEPARATOR = "\n\x1e\n"  # newline, ASCII record separator, newline
FORBIDDEN = {"\x00": "NUL (U+0000)", "\x1e": "the record separator U+001E"}


class DatasetError(ValueError):
    """Input that does not describe a dataset; `pointer` says where (JSON-pointer style)."""

    def __init__(self, message: str, pointer: str = "", *, too_large: bool = False) -> None:
        super().__init__(message)
        self.pointer = pointer
        self.too_large = too_large  # answered 413 rather than 422


@dataclass(frozen=True)
class Dataset:
    text: str  # canonical serialization
    sha256: str
    n_bytes: int
    n_records: int


def check_record(record: str, pointer: str, max_bytes: int) -> int:
    """The record's size in UTF-8 bytes; DatasetError if it holds a forbidden character, is not
    valid Unicode, or is over `max_bytes` (too_large)."""
    for ch, name in FORBIDDEN.items():
        if ch in record:
            raise DatasetError(f"record contains {name} at offset {record.index(ch)}", pointer)
    try:
        size = len(record.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise DatasetError(f"record is not valid Unicode (lone surrogate at offset {exc.start})", pointer) from exc
    if size > max_bytes:
        raise DatasetError(f"record of {size} bytes; at most {max_bytes}", pointer, too_large=True)
    return size


def canonical(
    data: str | list[str], *, max_record_bytes: int, max_records: int, max_bytes: int, pointer: str = ""
) -> Dataset:
    records = [data] if isinstance(data, str) else list(data)
    if not records:
        raise DatasetError("a dataset needs at least one record", pointer)
    if len(records) > max_records:
        raise DatasetError(f"{len(records)} records; at most {max_records} per dataset", pointer, too_large=True)
    for i, rec in enumerate(records):
        check_record(rec, pointer if isinstance(data, str) else f"{pointer}/{i}", max_record_bytes)
    text = RECORD_SEPARATOR.join(records)
    raw = text.encode("utf-8")
    if not raw:
        raise DatasetError("a dataset must not be empty (0 bytes): its code length would be 0", pointer)
    if len(raw) > max_bytes:
        raise DatasetError(f"dataset of {len(raw)} bytes; at most {max_bytes}", pointer, too_large=True)
    return Dataset(text=text, sha256=hashlib.sha256(raw).hexdigest(), n_bytes=len(raw), n_records=len(records))
