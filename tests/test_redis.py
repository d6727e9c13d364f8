"""Distributed mode against a real redis-server and real `codelen worker` processes: shared jobs,
a worker killed mid-job, Redis restarted from its AOF, poisoned items, cancellation, overload,
API keys. Results must equal embedded mode bit for bit (CPU)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx
import pytest
import redis

from codelen import keys
from tests import redis_support
from tests.conftest import fast_settings, free_port, serve
from tests.redis_support import RedisServer, distributed_settings, start_worker, wait_published
from tests.test_api import wait_job

# the fixtures this module uses (a real redis-server on a free port, worker processes)
redis_server, redis_url, workers = redis_support.redis_server, redis_support.redis_url, redis_support.workers

pytestmark = pytest.mark.redis

TOPICS = [
    "The river flooded the valley after a week of heavy rain; farmers moved their cattle uphill.",
    "A compiler turns source code into machine instructions, optimizing loops and registers.",
    "The orchestra tuned their instruments while the conductor studied the score of the symphony.",
    "Bread dough rises when yeast ferments sugars, releasing carbon dioxide into the gluten web.",
    "The goalkeeper dived to the left, but the penalty kick curled into the top right corner.",
]


def make_pairs(n: int, salt: str = "") -> list[dict]:
    """n distinct pairs of short real-looking texts that share datasets across pairs."""
    texts = [f"{TOPICS[i % 5]} ({salt}note {i})" for i in range(max(4, n // 2))]
    return [{"id": f"p{i}", "x": texts[i % len(texts)], "y": texts[(3 * i + 1) % len(texts)]} for i in range(n)]


def assert_same(got: object, want: object, where: str = "") -> None:
    """Equal documents, floats bit for bit; `where` names the first difference."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for k in want:
            assert_same(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}/{i}")
    else:
        assert got == want, where


def submit(http: httpx.Client, model: str, pairs: list[dict]) -> httpx.Response:
    return http.post("/v1/jobs", json={"model": model, "pairs": pairs})


def embedded_results(model: str, pairs: list[dict]) -> list[dict]:
    with serve(fast_settings()) as url, httpx.Client(base_url=url, timeout=60) as http:
        job = http.post("/v1/jobs", json={"model": model, "pairs": pairs}).json()
        assert wait_job(http, job["id"])["status"] == "succeeded"
        return http.get(f"/v1/jobs/{job['id']}/results").json()["results"]


def test_score_cache_models_and_idempotency(redis_url: str, workers: list, tmp_path: Path) -> None:
    workers.append(start_worker(redis_url, "gzip", tmp_path, "a"))
    wait_published(redis_url, ["gzip"])
    with serve(distributed_settings(redis_url)) as url, httpx.Client(base_url=url, timeout=60) as http:
        assert [m["id"] for m in http.get("/v1/models").json()["models"]] == ["gzip"]  # what workers publish
        assert http.get("/readyz").json()["status"] == "ready"
        no_worker = http.post("/v1/score", json={"x": "a", "y": "b", "model": "tiny-random"})
        assert no_worker.status_code == 503 and no_worker.headers["content-type"] == "application/problem+json"

        body = {"x": TOPICS[0], "y": [TOPICS[1], TOPICS[2]], "model": "gzip"}
        first = http.post("/v1/score", json=body).json()
        again = http.post("/v1/score", json=body).json()
        assert (first["cached"], again["cached"]) == (False, True)
        assert {k: v for k, v in first.items() if k != "cached"} == {k: v for k, v in again.items() if k != "cached"}
        with serve(fast_settings()) as emb, httpx.Client(base_url=emb, timeout=60) as local:
            reference = local.post("/v1/score", json=body).json()
            fast = local.post("/v1/score", json=body).content  # a cached answer: service/fastpath.py
        with serve(fast_settings(score_fast_path=False)) as emb, httpx.Client(base_url=emb, timeout=60) as local:
            local.post("/v1/score", json=body)
            routed = local.post("/v1/score", json=body).content
        assert first == reference  # the same document as embedded mode, to the last bit
        assert fast == routed and http.post("/v1/score", json=body).content == fast  # and the same bytes

        job = {"model": "gzip", "pairs": make_pairs(6)}
        a = http.post("/v1/jobs", json=job, headers={"Idempotency-Key": "k1"})
        b = http.post("/v1/jobs", json=job, headers={"Idempotency-Key": "k1"})
        assert a.status_code == b.status_code == 202 and a.json()["id"] == b.json()["id"]
        other = http.post("/v1/jobs", json={**job, "pairs": make_pairs(5)}, headers={"Idempotency-Key": "k1"})
        assert other.status_code == 409
        assert wait_job(http, a.json()["id"])["status"] == "succeeded"
        got = http.get(f"/v1/jobs/{a.json()['id']}/results").json()["results"]
        assert got == embedded_results("gzip", job["pairs"])  # a classical compressor: bit for bit

        # limits hold in distributed mode too
        assert http.post("/v1/score", content=b"x" * (9 * 1024 * 1024)).status_code == 413
        nested = http.post("/v1/score", content=b"[" * 100_000, headers={"content-type": "application/json"})
        assert nested.status_code == 422
        assert http.get("/v1/jobs/job_nope").status_code == 404


def test_two_workers_share_a_job_and_match_embedded(redis_url: str, workers: list, tmp_path: Path) -> None:
    pairs = make_pairs(40)
    settings = {"batch_max_items": 8}
    metrics_port = free_port()
    workers += [
        start_worker(redis_url, "tiny-random", tmp_path, "a", metrics_port=metrics_port, **settings),
        start_worker(redis_url, "tiny-random", tmp_path, "b", **settings),
    ]
    reference = embedded_results("tiny-random", pairs)  # while the workers load
    wait_published(redis_url, ["tiny-random"], workers=2)
    with serve(distributed_settings(redis_url)) as url, httpx.Client(base_url=url, timeout=60) as http:
        job = http.post("/v1/jobs", json={"model": "tiny-random", "pairs": pairs}).json()
        progress = wait_job(http, job["id"])["progress"]
        assert (progress["done"], progress["total"]) == (40, 40)
        assert progress["tokens_done"] == progress["tokens_total"] > 0  # workers add the tokens they code
        got = http.get(f"/v1/jobs/{job['id']}/results").json()["results"]
        assert_same(got, reference)  # bit for bit: the CPU engine is deterministic (models/invariant.py)

        # a redelivered entry changes nothing: replay one task of the finished job
        r = redis.Redis.from_url(redis_url, decode_responses=True)
        stream = keys.stream("tiny-random")
        before = http.get(f"/v1/jobs/{job['id']}").json()["progress"]
        record = r.hgetall(keys.job(job["id"]))
        hx = hashlib.sha256(pairs[0]["x"].encode()).hexdigest()
        r.xadd(stream, {"job": job["id"], "model": "tiny-random", "ns": record["ns"], "hx": hx, "bytes": "10"})
        time.sleep(1.0)
        assert http.get(f"/v1/jobs/{job['id']}").json()["progress"] == before  # nothing counted twice
        assert http.get(f"/v1/jobs/{job['id']}/results").json()["results"] == got
    exposition = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text  # worker a's Prometheus metrics
    assert 'codelen_worker_entries_total{outcome="batches"}' in exposition and "codelen_batch_tasks_count" in exposition
    logs = [w.log() for w in workers]
    for w in workers:
        assert w.stop() == 0  # SIGTERM: graceful
    counts = [log.rsplit("stopped: ", 1)[1] for log in (w.log() for w in workers)]
    assert all("'computed': 0," not in c for c in counts), (counts, logs)  # both did a share


def test_worker_killed_mid_job_then_restarted(redis_url: str, workers: list, tmp_path: Path) -> None:
    """SIGKILL twice in the middle of a job (lzma at preset 9 on ~16 kB texts is slow enough to
    kill mid-batch); the reclaimed entries are redone: exactly 60 results, equal to embedded."""
    texts = [f"{TOPICS[i % 5]} {i} " * 160 for i in range(30)]
    pairs = [{"id": f"k{i}", "x": texts[i % 30], "y": texts[(7 * i + 3) % 30]} for i in range(60)]
    settings = {"batch_max_items": 2}
    victim = start_worker(redis_url, "lzma", tmp_path, "victim", **settings)
    workers += [victim, start_worker(redis_url, "lzma", tmp_path, "steady", **settings)]
    reference = embedded_results("lzma", pairs)
    wait_published(redis_url, ["lzma"], workers=2)
    with serve(distributed_settings(redis_url)) as url, httpx.Client(base_url=url, timeout=60) as http:
        job = submit(http, "lzma", pairs).json()
        kills = 0
        deadline = time.monotonic() + 60
        while kills < 2 and time.monotonic() < deadline:
            done = http.get(f"/v1/jobs/{job['id']}").json()["progress"]["done"]
            if done > 8 * (kills + 1):
                victim.kill()  # mid-batch: its pending entries must be reclaimed by someone
                kills += 1
                victim = start_worker(redis_url, "lzma", tmp_path, "victim", **settings)
                workers.append(victim)
            time.sleep(0.01)
        final = wait_job(http, job["id"], timeout=90)
        assert kills == 2 and final["status"] == "succeeded", final
        got = http.get(f"/v1/jobs/{job['id']}/results").json()["results"]
    assert len(got) == 60 and [r["id"] for r in got] == [p["id"] for p in pairs]
    assert got == reference  # a classical compressor: bit for bit


def test_redis_restarted_from_aof_with_jobs_queued(
    redis_server: RedisServer, redis_url: str, workers: list, tmp_path: Path
) -> None:
    with serve(distributed_settings(redis_url)) as url, httpx.Client(base_url=url, timeout=60) as http:
        r = redis.Redis.from_url(redis_url, decode_responses=True)
        workers.append(start_worker(redis_url, "gzip", tmp_path, "first"))
        wait_published(redis_url, ["gzip"])
        workers.pop().stop()  # the model info stays published; now nothing consumes the queue
        ids = [submit(http, "gzip", make_pairs(8, salt=f"j{j} ")).json()["id"] for j in range(5)]
        assert r.xlen(keys.stream("gzip")) > 0
        redis_server.restart()  # SIGTERM (AOF fsync) and start again from the append-only file
        assert http.get(f"/v1/jobs/{ids[0]}").json()["status"] == "queued"  # the API reconnects by itself
        workers.append(start_worker(redis_url, "gzip", tmp_path, "second"))
        for job_id in ids:
            assert wait_job(http, job_id)["status"] == "succeeded"
            assert len(http.get(f"/v1/jobs/{job_id}/results").json()["results"]) == 8


def test_poisoned_items_are_dead_lettered_and_fail_their_job(redis_url: str, workers: list, tmp_path: Path) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    workers.append(start_worker(redis_url, "gzip", tmp_path, "publisher"))
    wait_published(redis_url, ["gzip"])
    workers.pop().stop()
    stream = keys.stream("gzip")
    with serve(distributed_settings(redis_url)) as url, httpx.Client(base_url=url, timeout=60) as http:
        # 1. an item whose dataset text is gone (evicted) fails at once, with the reason
        gone = submit(http, "gzip", [{"id": "a", "x": "alpha " * 9, "y": "beta " * 9}]).json()
        r.delete(keys.data(hashlib.sha256(("beta " * 9).encode()).hexdigest()))
        # 2. an item that crashed its worker each time it was delivered (simulated by a consumer
        #    that takes it and never acknowledges) is dead-lettered after max_deliveries
        crash = submit(http, "gzip", [{"id": "c", "x": "gamma " * 9, "y": "delta " * 9}]).json()
        r.xreadgroup(keys.GROUP, "crasher", {stream: ">"}, count=1000)
        crash_ids = [m[0] for m in r.xrange(stream) if m[1]["job"] == crash["id"]]
        for _ in range(2):  # delivered 3 times in all; the worker's claim makes it 4 > max_deliveries
            r.xclaim(stream, keys.GROUP, "crasher", 0, crash_ids[:1])
        r.xclaim(stream, keys.GROUP, "crasher", 0, crash_ids[1:], justid=True)  # the rest: delivered once
        # 3. an entry that is not a task at all
        r.xadd(stream, {"junk": "1"})
        workers.append(start_worker(redis_url, "gzip", tmp_path, "real"))
        failed = wait_job(http, gone["id"])
        assert failed["status"] == "failed" and "gone from Redis" in failed["error"]
        failed = wait_job(http, crash["id"], timeout=30)
        assert failed["status"] == "failed" and "delivered 4 times" in failed["error"], failed
    dead = [fields for _, fields in r.xrange(keys.DEAD_LETTER)]
    reasons = [d["reason"] for d in dead]
    assert any("gone from Redis" in x for x in reasons) and any("delivered 4 times" in x for x in reasons)
    assert any("malformed" in x for x in reasons)
    assert {d.get("job") for d in dead} >= {gone["id"], crash["id"]}


def test_cancel_stops_remaining_items(redis_url: str, workers: list, tmp_path: Path) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    workers.append(start_worker(redis_url, "gzip", tmp_path, "publisher"))
    wait_published(redis_url, ["gzip"])
    workers.pop().stop()
    with serve(distributed_settings(redis_url)) as url, httpx.Client(base_url=url, timeout=60) as http:
        job = http.post("/v1/jobs", json={"model": "gzip", "pairs": make_pairs(30, salt="cancel ")}).json()
        cancelled = http.delete(f"/v1/jobs/{job['id']}").json()
        assert cancelled["status"] == "cancelled"
        assert http.delete(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"  # idempotent
        workers.append(start_worker(redis_url, "gzip", tmp_path, "late"))
        deadline = time.monotonic() + 30
        while (pending := r.xinfo_groups(keys.stream("gzip"))[0]) and (pending["lag"] or pending["pending"]):
            assert time.monotonic() < deadline, pending
            time.sleep(0.05)
        assert not list(r.scan_iter(match=f"{keys.CACHE}:*"))  # nothing of the cancelled job was computed
        assert http.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"


def test_overload_answers_429_with_retry_after(redis_url: str, workers: list, tmp_path: Path) -> None:
    workers.append(start_worker(redis_url, "gzip", tmp_path, "publisher"))
    wait_published(redis_url, ["gzip"])
    workers.pop().stop()
    settings = distributed_settings(redis_url, max_queue_items=50)
    with serve(settings) as url, httpx.Client(base_url=url, timeout=60) as http:
        codes = [submit(http, "gzip", make_pairs(4, salt=f"o{i} ")).status_code for i in range(8)]
        assert codes[0] == 202 and 429 in codes and set(codes) <= {202, 429}
        busy = http.post("/v1/score", json={"x": "new text", "y": "other text", "model": "gzip"})
        assert busy.status_code == 429 and int(busy.headers["retry-after"]) > 0
        assert busy.headers["content-type"] == "application/problem+json"
        depth = redis.Redis.from_url(redis_url).xlen(keys.stream("gzip"))
        assert depth <= 50


def test_api_keys_and_shared_rate_limit(redis_url: str, workers: list, tmp_path: Path) -> None:
    workers.append(start_worker(redis_url, "gzip", tmp_path, "w"))
    wait_published(redis_url, ["gzip"])
    digest = hashlib.sha256(b"s3cret").hexdigest()
    settings = distributed_settings(redis_url, api_keys=digest, rate_limit_per_s=0.5, rate_limit_burst=3)
    job = {"model": "gzip", "pairs": make_pairs(3)}
    with serve(settings) as a, serve(settings) as b:  # two API processes, one Redis
        anonymous = httpx.post(f"{a}/v1/jobs", json=job)
        assert anonymous.status_code == 401 and anonymous.headers["content-type"] == "application/problem+json"
        wrong = httpx.post(f"{a}/v1/jobs", json=job, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert redis.Redis.from_url(redis_url).xlen(keys.stream("gzip")) == 0  # nothing enqueued
        assert httpx.get(f"{a}/healthz").status_code == 200  # open
        auth = {"Authorization": "Bearer s3cret"}
        codes = [httpx.get(f"{url}/v1/models", headers=auth).status_code for url in (a, b, a, b)]
        assert codes[:3] == [200, 200, 200] and codes[3] == 429  # one bucket shared across processes
