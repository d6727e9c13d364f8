"""Text classification: split hygiene, fair ties, every method, the API and `codelen eval`."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import Counter

import httpx
import pytest
import torch

from classify import build
from classify.base import Prediction, combine_bits, posterior
from classify.data import Example, load_examples, split
from classify.evaluate import scores
from classify.knn import KnnOptions, vote
from classify.methods import MethodError, resolve_model
from codelen.cli import main as codelen_main
from models.classical import ClassicalCompressor
from models.protocol import Segment, TokenizationError
from tests.conftest import fast_settings, serve

VOCAB = {
    "sport": "match goal team coach season league striker referee stadium win cup final players score".split(),
    "money": "bank stocks market shares profit investor bond interest rates dollar earnings fund trade".split(),
    "space": "rocket orbit nasa planet telescope astronaut moon launch galaxy star mars satellite probe".split(),
}


def synthetic(per_class: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    return [
        Example(" ".join(rng.choice(words) for _ in range(12)), label)
        for label, words in VOCAB.items()
        for _ in range(per_class)
    ]


TRAIN = synthetic(12, seed=1)
TEST = synthetic(5, seed=2)


def accuracy(method: str, compressor, options: dict | None = None) -> float:
    clf = build(method, lambda: compressor, [e.text for e in TRAIN], [e.label for e in TRAIN], options)
    predicted = [p.label for p in clf.predict([e.text for e in TEST])]
    return sum(p == e.label for p, e in zip(predicted, TEST, strict=True)) / len(TEST)


# -- data and split ------------------------------------------------------------------------


def test_split_drops_train_test_duplicates_and_keeps_quotas() -> None:
    examples = [Example(f"text {i % 30}", "ab"[i % 2]) for i in range(120)]  # every text 4 times
    s = split(examples, train_per_class=10, test_per_class=5, seed=0)
    assert Counter(e.label for e in s.test) == {"a": 5, "b": 5}
    assert not {e.text for e in s.train} & {e.text for e in s.test}
    assert s.duplicates_dropped > 0
    assert all(c <= 10 for c in Counter(e.label for e in s.train).values())
    again = split(examples, 10, 5, seed=0)
    assert again.test == s.test and again.train == s.train
    assert split(examples, 10, 5, seed=1).test != s.test


def test_split_never_puts_a_group_on_both_sides() -> None:
    examples = [Example(f"doc {i}", "ab"[i % 2], group=f"g{i // 4}") for i in range(200)]
    for seed in range(5):
        s = split(examples, None, 10, seed=seed)
        assert not {e.group for e in s.train} & {e.group for e in s.test}
        assert len(s.train) + len(s.test) == len(examples)


def test_split_meets_quotas_exactly_with_large_mixed_groups() -> None:
    # 30 groups of 31 examples, labels mixed within each (like reviews grouped by movie): whole
    # groups alone could not hit 25 / 40 per label exactly.
    examples = [Example(f"review {i}", "ab"[(i * 7) % 3 % 2], group=f"movie {i // 31}") for i in range(930)]
    for seed in range(3):
        s = split(examples, train_per_class=40, test_per_class=25, seed=seed)
        assert Counter(e.label for e in s.test) == {"a": 25, "b": 25}
        assert Counter(e.label for e in s.train) == {"a": 40, "b": 40}
        assert not {e.group for e in s.train} & {e.group for e in s.test}
        assert not s.notes


def test_loaders(tmp_path) -> None:
    (tmp_path / "d.csv").write_text('label,text,group\nx,"hello, world",1\ny,bye,2\n')
    assert load_examples(tmp_path / "d.csv") == [Example("hello, world", "x", "1"), Example("bye", "y", "2")]
    (tmp_path / "r8.txt").write_text("earn\tprofit rose\ngrain\twheat crop\n")
    assert load_examples(tmp_path / "r8.txt")[1] == Example("wheat crop", "grain")
    (tmp_path / "sms.tsv").write_text('Label\tSMS\nham\tok "lar"\nspam\tWIN now\n')
    assert load_examples(tmp_path / "sms.tsv")[0] == Example('ok "lar"', "ham")
    (tmp_path / "ag.csv").write_text('"3","Title","First line\\second line"\n')
    assert load_examples(tmp_path / "ag.csv") == [Example("Title. First line\nsecond line", "3")]
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 2, "group": "g"}\n')
    assert load_examples(tmp_path / "d.jsonl")[1] == Example("b", "2", "g")


def test_scores_macro_f1_and_confusion() -> None:
    acc, f1, confusion = scores(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b"])
    assert acc == 0.75 and confusion == [[1, 1], [0, 2]]
    assert f1 == pytest.approx((2 / 3 + 0.8) / 2)


# -- fair ties -----------------------------------------------------------------------------


def test_a_tie_is_right_only_by_chance_and_reproducibly() -> None:
    """Two neighbours at the same distance with different labels: never 'correct if either is'."""
    opts = KnnOptions(k=1, seed=0)
    picks = [
        vote([0.3, 0.3, 0.9], ["right", "wrong", "wrong"], ["right", "wrong"], opts, random.Random(s)).label
        for s in range(400)
    ]
    assert 0.4 < picks.count("right") / len(picks) < 0.6
    assert picks == [
        vote([0.3, 0.3, 0.9], ["right", "wrong", "wrong"], ["right", "wrong"], opts, random.Random(s)).label
        for s in range(400)
    ]
    two = KnnOptions(k=2)
    shares = vote([0.1, 0.2], ["a", "b"], ["a", "b"], two, random.Random(0)).scores
    assert shares == {"a": 0.5, "b": 0.5}
    decrement = KnnOptions(k=2, ties="decrement")
    assert {vote([0.1, 0.2], ["a", "b"], ["a", "b"], decrement, random.Random(s)).label for s in range(50)} == {"a"}


def test_knn_tie_between_identical_examples_is_seeded() -> None:
    gzip = ClassicalCompressor("gzip")
    texts = [f"same text {i}" for i in range(40)]
    clf = build("knn", lambda: gzip, texts * 2, ["a"] * 40 + ["b"] * 40, {"seed": 3})
    labels = [p.label for p in clf.predict(texts)]
    assert 0.2 < labels.count("a") / len(labels) < 0.8  # exact ties: chance, not the first label
    assert labels == [p.label for p in clf.predict(texts[::-1])][::-1]  # same answer in any batch


# -- methods -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "model", "options"),
    [
        ("knn", "gzip", {}),
        ("knn", "zstd", {"k": 3, "weighting": "distance", "symmetric": True}),
        ("gzip-knn", "gzip", {"k": 2, "ties": "decrement"}),
        ("conditional", "gzip", {}),
        ("conditional", "zlib", {"max_examples": 4, "max_windows": None, "combine": "logsumexp"}),
        ("conditional", "gzip", {"select": "nearest", "max_examples": 5}),
        ("zstd-dict", None, {}),
        ("zstd-dict", None, {"dict_type": "trained", "dict_size": 2048}),
        ("fusion", "zstd", {}),
        ("fusion", "zlib", {"normalize": "relative", "weight": 0.5, "model_options": {"max_windows": None}}),
    ],
)
def test_methods_separate_clear_classes(method: str, model: str | None, options: dict) -> None:
    compressor = ClassicalCompressor(model) if model else None
    assert accuracy(method, compressor, options) >= 0.9


def test_conditional_bits_are_the_segment_target_bits() -> None:
    gzip = ClassicalCompressor("gzip")
    clf = build("conditional", lambda: gzip, [e.text for e in TRAIN], [e.label for e in TRAIN], {"unconditional": True})
    text = TEST[0].text
    (pred,) = clf.predict([text])
    sep = clf.opts.separator
    data = sep.join(clf._order["money"]) + sep
    (direct,) = gzip.score([Segment(data.encode(), text.encode())])
    alone = gzip.bits(text.encode())
    assert pred.bits["money"] == pytest.approx(alone - direct.target_bits)
    assert sum(pred.scores.values()) == pytest.approx(1.0)


def test_fusion_is_the_sum_of_its_experts() -> None:
    zstd = ClassicalCompressor("zstd")
    texts, labels = [e.text for e in TRAIN], [e.label for e in TRAIN]
    relative = {"weight": 2.0, "normalize": "relative", "model_options": {"max_examples": 3}}
    clf = build("fusion", lambda: zstd, texts, labels, relative)
    summed = build("fusion", lambda: zstd, texts, labels, {"weight": 2.0, "model_options": {"max_examples": 3}})
    # each expert is the conditional method with its own options, and C(x) is the segment ((), x)
    model = build("conditional", lambda: zstd, texts, labels, {"select": "nearest", "max_examples": 3})
    gzip_expert = build("conditional", lambda: ClassicalCompressor("gzip"), texts, labels, {})
    x = TEST[4].text
    (pred,) = clf.predict([x])
    (m,), (g,) = model.predict([x]), gzip_expert.predict([x])
    cm, cg = ClassicalCompressor("zstd").bits(x.encode()), ClassicalCompressor("gzip").bits(x.encode())
    for lab in VOCAB:
        assert pred.bits[lab] == pytest.approx(m.bits[lab] + 2.0 * cm / cg * g.bits[lab])
    assert pred.label == min(pred.bits, key=pred.bits.get)
    (raw,) = summed.predict([x])  # the default: plain sum of code lengths
    assert raw.bits == {lab: pytest.approx(m.bits[lab] + 2.0 * g.bits[lab]) for lab in VOCAB}
    assert sum(pred.scores.values()) == pytest.approx(1.0)
    assert clf.predict([x]) == [pred]  # deterministic
    # weight 0 is the model's expert alone
    alone = build("fusion", lambda: zstd, texts, labels, {"weight": 0, "model_options": {"max_examples": 3}})
    assert [p.label for p in alone.predict([e.text for e in TEST])] == [
        p.label for p in model.predict([e.text for e in TEST])
    ]


def test_fusion_options_are_checked() -> None:
    from classify.methods import MethodError, parse_options

    with pytest.raises(MethodError, match="model_options/select"):
        parse_options("fusion", {"model_options": {"select": "bogus"}})
    with pytest.raises(MethodError):
        parse_options("fusion", {"classical": "brotli"})
    opts = parse_options("fusion", {})
    assert opts.model_options == {"select": "nearest", "max_examples": 8} and opts.classical == "gzip"
    opts = parse_options("fusion", {"model_options": {"max_examples": 16}})  # over the defaults
    assert opts.model_options == {"select": "nearest", "max_examples": 16}


def test_classical_score_reuses_prefixes_with_unchanged_lengths() -> None:
    """score() compresses each distinct prefix once (gzip/zlib continue a copied deflate state);
    every length equals the one-shot definition C(X·Y) - C(X), byte for byte."""
    rng = random.Random(7)
    words = [w for ws in VOCAB.values() for w in ws]
    prefixes = [" ".join(rng.choice(words) for _ in range(n)).encode() for n in (0, 1, 50, 3000)]
    prefixes.append(bytes(rng.randrange(256) for _ in range(4000)))  # incompressible
    segments = [
        Segment(p, " ".join(rng.choice(words) for _ in range(rng.randint(0, 60))).encode())
        for p in prefixes
        for _ in range(5)
    ]
    for codec in ("gzip", "zlib", "bz2", "lzma", "zstd"):
        c = ClassicalCompressor(codec)
        got = c.score(segments)
        for seg, b in zip(segments, got, strict=True):
            cx = c.bits(bytes(seg.prefix))
            assert b.prefix_bits == cx
            assert b.target_bits == c.bits(bytes(seg.prefix) + bytes(seg.target)) - cx, codec


def test_fusion_with_tiny_lm(tiny) -> None:
    clf = build("fusion", lambda: tiny, [e.text for e in TRAIN], [e.label for e in TRAIN], {})
    preds = clf.predict([e.text for e in TEST[:3]])
    assert all(p.label in VOCAB and sum(p.scores.values()) == pytest.approx(1.0) for p in preds)
    assert preds == clf.predict([e.text for e in TEST[:3]])


def test_combination_rules() -> None:
    values = [100.0, 103.0, 110.0]
    assert combine_bits(values, "min") == 100.0
    assert combine_bits(values, "mean") == pytest.approx(313 / 3)
    mix = combine_bits(values, "logsumexp")
    assert 100.0 <= mix <= 100.0 + math.log2(3)
    assert posterior({"a": 10.0, "b": 11.0}) == pytest.approx({"a": 2 / 3, "b": 1 / 3})


@pytest.fixture(scope="module")
def tiny():
    tiny_module = pytest.importorskip("models.tiny")
    return tiny_module.tiny_compressor(context_tokens=256, stride=128)


def test_conditional_with_tiny_lm_uses_windows_and_exact_bits(tiny) -> None:
    texts, labels = [e.text for e in TRAIN], [e.label for e in TRAIN]
    clf = build("conditional", lambda: tiny, texts, labels, {"max_windows": None, "combine": "min"})
    assert all(n > 1 for n in clf.windows().values())  # 12 examples of ~80 bytes do not fit one window
    assert all(len(w) <= clf.budget for ws in clf._windows.values() for w in ws)
    preds = clf.predict([e.text for e in TEST[:3]])
    target = tiny.encode(TEST[0].text)
    direct = [b.target_bits for b in tiny.score([Segment(w, target) for w in clf._windows["space"]])]
    assert preds[0].bits["space"] == pytest.approx(min(direct), abs=1e-3)
    assert preds == clf.predict([e.text for e in TEST[:3]])
    assert {p.label for p in preds} <= set(VOCAB)


def test_knn_with_tiny_lm(tiny) -> None:
    clf = build("knn", lambda: tiny, [e.text for e in TRAIN[:6]], [e.label for e in TRAIN[:6]], {"k": 3})
    (pred,) = clf.predict([TEST[0].text])
    assert pred.label in VOCAB and sum(pred.scores.values()) == pytest.approx(1.0)
    assert all(0.0 <= d < 1.5 for d in clf.distances(TEST[0].text))


# -- API -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api():
    # a create or predict answers once its job is done (a probe's cross-validation can take a minute here)
    with serve(fast_settings(max_predict_texts=4, max_classifier_examples=50, score_wait_s=600)) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client


def test_classifier_lifecycle(api: httpx.Client) -> None:
    examples = [{"text": e.text, "label": e.label} for e in TRAIN]
    r = api.post("/v1/classifiers", json={"model": "gzip", "method": "conditional", "examples": examples})
    assert r.status_code == 201, r.text
    info = r.json()
    assert r.headers["location"] == f"/v1/classifiers/{info['id']}"
    assert info["labels"] == sorted(VOCAB) and info["examples"] == len(TRAIN) and info["options"]["combine"] == "min"
    r = api.post(f"/v1/classifiers/{info['id']}/predict", json={"texts": [e.text for e in TEST[:4]]})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["label"] for p in preds] == [e.label for e in TEST[:4]]
    assert set(preds[0]["scores"]) == set(VOCAB) and set(preds[0]["bits"]) == set(VOCAB)
    assert api.get(f"/v1/classifiers/{info['id']}").json() == info
    assert api.delete(f"/v1/classifiers/{info['id']}").status_code == 200
    gone = api.get(f"/v1/classifiers/{info['id']}")
    assert gone.status_code == 404 and gone.headers["content-type"] == "application/problem+json"
    assert api.post(f"/v1/classifiers/{info['id']}/predict", json={"texts": ["x"]}).status_code == 404


@pytest.mark.parametrize("method", ["knn", "gzip-knn", "zstd-dict", "fusion"])
def test_other_methods_over_http(api: httpx.Client, method: str) -> None:
    examples = [{"text": e.text, "label": e.label} for e in TRAIN]
    body = {"method": method, "examples": examples, "options": {"seed": 1}}
    if method in ("knn", "fusion"):
        body["model"] = "zstd"
    info = api.post("/v1/classifiers", json=body).json()
    preds = api.post(f"/v1/classifiers/{info['id']}/predict", json={"texts": [TEST[0].text]}).json()["predictions"]
    assert preds[0]["label"] == TEST[0].label


def test_fusion_over_http_with_an_lm(api: httpx.Client) -> None:
    examples = [{"text": e.text, "label": e.label} for e in TRAIN]
    body = {"model": "tiny-random", "method": "fusion", "examples": examples, "options": {"weight": 1.5}}
    r = api.post("/v1/classifiers", json=body)
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["method"] == "fusion" and info["options"]["weight"] == 1.5
    assert info["options"]["model_options"] == {"select": "nearest", "max_examples": 8}
    r = api.post(f"/v1/classifiers/{info['id']}/predict", json={"texts": [e.text for e in TEST[:2]]})
    assert r.status_code == 200, r.text
    for p in r.json()["predictions"]:
        assert p["label"] in VOCAB and set(p["bits"]) == set(VOCAB)
        assert sum(p["scores"].values()) == pytest.approx(1.0)
    bad = {**body, "options": {"model_options": {"combine": "max"}}}
    assert api.post("/v1/classifiers", json=bad).status_code == 422


def test_knn_lm_over_http(api: httpx.Client) -> None:
    examples = [{"text": e.text, "label": e.label} for e in TRAIN]
    r = api.post("/v1/classifiers", json={"model": "tiny-random", "method": "knn-lm", "examples": examples})
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["options"]["k"] == 256 and info["options"]["classical_weight"] == 0.25
    r = api.post(f"/v1/classifiers/{info['id']}/predict", json={"texts": [e.text for e in TEST[:3]]})
    assert r.status_code == 200, r.text
    assert [p["label"] for p in r.json()["predictions"]] == [e.label for e in TEST[:3]]


def test_classifier_errors(api: httpx.Client) -> None:
    ok = [{"text": "a b c", "label": "x"}, {"text": "d e f", "label": "y"}]

    def create(**body) -> httpx.Response:
        return api.post("/v1/classifiers", json={"examples": ok, **body})

    assert create(model="no-such-model").status_code == 404
    for bad in (
        {"method": "magic"},
        {"options": {"k": 0}, "method": "knn"},
        {"options": {"nonsense": 1}},
        {"method": "zstd-dict", "model": "gzip"},
        {"method": "knn-lm", "model": "gzip"},
        {"method": "knn-lm", "model": "tiny-random", "options": {"memory_weight": 1.0}},
        {"examples": []},
        {"examples": [{"text": "a\x1eb", "label": "x"}]},
        {"examples": [{"text": "a", "label": 3}]},
    ):
        r = create(**bad)
        assert r.status_code == 422, (bad, r.text)
        assert r.headers["content-type"] == "application/problem+json"
    assert create(examples=ok * 30).status_code == 413
    cid = create(model="gzip").json()["id"]
    assert api.post(f"/v1/classifiers/{cid}/predict", json={"texts": ["t"] * 5}).status_code == 413
    assert api.post(f"/v1/classifiers/{cid}/predict", json={"texts": []}).status_code == 422
    assert api.post(f"/v1/classifiers/{cid}/predict", json={"texts": "not a list"}).status_code == 422


# -- codelen eval --------------------------------------------------------------------------


def test_eval_cli(tmp_path, capsys) -> None:
    data = tmp_path / "data.csv"
    rows = ["label,text", *(f"{e.label},{e.text}" for e in synthetic(20, seed=5))]
    rows.append(f"{TRAIN[0].label},{TRAIN[0].text}")  # an exact duplicate of nothing in test
    data.write_text("\n".join(rows) + "\n")
    png = tmp_path / "confusion.png"
    args = [
        "eval",
        "--data",
        str(data),
        "--method",
        "conditional",
        "--model",
        "gzip",
        "--train-per-class",
        "10",
        "--test-per-class",
        "5",
        "--seed",
        "0",
        "--json",
        "--png",
        str(png),
        "--baselines",
        "--quiet",
    ]
    assert codelen_main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in doc["results"]] == ["conditional", "gzip-knn", "zstd-dict"]
    assert doc["test"] == 15 and doc["train"] == 30
    assert all(r["accuracy"] >= 0.8 and sum(map(sum, r["confusion"])) == 15 for r in doc["results"])
    assert png.stat().st_size > 1000
    assert codelen_main(["eval", "--data", str(data), "--method", "gzip-knn", "--k", "3", "--test-per-class", "3"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "confusion matrix" in out
    fusion = ["eval", "--data", str(data), "--method", "fusion", "--model", "zstd", "--test-per-class", "3"]
    assert codelen_main([*fusion, "--option", "weight=0.5", "--json", "--quiet"]) == 0
    (result,) = json.loads(capsys.readouterr().out)["results"]
    assert result["method"] == "fusion" and result["options"]["weight"] == 0.5 and result["accuracy"] >= 0.8
    probe = ["eval", "--data", str(data), "--method", "probe", "--model", "tiny-random", "--test-per-class", "3"]
    assert codelen_main([*probe, "--option", "folds=3", "--json", "--quiet"]) == 0
    (result,) = json.loads(capsys.readouterr().out)["results"]
    fitted = result["fitted"]  # what cross-validation chose is in the report
    assert str(fitted["weight_decay"]) in fitted["cv_accuracy"] and len(fitted["cv_accuracy"]) == 7
    assert codelen_main([*probe, "--option", "weight_decay=0.5", "--quiet"]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("probe fitted: ")]
    chosen = json.loads(line.removeprefix("probe fitted: "))
    assert chosen["weight_decay"] == 0.5 and chosen["features"] in chosen["features_cv_accuracy"]


def test_evaluate_reports_the_examples_read_while_fitting_then_the_texts(tiny) -> None:
    from classify.data import Split
    from classify.evaluate import evaluate

    data = Split(list(TRAIN), list(TEST[:5]), 0, [])
    events: list[tuple[str, int, int]] = []
    report = evaluate(
        data, "probe", "tiny-random", lambda: tiny, {"features": "mean_last"}, lambda *e: events.append(e)
    )
    fit = [e for e in events if e[0] == "examples"]
    assert fit[-1] == ("examples", len(TRAIN), len(TRAIN)) and [e[1] for e in fit] == sorted(e[1] for e in fit)
    assert events[len(fit) :] == [("texts", 5, 5)]  # prediction reports texts only, and after the fit
    assert report.n_train == len(TRAIN) and report.fitted["features"] == "mean_last"
    events.clear()
    evaluate(data, "zstd-dict", "zstd", lambda: None, None, lambda *e: events.append(e))  # type: ignore[arg-type, return-value]
    assert events == [("texts", 5, 5)]


# -- knn-lm --------------------------------------------------------------------------------


def test_knn_lm_bits_are_the_mixture_code_length(tiny) -> None:
    """C(x | label) = -Σ log2((1-λ) p_LM + λ p_mem), p_mem by brute force over the label's memory
    (k covers the whole memory: which of several equidistant keys top-k keeps is not defined, and
    every text's first token has the same state)."""
    texts, labels = [e.text for e in TRAIN], [e.label for e in TRAIN]
    opts = {"k": 4096, "memory_weight": 0.7, "temperature": 0.1, "classical_weight": 0}
    clf = build("knn-lm", lambda: tiny, texts, labels, opts)
    assert sum(clf.memory_tokens.values()) == sum(len(tiny.encode(t)) for t in texts)
    x = tiny.encode(TEST[0].text)
    ((bits, states),) = tiny.token_states([x])
    (pred,) = clf.predict([TEST[0].text])
    q = (states - clf._mean) / clf._scale
    for lab in VOCAB:
        keys, values = clf.keys[lab], clf.values[lab].tolist()
        total = 0.0
        for i, token in enumerate(x):
            d = sorted((float(((q[i] - key) ** 2).sum()), v) for key, v in zip(keys, values, strict=True))
            w = [math.exp(-(dd - d[0][0]) / clf.temperature) for dd, _ in d]
            p_mem = sum(wi for wi, (_, v) in zip(w, d, strict=True) if v == token) / sum(w)
            total -= math.log2(0.3 * 2.0 ** -float(bits[i]) + 0.7 * p_mem)
        assert pred.bits[lab] == pytest.approx(total, rel=1e-4)
    assert pred.label == min(pred.bits, key=pred.bits.get)


def test_knn_lm_separates_clear_classes_and_is_batch_independent(tiny) -> None:
    clf = build("knn-lm", lambda: tiny, [e.text for e in TRAIN], [e.label for e in TRAIN], {"classical_weight": 0})
    texts = [e.text for e in TEST]
    preds = clf.predict(texts)
    assert sum(p.label == e.label for p, e in zip(preds, TEST, strict=True)) / len(TEST) >= 0.9
    assert [clf.predict([t])[0] for t in texts[:4]] == preds[:4]
    with_gzip = build(
        "knn-lm", lambda: tiny, [e.text for e in TRAIN], [e.label for e in TRAIN], {"classical_weight": 0.5}
    )
    gz = build("conditional", lambda: ClassicalCompressor("gzip"), [e.text for e in TRAIN], [e.label for e in TRAIN])
    (both,), (g,) = with_gzip.predict(texts[:1]), gz.predict(texts[:1])
    assert both.bits == pytest.approx({lab: preds[0].bits[lab] + 0.5 * g.bits[lab] for lab in VOCAB})


def test_knn_lm_memory_budget_keeps_whole_examples(tiny) -> None:
    texts, labels = [e.text for e in TRAIN], [e.label for e in TRAIN]
    clf = build("knn-lm", lambda: tiny, texts, labels, {"max_memory_tokens": 3 * 200})
    sizes = sorted(len(tiny.encode(t)) for t in texts)
    for lab in VOCAB:
        assert 0 < clf.memory_tokens[lab] <= 200 and len(clf.values[lab]) == clf.memory_tokens[lab]
        assert clf.memory_tokens[lab] > 200 - sizes[-1]  # filled until the next example would not fit


def test_knn_lm_long_texts_and_a_tiny_memory(tiny, monkeypatch) -> None:
    """A label whose examples all exceed its share of the memory keeps the start of one; a long
    text's distances run in row chunks with the same bits as in one piece (to float rounding)."""
    import classify.knn_lm as knn_lm

    texts, labels = [e.text for e in TRAIN], [e.label for e in TRAIN]
    clf = build("knn-lm", lambda: tiny, texts, labels, {"max_memory_tokens": 3 * 20, "classical_weight": 0})
    assert all(clf.memory_tokens[lab] == 20 == len(clf.values[lab]) for lab in VOCAB)
    long_text = " ".join(e.text for e in TEST[:3])
    whole = clf.predict([long_text])[0].bits
    monkeypatch.setattr(knn_lm, "_DISTANCE_ELEMENTS", 7 * 20)  # 7 query rows per chunk
    assert clf.predict([long_text])[0].bits == pytest.approx(whole, rel=1e-6)  # float rounding of cdist


def test_knn_lm_needs_a_language_model() -> None:
    with pytest.raises(MethodError, match="needs a language model"):
        resolve_model("knn-lm", "gzip", "smollm2-135m")
    with pytest.raises(MethodError, match="needs a language model"):
        build("knn-lm", lambda: ClassicalCompressor("zstd"), ["a b", "c d"], ["x", "y"])


# -- probe ---------------------------------------------------------------------------------


def probe_bits_by_hand(features, texts: list[str], labels: list[str], x: str, weight_decay: float) -> list[float]:
    """-log2 softmax(W·z + b) of x, z its features standardized over the examples' and (W, b) the
    penalized logistic regression fitted here on the examples: the probe, recomputed outside it."""
    from classify.probe import fit_linear

    raw = torch.stack([features(t) for t in texts])
    mean, scale = raw.mean(0), raw.std(0) + 1e-3
    y = torch.tensor([sorted(VOCAB).index(lab) for lab in labels])
    w, b = fit_linear((raw - mean) / scale, y, len(VOCAB), weight_decay, 200)
    logits = ((features(x) - mean) / scale) @ w + b
    return (-torch.log_softmax(logits, 0) / math.log(2)).tolist()


def test_probe_bits_are_the_label_code_length_of_a_fitted_linear_coder(tiny) -> None:
    """C(y | x) = -log2 softmax(W·z + b)_y, z the standardized mean state of x, (W, b) the
    penalized logistic regression on the examples: refit here from the engine's own states."""

    texts, labels = [e.text for e in TRAIN], [e.label for e in TRAIN]
    clf = build("probe", lambda: tiny, texts, labels, {"weight_decay": 0.1, "features": "mean", "classical_weight": 0})
    assert clf.weight_decay == 0.1 and clf.cv_accuracy == {} and clf.features == "mean"

    def mean_state(t: str) -> torch.Tensor:
        ((_, states),) = tiny.token_states([tiny.encode(t)])
        return states.double().mean(0)

    x = TEST[0].text
    expected = probe_bits_by_hand(mean_state, texts, labels, x, 0.1)
    (pred,) = clf.predict([x])
    assert [pred.bits[lab] for lab in sorted(VOCAB)] == pytest.approx(expected, abs=1e-6)
    assert sum(2.0**-b for b in pred.bits.values()) == pytest.approx(1.0)  # a code for the label
    assert pred.scores == pytest.approx({lab: 2.0**-b for lab, b in pred.bits.items()})


def test_probe_mean_last_adds_the_state_after_the_text_from_the_middle_blocks(tiny) -> None:
    """features mean_last: z = [mean final state, mean over the blocks in last_depth of the state
    after the text's last token], the latter read here from a plain HF forward over BOS + text."""
    from classify.probe import last_blocks

    assert last_blocks(30, (0.5, 0.75)) == tuple(range(15, 23)) and last_blocks(18, (0.5, 0.75)) == (9, 10, 11, 12, 13)
    assert last_blocks(2, (0.5, 0.75)) == (1,) and last_blocks(2, (1.0, 1.0)) == (2,)
    texts, labels = [e.text for e in TRAIN], [e.label for e in TRAIN]
    opts = {"weight_decay": 0.1, "features": "mean_last", "last_depth": [0.5, 0.5], "classical_weight": 0}
    clf = build("probe", lambda: tiny, texts, labels, opts)
    body = tiny.model.base_model

    def features(t: str) -> torch.Tensor:
        with torch.inference_mode():
            hidden = body(input_ids=torch.tensor([[tiny.start_token_id, *tiny.encode(t)]]), output_hidden_states=True)
        # block 1's output after the whole text; the mean of the final states that predict its tokens
        return torch.cat([hidden.last_hidden_state[0, :-1].mean(0), hidden.hidden_states[1][0, -1]]).double()

    x = TEST[1].text
    expected = probe_bits_by_hand(features, texts, labels, x, 0.1)
    (pred,) = clf.predict([x])
    assert [pred.bits[lab] for lab in sorted(VOCAB)] == pytest.approx(expected, abs=1e-4)
    assert clf.fitted() == {"features": "mean_last", "weight_decay": 0.1, "classical_weight": 0.0}


def test_probe_times_a_zstd_dictionary_with_its_weight_chosen_on_held_out_folds(tiny) -> None:
    """bits = C_probe(y | x) + γ · C_zstd-dict(x | y): the same probe, plus γ times the bits of the
    zstd-dict classifier of the same examples. "auto" scores every γ on the held-out folds."""
    from classify.probe import CLASSICAL_WEIGHTS

    texts, labels = [e.text for e in TRAIN], [e.label for e in TRAIN]
    fixed = {"weight_decay": 0.1, "features": "mean"}
    alone = build("probe", lambda: tiny, texts, labels, fixed | {"classical_weight": 0})
    product = build("probe", lambda: tiny, texts, labels, fixed | {"classical_weight": 0.5})
    zstd = build("zstd-dict", lambda: None, texts, labels)
    x = [e.text for e in TEST[:4]]
    for a, p, z in zip(alone.bits(x), product.bits(x), [q.bits for q in zstd.predict(x)], strict=True):
        assert p == pytest.approx({lab: a[lab] + 0.5 * z[lab] for lab in a})
    auto = build("probe", lambda: tiny, texts, labels, fixed | {"folds": 3})
    tried = auto.classical_cv_accuracy
    assert set(tried) == set(CLASSICAL_WEIGHTS) and auto.fitted()["classical_weight"] == auto.classical_weight
    best = max(tried.values())  # the smallest γ within one standard error of the best
    within = [g for g, a in tried.items() if a >= best - math.sqrt(best * (1 - best) / len(texts))]
    assert auto.classical_weight == min(within)
    # a fold whose other examples miss a label: no dictionary for it, so no product
    one_each = build(
        "probe", lambda: tiny, texts[:3] + texts[12:15] + texts[24:25], labels[:3] + labels[12:15] + labels[24:25]
    )
    assert sorted(set(labels[:3] + labels[12:15] + labels[24:25])) == sorted(VOCAB)
    assert one_each.classical_weight == 0.0 and one_each.classical_cv_accuracy == {}


def test_probe_beats_chance_with_random_weights_and_is_batch_independent(tiny) -> None:
    clf = build("probe", lambda: tiny, [e.text for e in TRAIN], [e.label for e in TRAIN])
    texts = [e.text for e in TEST]
    preds = clf.predict(texts)
    # The tiny model's weights are random: its mean state carries the words only by accident, so
    # this asks for well above chance (1/3); test_e2e_real_model asks a real model for more.
    assert sum(p.label == e.label for p, e in zip(preds, TEST, strict=True)) / len(TEST) >= 0.6
    assert [clf.predict([t])[0] for t in texts[:4]] == preds[:4]


def test_probe_weight_decay_by_cross_validation_on_the_examples(tiny) -> None:
    from classify.probe import WEIGHT_DECAYS

    texts, labels = [e.text for e in TRAIN], [e.label for e in TRAIN]
    clf = build("probe", lambda: tiny, texts, labels, {"folds": 3})
    assert set(clf.cv_accuracy) == set(WEIGHT_DECAYS)
    best = max(clf.cv_accuracy.values())
    assert clf.weight_decay == max(wd for wd, a in clf.cv_accuracy.items() if a == best)
    # the features too: the chosen set has the best accuracy of both, ties to "mean"
    by_features = clf.features_cv_accuracy
    assert set(clf.fitted()["features_cv_accuracy"]) == set(by_features)
    assert set(by_features) == {"mean", "mean_last"} and by_features[clf.features] == best == max(by_features.values())
    assert clf.features == "mean" or by_features["mean"] < best
    again = build("probe", lambda: tiny, texts, labels, {"folds": 3})
    assert again.cv_accuracy == clf.cv_accuracy  # seeded folds: the same choice in every process
    one = build("probe", lambda: tiny, texts[:1], labels[:1])  # nothing to cross-validate on
    assert one.weight_decay == 1.0 and one.predict(["anything"])[0].label == labels[0]
    few = build("probe", lambda: tiny, texts[::12], labels[::12])  # 3 examples, 3 labels, 5 folds
    assert len(few.predict(texts[:2])) == 2 and set(few.cv_accuracy) == set(WEIGHT_DECAYS)


def test_probe_needs_a_language_model_and_valid_options(tiny) -> None:
    with pytest.raises(MethodError, match="needs a language model"):
        resolve_model("probe", "gzip", "smollm2-135m")
    with pytest.raises(MethodError, match="needs a language model"):
        build("probe", lambda: ClassicalCompressor("zstd"), ["a b", "c d"], ["x", "y"])
    for bad in (
        {"weight_decay": -1.0},
        {"weight_decay": "big"},
        {"folds": 1},
        {"max_tokens": 0},
        {"features": "max"},
        {"last_depth": [0.75, 0.5]},
        {"last_depth": [0.0, 0.5]},
        {"last_depth": [0.5]},
        {"classical_weight": -0.1},
        {"classical_weight": "some"},
    ):
        with pytest.raises(MethodError, match="options/"):
            build("probe", lambda: tiny, ["a b", "c d"], ["x", "y"], bad)


def test_probe_reads_the_first_max_tokens_of_a_text(tiny) -> None:
    """The byte tokenizer makes a token a character: with max_tokens 12, a text and its first 12
    characters get the same bits; without the cap the rest of the text counts."""
    texts, labels = [e.text for e in TRAIN], [e.label for e in TRAIN]
    long = "rocket orbit nasa planet telescope astronaut moon launch"
    # (the zstd dictionaries, cheap, read the whole text: classical_weight 0 leaves the LM alone)
    capped = build("probe", lambda: tiny, texts, labels, {"weight_decay": 0.1, "max_tokens": 12, "classical_weight": 0})
    assert capped.bits([long]) == capped.bits([long[:12]])
    whole = build(
        "probe", lambda: tiny, texts, labels, {"weight_decay": 0.1, "max_tokens": None, "classical_weight": 0}
    )
    assert whole.bits([long]) != whole.bits([long[:12]])


def test_probe_over_http(api: httpx.Client) -> None:
    examples = [{"text": e.text, "label": e.label} for e in TRAIN]
    r = api.post("/v1/classifiers", json={"model": "tiny-random", "method": "probe", "examples": examples})
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["method"] == "probe" and info["options"]["weight_decay"] == "auto"
    fitted = info["fitted"]  # the cross-validated choice, also on GET
    assert fitted["weight_decay"] == max(
        float(wd) for wd, a in fitted["cv_accuracy"].items() if a == max(fitted["cv_accuracy"].values())
    )
    assert api.get(f"/v1/classifiers/{info['id']}").json()["fitted"] == fitted
    r = api.post(f"/v1/classifiers/{info['id']}/predict", json={"texts": [e.text for e in TEST[:3]]})
    assert r.status_code == 200, r.text
    assert [p["label"] for p in r.json()["predictions"]] == [e.label for e in TEST[:3]]
    bad = {"model": "tiny-random", "method": "probe", "examples": examples, "options": {"folds": 0}}
    r = api.post("/v1/classifiers", json=bad)
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"


# -- prediction jobs -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def jobs_api():
    settings = fast_settings(max_predict_texts=4, max_prediction_job_texts=40)
    with serve(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


def gzip_classifier(client: httpx.Client) -> str:
    examples = [{"text": e.text, "label": e.label} for e in TRAIN]
    r = client.post("/v1/classifiers", json={"model": "gzip", "method": "conditional", "examples": examples})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def wait_prediction(client: httpx.Client, location: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        r = client.get(location)
        assert r.status_code == 200, r.text
        job = r.json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"prediction job did not finish: {job}")


def test_prediction_job_equals_sync_predict(jobs_api: httpx.Client) -> None:
    cid = gzip_classifier(jobs_api)
    texts = [e.text for e in TEST[:10]]
    r = jobs_api.post(f"/v1/classifiers/{cid}/predictions", json={"texts": texts})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/classifiers/{cid}/predictions/{job['id']}"
    assert job["classifier"] == cid and job["status"] == "queued" and (job["done"], job["total"]) == (0, 10)
    assert job["updated_at"] >= job["created_at"] > 0
    done = wait_prediction(jobs_api, r.headers["location"])
    assert done["status"] == "succeeded", done
    assert done["done"] == done["total"] == 10 and "error" not in done
    sync = []
    for i in range(0, len(texts), 4):  # the sync path takes at most 4 texts here
        s = jobs_api.post(f"/v1/classifiers/{cid}/predict", json={"texts": texts[i : i + 4]})
        assert s.status_code == 200, s.text
        sync += s.json()["predictions"]
    assert done["predictions"] == sync
    assert [p["label"] for p in done["predictions"]] == [e.label for e in TEST[:10]]


def test_prediction_job_above_the_sync_limit(jobs_api: httpx.Client) -> None:
    cid = gzip_classifier(jobs_api)
    texts = [e.text for e in synthetic(11, seed=9)]  # 33 texts: 3 chunks, the last one partial
    assert jobs_api.post(f"/v1/classifiers/{cid}/predict", json={"texts": texts}).status_code == 413
    r = jobs_api.post(f"/v1/classifiers/{cid}/predictions", json={"texts": texts})
    assert r.status_code == 202, r.text
    done = wait_prediction(jobs_api, r.headers["location"])
    assert done["status"] == "succeeded" and done["done"] == done["total"] == 33
    assert len(done["predictions"]) == 33
    assert sum(p["label"] == e.label for p, e in zip(done["predictions"], synthetic(11, seed=9), strict=True)) >= 30


def test_prediction_job_errors(jobs_api: httpx.Client) -> None:
    cid = gzip_classifier(jobs_api)

    def submit(body: object, classifier: str = cid) -> httpx.Response:
        r = jobs_api.post(f"/v1/classifiers/{classifier}/predictions", json=body)
        assert r.headers["content-type"] == "application/problem+json", r.text
        return r

    assert submit({"texts": ["a b"]}, classifier="no-such-classifier").status_code == 404
    for bad in ({"texts": []}, {"texts": "not a list"}, {"texts": ["ok", "a\x00b"]}, {"texts": ["a\x1eb"]}):
        r = submit(bad)
        assert r.status_code == 422, (bad, r.text)
    assert submit({"texts": ["ok", "a\x1eb"]}).json()["pointer"] == "/texts/1"
    assert submit({"texts": ["t"] * 41}).status_code == 413
    r = jobs_api.get(f"/v1/classifiers/{cid}/predictions/no-such-job")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    # a job is found only under its own classifier
    other = gzip_classifier(jobs_api)
    job = jobs_api.post(f"/v1/classifiers/{cid}/predictions", json={"texts": ["a b"]}).json()
    assert jobs_api.get(f"/v1/classifiers/{other}/predictions/{job['id']}").status_code == 404
    assert wait_prediction(jobs_api, f"/v1/classifiers/{cid}/predictions/{job['id']}")["status"] == "succeeded"




def test_prediction_job_is_a_job_of_v1_jobs(jobs_api: httpx.Client) -> None:
    """The same job at /v1/jobs: progress in texts, results as JSON and JSON lines, the
    Idempotency-Key naming one job, DELETE of a finished one forgetting it."""
    cid = gzip_classifier(jobs_api)
    texts = [e.text for e in TEST[:10]]
    key = {"Idempotency-Key": f"predict-{cid}"}
    first = jobs_api.post(f"/v1/classifiers/{cid}/predictions", json={"texts": texts}, headers=key)
    again = jobs_api.post(f"/v1/classifiers/{cid}/predictions", json={"texts": texts}, headers=key)
    assert first.status_code == again.status_code == 202 and first.json()["id"] == again.json()["id"]
    other = jobs_api.post(f"/v1/classifiers/{cid}/predictions", json={"texts": texts[:3]}, headers=key)
    assert other.status_code == 409 and other.headers["content-type"] == "application/problem+json"
    job_id = first.json()["id"]
    done = wait_prediction(jobs_api, f"/v1/jobs/{job_id}")
    assert done["status"] == "succeeded" and done["kind"] == "predict" and done["classifier"] == cid
    assert (done["progress"]["done"], done["progress"]["total"]) == (10, 10)
    doc = jobs_api.get(f"/v1/jobs/{job_id}/results").json()
    assert doc["complete"] and [r["index"] for r in doc["results"]] == list(range(10))
    lines = jobs_api.get(f"/v1/jobs/{job_id}/results", headers={"Accept": "application/x-ndjson"}).text.splitlines()
    assert [json.loads(line) for line in lines] == doc["results"]
    old = jobs_api.get(f"/v1/classifiers/{cid}/predictions/{job_id}").json()
    assert old["predictions"] == [{k: v for k, v in r.items() if k != "index"} for r in doc["results"]]
    assert jobs_api.delete(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
    assert jobs_api.get(f"/v1/classifiers/{cid}/predictions/{job_id}").status_code == 404


def test_a_create_is_a_fit_job(jobs_api: httpx.Client) -> None:
    examples = [{"text": e.text, "label": e.label} for e in TRAIN]
    info = jobs_api.post("/v1/classifiers", json={"model": "gzip", "examples": examples}).json()
    assert info["status"] == "ready" and info["fit_job"].startswith("job_")
    job = jobs_api.get(f"/v1/jobs/{info['fit_job']}").json()
    assert job["kind"] == "fit" and job["status"] == "succeeded" and job["classifier"] == info["id"]
    assert job["progress"]["total"] == len(TRAIN)
    assert jobs_api.get(f"/v1/jobs/{info['fit_job']}/results").json()["results"] == [
        {"classifier": info["id"], "fitted": None}
    ]


def test_caching_compressor_gives_the_same_answers_and_no_model_pass_twice(tiny) -> None:
    """conditional (segments), probe (features) and knn-lm (token states) on a caching compressor:
    the same predictions as on the model itself, and a second fit and prediction run no model pass."""
    from classify.caching import caching
    from workers.classifying import MemoryBlobs

    texts, labels = [e.text for e in TRAIN[::3]], [e.label for e in TRAIN[::3]]
    tests = [e.text for e in TEST[:4]]
    options = {
        "conditional": {},
        "probe": {"weight_decay": 0.1, "features": "mean_last", "classical_weight": 0},
        "knn-lm": {"classical_weight": 0},
    }
    blobs = MemoryBlobs(1 << 26)
    for method, opts in options.items():
        plain = [p.as_dict() for p in build(method, lambda: tiny, texts, labels, opts).predict(tests)]
        first = caching(tiny, blobs)
        assert [p.as_dict() for p in build(method, lambda c=first: c, texts, labels, opts).predict(tests)] == plain
        assert first.computed > 0
        second = caching(tiny, blobs)
        assert [p.as_dict() for p in build(method, lambda c=second: c, texts, labels, opts).predict(tests)] == plain
        assert second.computed == 0 and second.reused > 0, method
    assert caching(ClassicalCompressor("gzip"), blobs).info.id == "gzip"  # classical: not wrapped
    small = MemoryBlobs(10_000)
    small.set_many("ns", {f"k{i}": "x" * 1000 for i in range(30)})
    assert small.nbytes <= 10_000 and small.get_many("ns", ["k0", "k29"]) == [None, "x" * 1000]


def test_a_refit_from_what_the_fit_chose_is_the_same_probe(tiny) -> None:
    texts, labels = [e.text for e in TRAIN], [e.label for e in TRAIN]
    opts = {"classical_weight": "auto", "features": "auto", "weight_decay": "auto", "folds": 3}
    fit = build("probe", lambda: tiny, texts, labels, opts)
    again = build("probe", lambda: tiny, texts, labels, opts, fit.fitted())
    assert again.fitted() == fit.fitted()
    assert [p.as_dict() for p in again.predict([e.text for e in TEST])] == [
        p.as_dict() for p in fit.predict([e.text for e in TEST])
    ]


class _FailsOn:
    """A fitted classifier that raises TokenizationError on one text."""

    labels = ["a", "b"]

    def __init__(self, bad: str) -> None:
        self.bad = bad

    def predict(self, texts):
        if self.bad in texts:
            raise TokenizationError("the tokenizer does not round-trip this text")
        return [Prediction(t, {"a": 1.0, "b": 0.0}) for t in texts]


def test_a_chunk_that_cannot_be_coded_fails_alone() -> None:
    from workers.classifying import FittedClassifiers, run_classify
    from workers.compute import ClassifyTask

    fitted = FittedClassifiers(4)
    fitted._items["c"] = _FailsOn("bad")  # as if fitted before
    tasks = [ClassifyTask("gzip", "c", "j", i, 2) for i in (0, 2, 4)]
    texts = [["t0", "t1"], ["t2", "bad"], ["t4", "t5"]]
    values, failed = run_classify(fitted, {"id": "c"}, lambda: None, list(zip(tasks, texts, strict=True)))
    assert failed == {tasks[1]: "texts 2..3: the tokenizer does not round-trip this text"}
    assert [p["label"] for p in values[tasks[0]] + values[tasks[2]]] == ["t0", "t1", "t4", "t5"]


def test_embedded_cancel_drops_queued_chunks_and_the_queue_bound_answers_overloaded() -> None:
    """The engine not started: a prediction job's first chunks wait in the queue. A second job
    past CODELEN_MAX_QUEUE_ITEMS is refused; cancel drops the first job's chunks, which never run."""
    from codelen.metrics import Metrics
    from models.registry import Registry
    from workers.embedded import CLASSIFY_WINDOW, EmbeddedBackend
    from workers.jobs import ClassifySpec, Overloaded

    async def scenario() -> tuple[dict, dict, bool]:
        settings = fast_settings(max_queue_items=CLASSIFY_WINDOW)
        backend = EmbeddedBackend(settings, Registry(settings), Metrics())
        definition = {"id": "c", "model": "gzip", "method": "conditional", "options": {}, "examples": []}
        spec = ClassifySpec("predict", definition, ["a b"] * 40, chunk=2)
        job = await backend.submit(spec, None)
        while backend.queue_depth() < CLASSIFY_WINDOW:
            await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):
            await backend.submit(ClassifySpec("predict", definition, ["c d"], chunk=2), None)
        cancelled = await backend.cancel(str(job["id"]))
        await backend.start()  # the engine now reads the cancelled job's chunks and drops them
        while backend.queue_depth():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        shown = await backend.job(str(job["id"]))
        await backend.stop()
        return cancelled, shown, "c" in backend.engine.fitted

    cancelled, shown, fitted = asyncio.run(scenario())
    assert cancelled["status"] == shown["status"] == "cancelled" and shown["progress"]["done"] == 0
    assert not fitted  # no chunk ran: the classifier was never even fitted
