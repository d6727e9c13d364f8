"""`conditioning` and `direction` through API v1 (issue 13): embedded mode over real HTTP, and
distributed mode with a real redis-server and a real `codelen worker`, on the tiny random model.
The math of the modes is tested in test_conditioning.py; here: what the service says and keeps."""

from __future__ import annotations

import random
from pathlib import Path

import httpx
import pytest

from tests import redis_support, test_api
from tests.conftest import fast_settings, serve
from tests.redis_support import distributed_settings, start_worker, wait_published

redis_server, redis_url, workers = redis_support.redis_server, redis_support.redis_url, redis_support.workers

WORDS = "the river market stone bridge rain old new square opened closed farmer cattle valley week".split()


def text(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


# Y copied into the middle of an X that is many tiny-model windows (64 tokens) long
Y = text(1, 40)
X_COPY = text(2, 300) + " " + Y + " " + text(3, 300)
X_ABSENT = text(2, 300) + " " + text(4, 40) + " " + text(3, 300)


def wait_job(http: httpx.Client, job_id: str) -> dict:
    return test_api.wait_job(http, job_id, timeout=120)  # memory and adapt take longer than zstd


def score(http: httpx.Client, x: str, y: str, **options: object) -> dict:
    r = http.post("/v1/score", json={"x": x, "y": y, "model": "tiny-random", **options})
    assert r.status_code in (200, 202), r.text
    if r.status_code == 202:
        job = wait_job(http, r.json()["id"])
        assert job["status"] == "succeeded", job
        row = http.get(f"/v1/jobs/{job['id']}/results").json()["results"][0]
        return row
    return r.json()


@pytest.fixture(scope="module")
def http() -> httpx.Client:
    with serve(fast_settings()) as url, httpx.Client(base_url=url, timeout=120) as client:
        yield client


def test_models_list_their_modes_with_parameters(http: httpx.Client) -> None:
    models = {m["id"]: m for m in http.get("/v1/models").json()["models"]}
    tiny, zstd = models["tiny-random"]["conditioning"], models["zstd"]["conditioning"]
    assert set(tiny) == {"context", "memory", "adapt"} and set(zstd) == {"context"}
    assert {"k", "temperature", "lambda", "memory", "copy", "copy_weight"} <= set(tiny["memory"])
    assert {"trains", "optimizer", "blocks", "after_x"} <= set(tiny["adapt"])
    assert "8 MiB" in zstd["context"]["sees"]  # a classical compressor says what its format keeps


def test_each_mode_states_itself_and_keeps_the_definitions(http: httpx.Client) -> None:
    docs = {mode: score(http, X_COPY, Y, conditioning=mode) for mode in ("context", "memory", "adapt")}
    models = {m["id"]: m for m in http.get("/v1/models").json()["models"]}
    for mode, doc in docs.items():
        assert doc["conditioning"] == models["tiny-random"]["conditioning"][mode]
        assert doc["direction"] == "both"
        cl, cond = doc["code_lengths"], doc["conditional"]
        assert cl["xy"] == pytest.approx(cl["x"] + cond["y_given_x"], abs=0.01)
        assert cl["yx"] == pytest.approx(cl["y"] + cond["x_given_y"], abs=0.01)
        joint = min(cl["xy"], cl["yx"])
        assert doc["shared_information"] == pytest.approx(cl["x"] + cl["y"] - joint, abs=0.01)
    # memory sees the copy hundreds of tokens back, beyond the 64-token window context mode reads
    assert docs["memory"]["conditional"]["y_given_x"] < 0.5 * docs["context"]["conditional"]["y_given_x"]
    # a text within one window is coded the same way in context and memory mode (nothing earlier)
    short = {m: score(http, text(8, 10), text(9, 10), conditioning=m) for m in ("context", "memory")}
    assert short["memory"]["code_lengths"]["x"] == short["context"]["code_lengths"]["x"]
    again = http.post("/v1/score", json={"x": X_COPY, "y": Y, "model": "tiny-random", "conditioning": "memory"})
    assert again.json()["cached"] is True and again.json()["conditional"] == docs["memory"]["conditional"]


def test_memory_finds_a_copy_that_is_there_and_not_one_that_is_not(http: httpx.Client) -> None:
    copy = score(http, X_COPY, Y, conditioning="memory", direction="y_given_x")
    absent = score(http, X_ABSENT, Y, conditioning="memory", direction="y_given_x")
    ratio = lambda d: d["conditional"]["y_given_x"] / d["code_lengths"]["y"]  # noqa: E731
    # the tiny random model recalls shared words too (the texts draw on 15 words), so the copy is
    # asked to cost clearly less than the absent case, not near zero (the real model: BENCHMARKS.md)
    assert ratio(copy) < 0.75 * ratio(absent)


def test_one_direction_only(http: httpx.Client) -> None:
    one = score(http, X_ABSENT, Y, conditioning="adapt", direction="y_given_x")
    assert one["direction"] == "y_given_x"
    assert one["code_lengths"]["yx"] is None and one["conditional"]["x_given_y"] is None
    cl = one["code_lengths"]
    assert one["shared_information"] == pytest.approx(cl["x"] + cl["y"] - cl["xy"], abs=0.01)
    assert one["ncd"] == pytest.approx((cl["xy"] - min(cl["x"], cl["y"])) / max(cl["x"], cl["y"]), abs=1e-9)
    both = score(http, X_ABSENT, Y, conditioning="adapt")
    assert both["conditional"]["y_given_x"] == one["conditional"]["y_given_x"]  # the same cached value
    assert both["code_lengths"]["x"] == one["code_lengths"]["x"]


def test_bad_conditioning_is_422_problem_json(http: httpx.Client) -> None:
    cases = [
        ("/v1/score", {"x": "a", "y": "b", "conditioning": "zip"}),
        ("/v1/score", {"x": "a", "y": "b", "conditioning": 3}),
        ("/v1/score", {"x": "a", "y": "b", "direction": "x_given_y"}),
        ("/v1/score", {"x": "a", "y": "b", "model": "zstd", "conditioning": "memory"}),  # not offered
        ("/v1/jobs", {"model": "gzip", "conditioning": "adapt", "pairs": [{"id": "a", "x": "a", "y": "b"}]}),
        ("/v1/jobs", {"direction": "y_given_x", "matrix": {"datasets": [{"id": "a", "data": "a"}]}}),
    ]
    for path, body in cases:
        r = http.post(path, json=body)
        assert r.status_code == 422, (body, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert "conditioning" in r.text or "direction" in r.text


def test_a_job_in_memory_mode_reports_tokens_and_its_parameters(http: httpx.Client) -> None:
    pairs = [{"id": f"p{i}", "x": X_COPY + f" {i}", "y": Y} for i in range(3)]
    body = {"model": "tiny-random", "conditioning": "memory", "direction": "y_given_x", "pairs": pairs}
    r = http.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    job = wait_job(http, r.json()["id"])
    assert job["status"] == "succeeded" and (job["conditioning"], job["direction"]) == ("memory", "y_given_x")
    progress = job["progress"]
    assert progress["tokens_done"] == progress["tokens_total"] > 600  # three X of ~600 tokens were coded
    doc = http.get(f"/v1/jobs/{job['id']}/results").json()
    assert doc["conditioning_parameters"]["mode"] == "memory" and "k" in doc["conditioning_parameters"]
    assert [row["conditioning"] for row in doc["results"]] == [{"mode": "memory"}] * 3
    assert all(row["conditional"]["x_given_y"] is None for row in doc["results"])


@pytest.mark.redis
def test_distributed_modes_equal_embedded(
    redis_url: str, workers: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    # adapt's training (backward, Adam) is reproducible for one machine, torch build and thread
    # count (models/adapt.py): the worker gets this process's, as a fleet's workers share theirs
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    workers.append(start_worker(redis_url, "tiny-random", tmp_path, "a"))
    pairs = [{"id": "copy", "x": X_COPY, "y": Y}, {"id": "absent", "x": X_ABSENT, "y": Y}]
    with serve(fast_settings()) as url, httpx.Client(base_url=url, timeout=120) as http:
        want = {}
        for mode in ("memory", "adapt"):
            job = http.post("/v1/jobs", json={"model": "tiny-random", "conditioning": mode, "pairs": pairs}).json()
            assert wait_job(http, job["id"])["status"] == "succeeded"
            want[mode] = http.get(f"/v1/jobs/{job['id']}/results").json()["results"]
    wait_published(redis_url, ["tiny-random"])
    with serve(distributed_settings(redis_url)) as url, httpx.Client(base_url=url, timeout=120) as http:
        for mode in ("memory", "adapt"):
            r = http.post("/v1/jobs", json={"model": "tiny-random", "conditioning": mode, "pairs": pairs})
            assert r.status_code == 202, r.text
            job = wait_job(http, r.json()["id"])
            assert job["status"] == "succeeded" and job["conditioning"] == mode, job
            assert job["progress"]["tokens_done"] == job["progress"]["tokens_total"] > 0
            got = http.get(f"/v1/jobs/{job['id']}/results").json()
            assert got["results"] == want[mode]  # bit for bit: the CPU engine is deterministic
            assert got["conditioning_parameters"]["mode"] == mode
        one = http.post("/v1/score", json={"x": X_COPY, "y": Y, "model": "tiny-random", "conditioning": "memory",
                                           "direction": "y_given_x"})
        assert one.status_code == 200 and one.json()["cached"] is True  # its three values were computed above
        assert one.json()["conditional"]["y_given_x"] == want["memory"][0]["conditional"]["y_given_x"]
        bad = http.post("/v1/score", json={"x": "a", "y": "b", "model": "tiny-random", "conditioning": "nope"})
        assert bad.status_code == 422
