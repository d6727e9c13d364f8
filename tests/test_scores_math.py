"""The definitions of MISSION.md on every classical compressor (the LMs: tests/test_lm_math.py)."""

from __future__ import annotations

import pytest

from codelen.datasets import RECORD_SEPARATOR, DatasetError, canonical
from codelen.scores import PairLengths, score_document
from models.classical import CODECS, ClassicalCompressor
from models.protocol import Segment

EN = "The river rose overnight and the farmers moved their cattle to the hills before dawn. " * 3
EN_NEAR = EN.replace("cattle", "sheep").replace("dawn", "sunrise")
OTHER = "Quarterly revenue grew 4% as the company shipped its new database engine to customers. " * 3
LIMITS = dict(max_record_bytes=10**6, max_records=1000, max_bytes=10**7)


def lengths(c: ClassicalCompressor, x: str, y: str) -> PairLengths:
    sx, sy = c.encode(x), c.encode(y)
    lx, ly = (b.target_bits for b in c.score([Segment((), sx), Segment((), sy)]))
    yx, xy = c.score([Segment(sx, sy), Segment(sy, sx)])
    return PairLengths(x=lx, y=ly, y_given_x=yx.target_bits, x_given_y=xy.target_bits)


def doc(c: ClassicalCompressor, x: str, y: str) -> dict:
    return score_document(c.info, canonical(x, **LIMITS), canonical(y, **LIMITS), lengths(c, x, y), cached=False)


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_chain_rule_and_prefix(codec: str) -> None:
    c = ClassicalCompressor(codec)
    sx, sy = c.encode(EN), c.encode(OTHER)
    [seg] = c.score([Segment(sx, sy)])
    [alone] = c.score([Segment((), sx)])
    [joint] = c.score([Segment((), sx + sy)])
    assert seg.prefix_bits == alone.target_bits  # C(X) alone == the X part of C(X·Y)
    assert seg.prefix_bits + seg.target_bits == joint.target_bits  # C(X·Y) = C(X) + C(Y|X)


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_scores_are_sane(codec: str) -> None:
    c = ClassicalCompressor(codec)
    same, near, far = doc(c, EN, EN), doc(c, EN, EN_NEAR), doc(c, EN, OTHER)
    for d in (same, near, far):
        assert -0.1 <= d["ncd"] <= 1.1
        cl = d["code_lengths"]
        assert d["shared_information"] == pytest.approx(cl["x"] + cl["y"] - min(cl["xy"], cl["yx"]))
        assert cl["xy"] == cl["x"] + d["conditional"]["y_given_x"]
    assert same["ncd"] < far["ncd"]
    assert near["shared_information"] > far["shared_information"]
    # shared information is symmetric: swapping X and Y changes nothing
    assert doc(c, OTHER, EN)["shared_information"] == far["shared_information"]
    assert doc(c, OTHER, EN)["ncd"] == far["ncd"]


def test_gzip_header_convention_is_stated() -> None:
    info = ClassicalCompressor("gzip").info
    assert "header" in info.convention and info.kind == "classical" and info.context_tokens is None


def test_canonical_serialization() -> None:
    a = canonical(["one", "two"], **LIMITS)
    b = canonical(["one", "two"], **LIMITS)
    assert a == b and a.text == "one" + RECORD_SEPARATOR + "two" and a.n_records == 2
    assert canonical("solo", **LIMITS).sha256 == canonical(["solo"], **LIMITS).sha256
    assert canonical(["one", "two"], **LIMITS).sha256 != canonical(["two", "one"], **LIMITS).sha256
    for bad in ([], "", ["a\x00b"], ["a\x1eb"], ["\ud800"]):
        with pytest.raises(DatasetError):
            canonical(bad, **LIMITS)
    with pytest.raises(DatasetError) as too_big:
        canonical("x" * 11, max_record_bytes=10, max_records=10, max_bytes=100)
    assert too_big.value.too_large
