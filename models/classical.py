"""Classical compressors: C(X) = 8 × compressed bytes, C(Y|X) = C(X·Y) − C(X).

Header convention: a length counts the complete output of the standard container, headers and
checksums included (gzip: 10-byte header with mtime 0 + 8-byte trailer; zlib: 2 + 4; bz2: 4-byte
header + 10-byte stream end; xz: 12-byte header + index + footer; zstd: frame header, no checksum).
The constant overhead cancels in C(X·Y) − C(X) but not in NCD: it is the reason NCD(x, x) > 0 for
short texts (ANCHORS.md pitfall 3), and the same convention is used for every pair.

`score` compresses each distinct prefix once per call. gzip and zlib go further: the deflate
state after the prefix is copied (`zlib.compressobj().copy()`) and only the target is compressed
after it, the trick of kts/gzip-knn `gziplength.py`. The output bytes are those of the one-shot
call (`gzip.compress(..., mtime=0)` is `zlib.compress(..., wbits=31)`), so lengths are unchanged
(tests/test_classify.py checks it); only the work on the prefix is saved.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence

import zstandard

from models.protocol import Conditioning, ModelInfo, Progress, Segment, SegmentBits, Symbols, TokenizationError

_ZSTD = zstandard.ZstdCompressor(level=19, write_checksum=False)

CODECS: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "gzip": (lambda b: gzip.compress(b, compresslevel=9, mtime=0), "gzip level 9, mtime 0, header and trailer counted"),
    "zlib": (lambda b: zlib.compress(b, 9), "zlib level 9, 2-byte header and adler32 counted"),
    "bz2": (lambda b: bz2.compress(b, 9), "bz2 level 9, stream header counted"),
    # preset 6, not 9: 9 allocates a 64 MiB dictionary per call (48 ms even for 300 bytes)
    "lzma": (lambda b: lzma.compress(b, preset=6), "xz container, preset 6, CRC64, headers counted"),
    "zstd": (_ZSTD.compress, "zstd level 19, frame header counted, no checksum"),
}


# What `context` mode (the only one a classical compressor offers) sees of X when it codes Y.
SEES = {
    "gzip": "the 32 KiB before each byte (deflate window)",
    "zlib": "the 32 KiB before each byte (deflate window)",
    "bz2": "its own 900 kB block: nothing across a block boundary",
    "lzma": "the 8 MiB before each byte (preset 6 dictionary)",
    "zstd": "the 8 MiB before each byte (level 19, window log 23)",
}

# Codecs whose one-shot output equals a zlib stream with these (level, wbits): their state after a
# prefix can be copied and continued with each target.
_STREAMS: dict[str, tuple[int, int]] = {"gzip": (9, 31), "zlib": (9, 15)}


class ClassicalCompressor:
    """A byte compressor behind the `Compressor` protocol. Symbols are the UTF-8 bytes."""

    def __init__(self, codec_id: str) -> None:
        compress, convention = CODECS[codec_id]
        self._compress = compress
        self._stream = _STREAMS.get(codec_id)
        version = zstandard.__version__ if codec_id == "zstd" else "stdlib"
        revision = hashlib.sha256(f"{codec_id}:{convention}:{version}".encode()).hexdigest()
        self.info = ModelInfo(
            id=codec_id,
            kind="classical",
            revision=revision,
            context_tokens=None,
            description=f"{codec_id} ({convention})",
            convention="C = 8 x compressed bytes; C(Y|X) = C(X·Y) - C(X); " + convention,
            modes=(context := Conditioning("context", (("sees", SEES[codec_id]),), ""),),
            conditioning=context,
        )

    def encode(self, text: str) -> Symbols:
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise TokenizationError(f"text is not valid Unicode at offset {exc.start}") from exc

    def bits(self, data: bytes) -> float:
        return 8.0 * len(self._compress(data)) if data else 0.0

    def score(
        self, segments: Sequence[Segment], *, need_prefix: bool = True, progress: Progress | None = None
    ) -> list[SegmentBits]:
        out: list[SegmentBits | None] = [None] * len(segments)
        if progress is not None:  # in bytes: a classical compressor's symbols
            progress(0, sum(len(s.prefix) + len(s.target) for s in segments))
        by_prefix: dict[bytes, list[int]] = defaultdict(list)
        for i, seg in enumerate(segments):
            by_prefix[bytes(seg.prefix)].append(i)
        for prefix, members in by_prefix.items():
            prefix_bits = self.bits(prefix)  # once per distinct prefix
            state = None
            if self._stream is not None and prefix and len(members) > 1:
                level, wbits = self._stream
                state = zlib.compressobj(level, zlib.DEFLATED, wbits)
                head = len(state.compress(prefix))
            for i in members:
                target = bytes(segments[i].target)
                if not target:
                    total = prefix_bits
                elif state is not None:
                    cont = state.copy()
                    total = 8.0 * (head + len(cont.compress(target)) + len(cont.flush()))
                else:
                    total = self.bits(prefix + target)
                out[i] = SegmentBits(prefix_bits, total - prefix_bits)
                if progress is not None:
                    progress(len(prefix) + len(target), 0)
        return out  # type: ignore[return-value]
