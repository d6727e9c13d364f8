"""Classifiers in distributed mode, against a real redis-server and real `codelen worker` processes:
fits and predictions run on the workers (the API process holds no model), a worker SIGKILLed
mid-prediction changes nothing, cancel stops a job, the queue bound answers 429, and the
predictions equal embedded mode's bit for bit (CPU)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import redis

from codelen import keys
from tests import redis_support, test_api
from tests.conftest import fast_settings, free_port, serve
from tests.redis_support import distributed_settings, start_worker, wait_published
from tests.test_classify import TEST, TRAIN, synthetic

redis_server, redis_url, workers = redis_support.redis_server, redis_support.redis_url, redis_support.workers

pytestmark = pytest.mark.redis

MODELS = "tiny-random,gzip"
# A probe with its choices fixed (no cross-validation): what is checked is the plumbing.
PROBE = {
    "model": "tiny-random",
    "method": "probe",
    "examples": [{"text": e.text, "label": e.label} for e in TRAIN],
    "options": {"weight_decay": 0.1, "features": "mean_last", "classical_weight": 0},
}
TEXTS = [e.text for e in TEST] + [e.text for e in synthetic(4, seed=5)]  # 27 texts


def wait_job(http: httpx.Client, job_id: str, timeout: float = 120) -> dict:
    return test_api.wait_job(http, job_id, timeout)  # fits and predictions take longer than zstd


def worker_metric(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def embedded_predictions(body: dict, texts: list[str]) -> list[dict]:
    with serve(fast_settings(score_wait_s=600)) as url, httpx.Client(base_url=url, timeout=600) as http:
        cid = http.post("/v1/classifiers", json=body).json()["id"]
        r = http.post(f"/v1/classifiers/{cid}/predict", json={"texts": texts})
        assert r.status_code == 200, r.text
        return r.json()["predictions"]


def test_fit_and_predictions_on_two_workers_equal_embedded_and_the_api_holds_no_model(
    redis_url: str, workers: list, tmp_path: Path
) -> None:
    ports = [free_port(), free_port()]
    workers += [
        start_worker(redis_url, MODELS, tmp_path, name, port, batch_max_items=2)
        for name, port in zip("ab", ports, strict=True)
    ]
    wait_published(redis_url, ["tiny-random", "gzip"], workers=2)
    settings = distributed_settings(redis_url, classify_chunk_texts=3, score_wait_s=300)
    with serve(settings) as url, httpx.Client(base_url=url, timeout=300) as http:
        r = http.post("/v1/classifiers", json=PROBE)
        assert r.status_code == 201, r.text
        info = r.json()
        assert info["status"] == "ready" and info["fitted"]["weight_decay"] == 0.1
        assert http.get(f"/v1/jobs/{info['fit_job']}").json()["kind"] == "fit"

        r = http.post(f"/v1/classifiers/{info['id']}/predictions", json={"texts": TEXTS})
        assert r.status_code == 202, r.text
        job = wait_job(http, r.json()["id"])
        assert job["status"] == "succeeded" and job["progress"]["done"] == len(TEXTS) == job["progress"]["total"]
        rows = http.get(f"/v1/jobs/{job['id']}/results").json()["results"]
        lines = http.get(f"/v1/jobs/{job['id']}/results", headers={"Accept": "application/x-ndjson"}).text
        assert [r["index"] for r in rows] == list(range(len(TEXTS))) and len(lines.splitlines()) == len(TEXTS)
        distributed = [{k: v for k, v in row.items() if k != "index"} for row in rows]
        old = http.get(f"/v1/classifiers/{info['id']}/predictions/{job['id']}").json()
        assert old["status"] == "succeeded" and old["predictions"] == distributed

        computed = sum(worker_metric(p, 'codelen_classify_values_total{outcome="computed"}') for p in ports)
        # the same classifier again, and the same texts again: every value from the cache
        again = http.post("/v1/classifiers", json=PROBE).json()
        r = http.post(f"/v1/classifiers/{again['id']}/predict", json={"texts": TEXTS[:5]})
        assert r.status_code == 200, r.text
        assert r.json()["predictions"] == distributed[:5]
        assert sum(worker_metric(p, 'codelen_classify_values_total{outcome="computed"}') for p in ports) == computed

        ready = http.get("/readyz").json()
        assert ready["status"] == "ready" and ready["models_loaded"] == []  # the workers hold the models
        assert 'codelen_models_loaded{model="tiny-random"} 0.0' in http.get("/metrics").text
    assert distributed == embedded_predictions(PROBE, TEXTS)  # bit for bit


def test_a_worker_killed_mid_prediction_changes_nothing(redis_url: str, workers: list, tmp_path: Path) -> None:
    """A worker reads a prediction job's chunks and waits for more to fill its batch; SIGKILLed
    while it holds them, another worker reclaims them and the job ends as it would have."""
    body = {"model": "tiny-random", "method": "conditional", "examples": PROBE["examples"]}
    workers.append(start_worker(redis_url, MODELS, tmp_path, "fitter"))
    wait_published(redis_url, ["tiny-random"])
    settings = distributed_settings(redis_url, classify_chunk_texts=4, score_wait_s=300)
    with serve(settings) as url, httpx.Client(base_url=url, timeout=300) as http:
        cid = http.post("/v1/classifiers", json=body).json()["id"]
        assert workers[0].stop() == 0
        # holds what it reads for a minute, waiting for a batch of 1,000 entries that never comes
        slow = start_worker(redis_url, MODELS, tmp_path, "slow", batch_max_items=1000, batch_wait_ms=60_000)
        workers.append(slow)
        wait_published(redis_url, ["tiny-random"])
        job = http.post(f"/v1/classifiers/{cid}/predictions", json={"texts": TEXTS}).json()
        r = redis.Redis.from_url(redis_url, decode_responses=True)
        deadline = time.monotonic() + 60
        while not r.xpending(keys.stream("tiny-random"), keys.GROUP)["pending"]:
            assert time.monotonic() < deadline, "the slow worker never read the job's chunks"
            time.sleep(0.05)
        assert http.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"  # read, not run
        slow.kill()
        workers.append(start_worker(redis_url, MODELS, tmp_path, "rescuer"))
        done = wait_job(http, job["id"])
        assert done["status"] == "succeeded", done
        rows = http.get(f"/v1/jobs/{job['id']}/results").json()["results"]
        r.close()
    assert [{k: v for k, v in row.items() if k != "index"} for row in rows] == embedded_predictions(body, TEXTS)


def test_cancel_stops_a_prediction_job_and_the_queue_bound_answers_429(
    redis_url: str, workers: list, tmp_path: Path
) -> None:
    workers.append(start_worker(redis_url, MODELS, tmp_path, "a"))
    wait_published(redis_url, ["gzip"])
    body = {"model": "gzip", "examples": PROBE["examples"]}
    settings = distributed_settings(redis_url, classify_chunk_texts=2, max_queue_items=6, score_wait_s=0.2)
    with serve(settings) as url, httpx.Client(base_url=url, timeout=60) as http:
        created = http.post("/v1/classifiers", json=body).json()
        cid = created["id"]
        assert wait_job(http, created["fit_job"])["status"] == "succeeded"
        assert workers[0].stop() == 0  # nobody reads the queue now
        first = http.post(f"/v1/classifiers/{cid}/predictions", json={"texts": TEXTS[:8]})  # 4 chunks
        assert first.status_code == 202, first.text
        refused = http.post(f"/v1/classifiers/{cid}/predictions", json={"texts": TEXTS[8:16]})
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
        assert refused.headers["content-type"] == "application/problem+json"
        assert http.post(f"/v1/classifiers/{cid}/predictions", json={"texts": TEXTS * 2}).status_code == 413
        pending = http.post(f"/v1/classifiers/{cid}/predict", json={"texts": TEXTS[:2]})  # 1 chunk: fits
        assert pending.status_code == 202 and pending.headers["location"] == f"/v1/jobs/{pending.json()['id']}"
        job_id = first.json()["id"]
        assert http.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
        workers.append(start_worker(redis_url, MODELS, tmp_path, "b"))
        assert wait_job(http, pending.json()["id"])["status"] == "succeeded"  # queued after the cancelled one
        job = http.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "cancelled" and job["progress"]["done"] == 0
        assert http.get(f"/v1/jobs/{job_id}/results").json()["results"] == []
        assert http.get(f"/v1/classifiers/{cid}/predictions/{job_id}").json()["status"] == "cancelled"


def test_a_worker_reads_ahead_only_what_its_batch_is_likely_to_take() -> None:
    from workers.worker import read_count

    # Small entries (score work on short datasets): a full read, as before.
    assert read_count(32, 65536, None, empty=True) == 32
    assert read_count(32, 65536, 300.0, empty=True) == 32
    # Chunks of a classifier's texts, ~4 KB each, an 8 KB budget: two, not 32 (the rest stay on
    # the stream for the other workers).
    assert read_count(32, 8192, 4000.0, empty=True) == 2
    # A batch as full as the entries seen suggest stops reading...
    assert read_count(31, 1000, 4000.0, empty=False) == 0
    # ...but an empty batch always reads one, however large the entries.
    assert read_count(32, 8192, 1e9, empty=True) == 1
