"""API v1 through real HTTP, embedded mode, fast compressors."""

from __future__ import annotations

import time

import httpx

from tests.conftest import fast_settings, serve

X = "Rain fell on the old stone bridge while the market opened in the square. " * 4
Y = "Rain fell on the new stone bridge while the market closed in the square. " * 4
Z = "Compilers translate source code into machine instructions for a processor. " * 4

FIELDS = {
    "model",
    "bytes",
    "code_lengths",
    "conditional",
    "shared_information",
    "ncd",
    "bits_per_byte",
    "window",
    "conditioning",
    "direction",
    "cached",
}


def wait_job(http: httpx.Client, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def test_health_and_models(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").status_code == 200
    models = http.get("/v1/models").json()["models"]
    ids = {m["id"] for m in models}
    assert {"gzip", "zlib", "bz2", "lzma", "zstd", "tiny-random"} <= ids
    for m in models:
        assert m["kind"] in ("lm", "classical") and len(m["revision"]) == 64
    tiny = next(m for m in models if m["id"] == "tiny-random")
    assert tiny["kind"] == "lm" and tiny["window"]["stride"] > 0


def test_score_fields_cache_and_math(http: httpx.Client) -> None:
    for model in ("zstd", "tiny-random"):
        body = {"x": X, "y": Y, "model": model}
        first = http.post("/v1/score", json=body)
        assert first.status_code == 200, first.text
        doc = first.json()
        assert set(doc) == FIELDS and doc["cached"] is False
        cl, cond = doc["code_lengths"], doc["conditional"]
        assert abs(cl["xy"] - (cl["x"] + cond["y_given_x"])) < 0.01
        assert abs(cl["yx"] - (cl["y"] + cond["x_given_y"])) < 0.01
        assert doc["bytes"] == {"x": len(X), "y": len(Y)}
        assert doc["bits_per_byte"]["x"] == cl["x"] / len(X)
        again = http.post("/v1/score", json=body).json()
        assert again["cached"] is True
        assert {k: v for k, v in again.items() if k != "cached"} == {k: v for k, v in doc.items() if k != "cached"}


def test_near_duplicates_share_more(http: httpx.Client) -> None:
    near = http.post("/v1/score", json={"x": X, "y": Y, "model": "lzma"}).json()
    far = http.post("/v1/score", json={"x": X, "y": Z, "model": "lzma"}).json()
    same = http.post("/v1/score", json={"x": X, "y": X, "model": "lzma"}).json()
    assert near["shared_information"] > far["shared_information"]
    assert same["ncd"] < far["ncd"]


def test_datasets_of_records(http: httpx.Client) -> None:
    doc = http.post("/v1/score", json={"x": ["a b c", "d e f"], "y": ["a b c"], "model": "gzip"}).json()
    assert doc["bytes"]["x"] == len("a b c\n\x1e\nd e f")


def test_one_text_may_be_as_large_as_a_dataset(http: httpx.Client) -> None:
    """A corpus sent as one text (what `codelen score corpus.txt test.txt` does) may use the whole
    dataset limit (4 MiB), not only a record's share of it; past it, 413 naming /x."""
    limit = 4 * 1024 * 1024
    big = "word " * (limit // 5) + "w" * (limit % 5)
    ok = http.post("/v1/score", json={"x": big, "y": "word word", "model": "zstd", "direction": "y_given_x"})
    assert ok.status_code == 200, ok.text[:300]
    assert ok.json()["bytes"]["x"] == limit
    over = http.post("/v1/score", json={"x": big + "w", "y": "word", "model": "zstd"})
    assert over.status_code == 413 and over.headers["content-type"] == "application/problem+json"
    assert over.json()["pointer"] == "/x" and f"{limit + 1} bytes; at most {limit}" in over.json()["detail"]


def test_pairs_job_progress_results_ndjson(http: httpx.Client) -> None:
    pairs = [{"id": f"p{i}", "x": f"{X} {i}", "y": f"{Z} {i % 7}"} for i in range(200)]
    r = http.post("/v1/jobs", json={"model": "zstd", "pairs": pairs})
    assert r.status_code == 202 and r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    job = wait_job(http, r.json()["id"])
    progress = job["progress"]
    assert job["status"] == "succeeded" and (progress["done"], progress["total"]) == (200, 200)
    assert progress["tokens_done"] == progress["tokens_total"] > 0  # zstd's symbols are bytes
    results = http.get(f"/v1/jobs/{job['id']}/results").json()
    assert [row["id"] for row in results["results"]] == [p["id"] for p in pairs]
    lines = http.get(f"/v1/jobs/{job['id']}/results", headers={"Accept": "application/x-ndjson"}).text.splitlines()
    assert len(lines) == 200 and all('"ncd"' in line for line in lines)


def test_matrix_job(http: httpx.Client) -> None:
    data = [{"id": "a", "data": X}, {"id": "b", "data": Y}, {"id": "c", "data": [Z, Z]}]
    job = wait_job(http, http.post("/v1/jobs", json={"model": "zstd", "matrix": {"datasets": data}}).json()["id"])
    assert job["progress"]["total"] == 6  # 3 diagonal + 3 off-diagonal pairs
    m = http.get(f"/v1/jobs/{job['id']}/results").json()["matrix"]
    assert m["ids"] == ["a", "b", "c"]
    ncd = m["ncd"]
    assert all(ncd[i][j] == ncd[j][i] for i in range(3) for j in range(3))
    assert ncd[0][1] < ncd[0][2]
    only = http.get(f"/v1/jobs/{job['id']}/results", params={"include": "matrix"}).json()
    assert "results" not in only and only["matrix"] == m
    assert http.get(f"/v1/jobs/{job['id']}/results", params={"include": "nope"}).status_code == 422


def test_idempotency_key(http: httpx.Client) -> None:
    body = {"model": "gzip", "pairs": [{"id": "1", "x": X, "y": Z}]}
    a = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"}).json()
    b = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"}).json()
    assert a["id"] == b["id"]
    other = {"model": "gzip", "pairs": [{"id": "1", "x": X, "y": Y}]}
    conflict = http.post("/v1/jobs", json=other, headers={"Idempotency-Key": "k-1"})
    assert conflict.status_code == 409 and conflict.headers["content-type"] == "application/problem+json"


def test_cancel_stops_a_job() -> None:
    # one item per batch and a slow-ish compressor, so the job is still running when cancelled
    with serve(fast_settings(batch_max_items=1)) as url, httpx.Client(base_url=url, timeout=30) as http:
        pairs = [{"id": str(i), "x": X * 3 + str(i), "y": Z * 3 + str(i)} for i in range(2000)]
        job = http.post("/v1/jobs", json={"model": "lzma", "pairs": pairs}).json()
        cancelled = http.delete(f"/v1/jobs/{job['id']}").json()
        assert cancelled["status"] == "cancelled"
        time.sleep(0.3)
        final = http.get(f"/v1/jobs/{job['id']}").json()
        assert final["status"] == "cancelled" and final["progress"]["done"] < 2000
        assert http.delete("/v1/jobs/job_nope").status_code == 404


def test_score_turns_into_a_job_past_the_wait() -> None:
    with serve(fast_settings(score_wait_s=0.0)) as url, httpx.Client(base_url=url, timeout=30) as http:
        r = http.post("/v1/score", json={"x": X, "y": Z, "model": "bz2"})
        assert r.status_code == 202
        job = wait_job(http, r.json()["id"])
        assert job["status"] == "succeeded"
        [row] = http.get(f"/v1/jobs/{job['id']}/results").json()["results"]
        assert row["code_lengths"]["x"] > 0
        # the work landed in the cache: the same request is now answered at once
        assert http.post("/v1/score", json={"x": X, "y": Z, "model": "bz2"}).json()["cached"] is True


def test_openapi_documents_problems(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    score = spec["paths"]["/v1/score"]["post"]["responses"]
    assert {"413", "422", "429"} <= set(score)
