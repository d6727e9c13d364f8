"""Positions of a sequence looked up by a 64-bit key: the copy model's index (a hash of the tokens
before each position, models/memory.py) and the n-gram cache's (the exact tokens before and at
each position, models/ngram.py) are both this."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PositionIndex:
    """Positions low..low + size - 1 of a sequence, each with a key: the distinct keys, sorted,
    and the positions sorted by (key, position) as group × (size + 1) + position − low, so the
    latest position below a bound with a given key, or how many there are, is two binary
    searches away. 16 bytes a position at most."""

    low: int
    size: int
    keys: np.ndarray  # (groups,) uint64: the distinct keys, sorted
    entries: np.ndarray  # (size,) int64, sorted: group × (size + 1) + position − low

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.entries.nbytes

    @classmethod
    def of(cls, keys: np.ndarray, low: int) -> PositionIndex:
        """The index of positions low.. whose keys are `keys`, in position order."""
        by_key = np.argsort(keys, kind="stable")  # position − low, by (key, position)
        sorted_keys = keys[by_key]
        starts = np.ones(len(keys), dtype=bool)  # where a key's group starts
        np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=starts[1:])
        group = np.cumsum(starts) - 1
        distinct = sorted_keys[starts]
        del sorted_keys, starts
        return cls(low, len(keys), distinct, group * (len(keys) + 1) + by_key)

    def _bounds(self, keys: np.ndarray, below: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each key's group, whether the index holds the key, and where its positions below
        `below` end in `entries`."""
        group = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        found = self.keys[group] == keys
        end = np.searchsorted(self.entries, group * (self.size + 1) + np.clip(below - self.low, 0, self.size))
        return group, found, end

    def latest(self, keys: np.ndarray, below: np.ndarray) -> np.ndarray:
        """For each key, the latest position of the index below `below` (its entry) with that
        key; -1 where there is none."""
        if self.size == 0:
            return np.full(len(keys), -1, dtype=np.int64)
        width = self.size + 1
        group, ok, end = self._bounds(keys, below)
        at = end - 1
        ok &= at >= 0
        hit = self.entries[np.where(ok, at, 0)]
        ok &= hit // width == group
        return np.where(ok, hit % width + self.low, -1)

    def count_below(self, keys: np.ndarray, below: np.ndarray) -> np.ndarray:
        """For each key, how many positions of the index below `below` (its entry) hold it."""
        if self.size == 0:
            return np.zeros(len(keys), dtype=np.int64)
        group, found, end = self._bounds(keys, below)
        return np.where(found, end - np.searchsorted(self.entries, group * (self.size + 1)), 0)
