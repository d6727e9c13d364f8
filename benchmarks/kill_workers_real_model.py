"""Issue 3's check with the real model: API + two `codelen worker` processes on a Redis with AOF,
300 AG News pairs, worker w1 killed with SIGKILL at 40, 80 and 120 pairs done (and restarted);
then the same pairs in embedded mode, and the results compared bit for bit.

    python benchmarks/kill_workers_real_model.py [../shared/data/ag_news/test.csv]

About 8 minutes on 2 CPU cores. Needs redis-server on PATH; starts its own on a free port.
"""

import csv
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

DATA = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/ag_news/test.csv"
WORK = tempfile.mkdtemp(prefix="codelen-kill-")


def port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_ready(c: httpx.Client) -> None:
    """Until /readyz answers 200 and the model is listed (in distributed mode: a worker published it)."""
    while True:
        try:
            if c.get("/readyz").status_code == 200 and any(
                m["id"] == "smollm2-135m" for m in c.get("/v1/models").json()["models"]
            ):
                return
        except httpx.TransportError:
            pass
        time.sleep(1)


rows = list(csv.reader(open(DATA)))[1000:1600]
texts = [r[1] + ". " + r[2].replace("\\", "\n") for r in rows]
pairs = [{"id": str(i), "x": texts[i], "y": texts[i + 300]} for i in range(300)]
rp = port()
redis = subprocess.Popen(
    ["redis-server", "--port", str(rp), "--bind", "127.0.0.1", "--appendonly", "yes", "--dir", WORK, "--save", ""],
    stdout=subprocess.DEVNULL,
)
time.sleep(1)
env = {
    **os.environ,
    "REDIS_URL": f"redis://127.0.0.1:{rp}/0",
    "CODELEN_MODELS": "smollm2-135m",
    "CODELEN_RECLAIM_IDLE_S": "20",
}
ap = port()
api = subprocess.Popen(["codelen", "serve", "--port", str(ap), "--log-level", "warning"], env=env)


def worker(name):
    return subprocess.Popen(
        ["codelen", "worker", "--name", name], env=env, stdout=open(f"{WORK}/{name}.log", "a"), stderr=subprocess.STDOUT
    )


w1, w2 = worker("w1"), worker("w2")
c = httpx.Client(base_url=f"http://127.0.0.1:{ap}", timeout=120)
wait_ready(c)
t0 = time.time()
job = c.post("/v1/jobs", json={"model": "smollm2-135m", "pairs": pairs}).json()
kills = 0
while True:
    s = c.get(f"/v1/jobs/{job['id']}").json()
    print(f"{time.time() - t0:5.0f}s {s['status']} {s['progress']} kills={kills}", flush=True)
    if s["status"] in ("succeeded", "failed", "cancelled"):
        break
    if kills < 3 and s["progress"]["done"] >= 40 * (kills + 1):
        w1.send_signal(signal.SIGKILL)
        w1.wait()
        kills += 1
        print("killed w1", flush=True)
        time.sleep(2)
        w1 = worker("w1")
    time.sleep(5)
dist = c.get(f"/v1/jobs/{job['id']}/results").json()["results"]
print(
    "distributed:",
    s["status"],
    len(dist),
    "results,",
    len({r["id"] for r in dist}),
    "distinct ids",
    f"{time.time() - t0:.0f}s",
)
for p in (api, w1, w2):
    p.terminate()
for p in (api, w1, w2):
    p.wait(timeout=60)
redis.terminate()
env2 = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
env2.update(CODELEN_MODELS="smollm2-135m", CODELEN_PRELOAD="smollm2-135m")
ep = port()
emb = subprocess.Popen(["codelen", "serve", "--port", str(ep), "--log-level", "warning"], env=env2)
c = httpx.Client(base_url=f"http://127.0.0.1:{ep}", timeout=120)
wait_ready(c)
t0 = time.time()
job = c.post("/v1/jobs", json={"model": "smollm2-135m", "pairs": pairs}).json()
while (s := c.get(f"/v1/jobs/{job['id']}").json())["status"] not in ("succeeded", "failed", "cancelled"):
    time.sleep(5)
embr = c.get(f"/v1/jobs/{job['id']}/results").json()["results"]
emb.terminate()
emb.wait()
print("embedded:", s["status"], len(embr), f"{time.time() - t0:.0f}s")


def key(r: dict) -> tuple:
    return (r["code_lengths"], r["conditional"], r["ncd"], r["shared_information"])


by = {r["id"]: key(r) for r in embr}
same = sum(key(r) == by.get(r["id"]) for r in dist)
print(f"bit-identical results: {same} of {len(dist)}")
