"""What a fuzzer found in jobs and their state (issue 16), in both modes with classical models:
NCD(x, x), ids that are not ours in key names, memory of finished jobs, requests that can never
fit the queue."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
import redis

from client.api import Client, CodelenError, RetryPolicy
from codelen import keys
from codelen.datasets import Dataset
from codelen.scores import PairLengths
from codelen.settings import Settings
from models.protocol import ModelInfo
from tests import redis_support
from tests.conftest import fast_settings, serve
from tests.redis_support import distributed_settings, start_worker, wait_published
from workers.compute import pair_tasks
from workers.embedded import LRUCache
from workers.jobs import matrix_document, matrix_pairs, pair_result
from workers.results import JobResults

redis_server, redis_url, workers = redis_support.redis_server, redis_support.redis_url, redis_support.workers

TEXT = "The river flooded the valley after a week of heavy rain; farmers moved their cattle uphill. " * 3


def assert_self_pair(doc: dict) -> None:
    """NCD(x, x) per MISSION.md: C(X·X) = C(X) + C(X|X), the shared information C(X) − C(X|X)."""
    cl, cond = doc["code_lengths"], doc["conditional"]
    assert cl["x"] == cl["y"] > 0 and cl["xy"] == cl["yx"]
    assert cond["y_given_x"] == cond["x_given_y"] < cl["x"] / 2  # zstd finds the copy
    assert doc["shared_information"] == pytest.approx(cl["x"] - cond["y_given_x"])
    assert doc["ncd"] == pytest.approx(cond["y_given_x"] / cl["x"]) and abs(doc["ncd"]) < 0.1  # zstd: about 0


def check_score_with_itself(http: httpx.Client) -> None:
    body = {"x": TEXT, "y": TEXT, "model": "zstd"}
    first = http.post("/v1/score", json=body)
    assert first.status_code == 200, first.text
    assert_self_pair(first.json())
    for _ in range(2):  # now all cached: the fast path and the route build the pair from the cache
        again = http.post("/v1/score", json=body)
        assert again.status_code == 200, again.text
        assert again.json()["cached"] is True
        assert_self_pair(again.json())
        assert again.json()["code_lengths"] == first.json()["code_lengths"]
    job = http.post("/v1/jobs", json={"model": "zstd", "pairs": [{"id": "same", "x": TEXT, "y": TEXT}]})
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    for _ in range(600):
        doc = http.get(f"/v1/jobs/{job_id}/results").json()
        if doc["status"] not in ("queued", "running"):
            break
        time.sleep(0.05)
    assert doc["status"] == "succeeded", doc
    [row] = doc["results"]
    assert_self_pair(row)


@pytest.mark.parametrize("fast_path", [True, False])
def test_score_of_a_dataset_with_itself_embedded(fast_path: bool) -> None:
    with serve(fast_settings(score_fast_path=fast_path)) as url, httpx.Client(base_url=url, timeout=60) as http:
        check_score_with_itself(http)


@pytest.mark.redis
@pytest.mark.parametrize("fast_path", [True, False])
def test_score_of_a_dataset_with_itself_distributed(
    fast_path: bool, redis_url: str, workers: list, tmp_path: Path
) -> None:
    workers.append(start_worker(redis_url, "zstd", tmp_path, "w"))
    wait_published(redis_url, ["zstd"])
    settings = distributed_settings(redis_url, score_fast_path=fast_path)
    with serve(settings) as url, httpx.Client(base_url=url, timeout=60) as http:
        check_score_with_itself(http)


# -- ids from the URL never become part of a Redis key name -------------------------------------


def hostile_ids(real: str) -> list[str]:
    """Ids a client may send: another key of the same job, glob characters, an encoded slash,
    spaces, a very long one. Each names nothing."""
    return [
        f"{real}:pairs", f"{real}:values", f"{real}:waiting", f"{real}:remaining", f"{real}*", "*", "job_*",
        f"{real}%2Fx", f"{real} ", "job with spaces", real + "0" * 5000, real.upper(), "job_" + "g" * 32,
    ]  # fmt: skip


def assert_not_found(r: httpx.Response, where: str) -> None:
    assert r.status_code == 404, (where, r.status_code, r.text[:300])
    assert r.headers["content-type"] == "application/problem+json", where


@pytest.mark.redis
def test_ids_that_are_not_ours_answer_404_distributed(redis_url: str, workers: list, tmp_path: Path) -> None:
    workers.append(start_worker(redis_url, "zstd", tmp_path, "w"))
    wait_published(redis_url, ["zstd"])
    with serve(distributed_settings(redis_url)) as url, httpx.Client(base_url=url, timeout=60) as http:
        job = http.post("/v1/jobs", json={"model": "zstd", "pairs": [{"id": "a", "x": TEXT, "y": "other"}]}).json()
        real = job["id"]
        for bad in hostile_ids(real):
            assert_not_found(http.get(f"/v1/jobs/{bad}"), f"GET {bad[:80]}")
            assert_not_found(http.get(f"/v1/jobs/{bad}/results"), f"GET results {bad[:80]}")
            assert_not_found(http.delete(f"/v1/jobs/{bad}"), f"DELETE {bad[:80]}")
        assert http.get(f"/v1/jobs/{real}").status_code == 200  # the real job is untouched
        examples = [{"text": t, "label": t.split()[0]} for t in ("apples are red", "bananas are yellow")]
        cid = http.post("/v1/classifiers", json={"model": "zstd", "method": "conditional", "examples": examples})
        assert cid.status_code == 201, cid.text
        cid = cid.json()["id"]
        pred = http.post(f"/v1/classifiers/{cid}/predictions", json={"texts": ["red apples"]}).json()["id"]
        for bad in [f"{pred}:texts", f"{pred}:results", f"{pred}:claim", f"{pred}*", pred + "0" * 5000, "a b"]:
            assert_not_found(http.get(f"/v1/classifiers/{cid}/predictions/{bad}"), f"prediction {bad[:80]}")
        for bad in ["c:x", "*", "c lf", "c" * 5000]:
            assert_not_found(http.get(f"/v1/classifiers/{bad}"), f"classifier {bad[:80]}")
        assert http.get(f"/v1/classifiers/{cid}/predictions/{pred}").status_code == 200


def test_ids_that_are_not_ours_answer_404_embedded() -> None:
    with serve(fast_settings()) as url, httpx.Client(base_url=url, timeout=60) as http:
        real = http.post("/v1/jobs", json={"model": "zstd", "pairs": [{"id": "a", "x": TEXT, "y": "b"}]}).json()["id"]
        for bad in hostile_ids(real):
            assert_not_found(http.get(f"/v1/jobs/{bad}"), f"GET {bad[:80]}")
            assert_not_found(http.delete(f"/v1/jobs/{bad}"), f"DELETE {bad[:80]}")


# -- a request that can never fit the queue: 413 at once ---------------------------------------


def test_the_documented_maximum_fits_the_default_queue() -> None:
    """A matrix of max_matrix_datasets needs C(X) of each dataset and C(Y|X) of every ordered pair
    (the diagonal included): it must fit max_queue_items, and the stream's backstop above that."""
    s = Settings.model_construct()  # the defaults, whatever the environment says
    n = s.max_matrix_datasets
    tasks = {t for i in range(n) for j in range(i, n) for t in pair_tasks("zstd", f"{i:064x}", f"{j:064x}")}
    assert len(tasks) == n + n * n == 250_500
    assert len(tasks) <= s.max_queue_items < s.stream_max_len
    pairs = {t for i in range(s.max_pairs) for t in pair_tasks("zstd", f"{i:064x}", f"{i + s.max_pairs:064x}")}
    assert len(pairs) <= s.max_queue_items


@pytest.mark.redis
def test_a_request_that_can_never_fit_the_queue_gets_413(redis_url: str, workers: list, tmp_path: Path) -> None:
    workers.append(start_worker(redis_url, "zstd", tmp_path, "publisher"))
    wait_published(redis_url, ["zstd"])
    workers.pop().stop()  # no worker: what is queued stays queued
    settings = distributed_settings(redis_url, max_queue_items=10, retry_after_s=1)
    with serve(settings) as url, httpx.Client(base_url=url, timeout=60) as http:
        datasets = [{"id": f"d{i}", "data": f"dataset number {i} " * 3} for i in range(3)]  # 3 + 9 > 10 tasks
        r = http.post("/v1/jobs", json={"model": "zstd", "matrix": {"datasets": datasets}})
        assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json", r.text
        assert "12 code lengths" in r.json()["detail"] and "CODELEN_MAX_QUEUE_ITEMS" in r.json()["detail"]
        assert "retry-after" not in r.headers
        pairs = [{"id": f"p{i}", "x": f"x text {i}", "y": f"y text {i}"} for i in range(3)]  # 12 tasks
        assert http.post("/v1/jobs", json={"model": "zstd", "pairs": pairs}).status_code == 413
        fits = http.post("/v1/jobs", json={"model": "zstd", "pairs": pairs[:2]})  # 8 tasks: fits
        assert fits.status_code == 202, fits.text
        busy = http.post("/v1/jobs", json={"model": "zstd", "pairs": pairs[2:]})  # fits, but not now
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        assert http.post("/v1/jobs", json={"model": "zstd", "matrix": {"datasets": datasets}}).status_code == 413
        with Client(url, retry=RetryPolicy(retries=3)) as api:
            with pytest.raises(CodelenError) as err:
                api.submit_matrix({d["id"]: d["data"] for d in datasets}, model="zstd")
            assert err.value.status == 413 and api.retries_made == 0  # the client does not retry a 413


# -- finished jobs: deleted on DELETE, bounded by bytes, results streamed -----------------------


def wait_done(http: httpx.Client, job_id: str) -> dict:
    for _ in range(1200):
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def check_delete_of_a_finished_job(http: httpx.Client) -> None:
    pairs = [{"id": f"p{i}", "x": f"{TEXT} {i}", "y": f"another text {i}"} for i in range(3)]
    body = {"model": "zstd", "pairs": pairs}
    job = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "delete-me"}).json()
    assert wait_done(http, job["id"])["status"] == "succeeded"
    assert len(http.get(f"/v1/jobs/{job['id']}/results").json()["results"]) == 3
    deleted = http.delete(f"/v1/jobs/{job['id']}")
    assert deleted.status_code == 200 and deleted.json()["status"] == "succeeded"
    assert (deleted.json()["progress"]["done"], deleted.json()["progress"]["total"]) == (3, 3)
    assert_not_found(http.get(f"/v1/jobs/{job['id']}"), "GET after DELETE")
    assert_not_found(http.get(f"/v1/jobs/{job['id']}/results"), "results after DELETE")
    assert_not_found(http.delete(f"/v1/jobs/{job['id']}"), "DELETE after DELETE")
    again = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "delete-me"})
    assert again.status_code == 202 and again.json()["id"] != job["id"]  # the key now makes a new job
    assert wait_done(http, again.json()["id"])["status"] == "succeeded"
    assert http.delete(f"/v1/jobs/{again.json()['id']}").status_code == 200


def test_delete_of_a_finished_job_deletes_it_embedded() -> None:
    with serve(fast_settings()) as url, httpx.Client(base_url=url, timeout=60) as http:
        check_delete_of_a_finished_job(http)


@pytest.mark.redis
def test_delete_of_a_finished_job_deletes_it_distributed(redis_url: str, workers: list, tmp_path: Path) -> None:
    workers.append(start_worker(redis_url, "zstd", tmp_path, "w"))
    wait_published(redis_url, ["zstd"])
    with serve(distributed_settings(redis_url)) as url, httpx.Client(base_url=url, timeout=60) as http:
        check_delete_of_a_finished_job(http)
        assert not [k for k in redis.Redis.from_url(redis_url).keys(f"{keys.QUEUE}:job:*")]  # nothing left
        assert not redis.Redis.from_url(redis_url).keys(f"{keys.QUEUE}:idem:*")


def test_finished_jobs_are_dropped_past_the_byte_bound() -> None:
    """Each 20-pair job's results take ~1.9 kB; with room for one, the older job is dropped when the
    newer finishes, oldest first; the running job is never dropped."""
    settings = fast_settings(max_job_result_bytes=2_500)
    with serve(settings) as url, httpx.Client(base_url=url, timeout=60) as http:
        ids = []
        for k in range(3):
            pairs = [{"id": f"pair-{k}-{i}", "x": f"{TEXT} {k} {i}", "y": "y"} for i in range(20)]
            ids.append(http.post("/v1/jobs", json={"model": "zstd", "pairs": pairs}).json()["id"])
            assert wait_done(http, ids[-1])["status"] == "succeeded"
            assert len(http.get(f"/v1/jobs/{ids[-1]}/results").json()["results"]) == 20
        assert_not_found(http.get(f"/v1/jobs/{ids[0]}"), "oldest job")
        assert_not_found(http.get(f"/v1/jobs/{ids[1]}"), "older job")
        assert http.get(f"/v1/jobs/{ids[2]}").status_code == 200


def test_job_results_are_compact_and_read_back_exactly() -> None:
    info = ModelInfo(id="m", kind="classical", revision="r" * 64, context_tokens=None)
    ids = [f"d{i}" for i in range(40)]
    data = [Dataset(f"text {i}", f"{i:064x}", 100 + i, 1) for i in range(40)]
    pairs = matrix_pairs(ids, data)
    results = JobResults(info, len(pairs), None, ids)
    assert results.nbytes < 60 * len(pairs) + 100 * len(ids)  # a few numbers a pair, not a document
    want = []
    for k, p in enumerate(pairs):
        lengths = PairLengths(1000.0 + k, 2000.5 - k, 0.1 * k, 3.0 + 1 / (k + 1))
        if k % 3:  # a job still running has holes
            results.set(k, p, lengths)
            want.append(pair_result(info, p, lengths))
    assert list(results.rows()) == want


def test_results_stream_the_same_document_as_json_and_json_lines() -> None:
    datasets = [{"id": f"d{i}", "data": f"{TEXT} number {i}"} for i in range(12)]
    with serve(fast_settings()) as url, httpx.Client(base_url=url, timeout=60) as http:
        job = http.post("/v1/jobs", json={"model": "zstd", "matrix": {"datasets": datasets}}).json()
        assert wait_done(http, job["id"])["status"] == "succeeded"
        doc = http.get(f"/v1/jobs/{job['id']}/results").json()
        lines = http.get(f"/v1/jobs/{job['id']}/results", headers={"Accept": "application/x-ndjson"})
        rows = [json.loads(line) for line in lines.text.splitlines()]
        assert doc["complete"] and len(doc["results"]) == 78 and rows == doc["results"]
        assert doc["matrix"] == matrix_document([d["id"] for d in datasets], doc["results"])
        only = http.get(f"/v1/jobs/{job['id']}/results", params={"include": "matrix"}).json()
        assert "results" not in only and only["matrix"] == doc["matrix"]
        for r in doc["results"][:5]:  # the numbers are those of /v1/score, bit for bit
            a, b = (datasets[int(i[1:])]["data"] for i in r["id"].split("|"))
            score = http.post("/v1/score", json={"x": a, "y": b, "model": "zstd"}).json()
            assert score["cached"] and score["ncd"] == r["ncd"] and score["code_lengths"] == r["code_lengths"]


def test_embedded_cache_is_bounded_by_bytes() -> None:
    cache = LRUCache(max_entries=10**6, max_bytes=100 * LRUCache.ENTRY_BYTES)
    for i in range(1000):
        cache.set(f"clc:len:ns:{i:064x}", float(i))
        cache.get(f"clc:len:ns:{0:064x}")  # the first stays recently used
    assert len(cache) == 100 and cache.nbytes <= 100 * LRUCache.ENTRY_BYTES
    assert cache.get(f"clc:len:ns:{0:064x}") == 0.0 and cache.get(f"clc:len:ns:{999:064x}") == 999.0
    assert cache.get(f"clc:len:ns:{500:064x}") is None
