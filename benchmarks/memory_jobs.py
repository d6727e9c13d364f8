"""Memory of embedded mode across big jobs: does the server give back what a job took?

    python benchmarks/memory_jobs.py [--jobs 3] [--datasets 500] [--model zstd] [--read json|ndjson|both]

Starts the real service as a subprocess (`codelen serve`, embedded mode, only the classical model
asked for), then runs `--jobs` matrix jobs in a row, each of `--datasets` short texts (AG News
test texts from ../shared/data when present, else generated sentences; different texts in each
job, so nothing is answered from the cache): submit, wait, read every result (JSON, JSON lines or
both, streamed and discarded), DELETE. Prints the server's RSS (/proc/<pid>/status) at the start,
after each job, and at the end, and the slowest GET /healthz answer seen by a poller that asks
every 20 ms throughout. The check (issue 16): the end RSS is within 100 MB of the start.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.servers import service  # noqa: E402

AG_NEWS = ROOT.parent / "shared" / "data" / "ag_news" / "test.csv"
WORDS = "river valley rain farmer cattle compiler source loop register orchestra score bread yeast goal".split()
LIMIT_MB = 100


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def texts(n: int) -> list[str]:
    if AG_NEWS.exists():
        with AG_NEWS.open(newline="") as f:
            rows = [f"{title}. {body}" for _, title, body in csv.reader(f)]
        if len(rows) >= n:
            return rows[:n]
    return [" ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(30)) + f" {i}" for i in range(n)]


class HealthPoller(threading.Thread):
    """GET /healthz every 20 ms; keeps the slowest answer (s) in each phase and the failures."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.worst, self.count, self.failures = url, 0.0, 0, 0
        self.phase = "start"
        self.by_phase: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self.stop.is_set():
                started = time.perf_counter()
                try:
                    ok = http.get("/healthz").status_code == 200
                except httpx.HTTPError:
                    ok = False
                took = time.perf_counter() - started
                self.worst = max(self.worst, took)
                self.by_phase[self.phase] = max(self.by_phase.get(self.phase, 0.0), took)
                self.count += 1
                self.failures += not ok
                self.stop.wait(0.02)


def read_results(http: httpx.Client, job_id: str, how: str) -> int:
    """Stream the results and drop them; returns the bytes read."""
    headers = {"Accept": "application/x-ndjson"} if how == "ndjson" else {}
    n = 0
    with http.stream("GET", f"/v1/jobs/{job_id}/results", headers=headers) as r:
        r.raise_for_status()
        for chunk in r.iter_bytes():
            n += len(chunk)
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=3)
    ap.add_argument("--datasets", type=int, default=500)
    ap.add_argument("--model", default="zstd")
    ap.add_argument("--read", choices=("json", "ndjson", "both"), default="both")
    args = ap.parse_args()

    pool = texts(args.jobs * args.datasets)
    print(f"# memory_jobs  {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}")
    print(f"# {platform.node()} {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(
        f"# embedded mode, model {args.model}, {args.jobs} matrix jobs of {args.datasets} datasets "
        f"({args.datasets * (args.datasets + 1) // 2} pairs each), results read as {args.read}, then DELETE"
    )
    # inherit: this shell's CODELEN_* settings (not REDIS_URL) apply to the server
    server = service(models=args.model, inherit=True, timeout=120)
    with server as svc, httpx.Client(base_url=svc.url, timeout=600) as http:
        http.post("/v1/score", json={"x": "warm", "y": "up", "model": args.model}).raise_for_status()
        time.sleep(1)
        start = rss_mb(svc.pid)
        print(f"start          RSS {start:7.1f} MB")
        poller = HealthPoller(svc.url)
        poller.start()
        for k in range(args.jobs):
            chunk = pool[k * args.datasets : (k + 1) * args.datasets]
            datasets = [{"id": f"j{k}d{i}", "data": t} for i, t in enumerate(chunk)]
            t0 = time.perf_counter()
            poller.phase = "run"
            r = http.post("/v1/jobs", json={"model": args.model, "matrix": {"datasets": datasets}})
            r.raise_for_status()
            job_id = r.json()["id"]
            while (job := http.get(f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
                time.sleep(0.2)
            assert job["status"] == "succeeded", job
            ran = time.perf_counter() - t0
            peak = rss_mb(svc.pid)
            t1 = time.perf_counter()
            poller.phase = "read"
            ways = ("json", "ndjson") if args.read == "both" else (args.read,)
            sizes = [read_results(http, job_id, how) for how in ways]
            read = time.perf_counter() - t1
            after_read = rss_mb(svc.pid)
            poller.phase = "delete"
            assert http.delete(f"/v1/jobs/{job_id}").status_code == 200
            gone = http.get(f"/v1/jobs/{job_id}").status_code == 404
            time.sleep(1)
            print(
                f"job {k + 1}: ran {ran:5.1f} s, RSS {peak:7.1f} MB when done, {after_read:7.1f} MB after "
                f"reading {'+'.join(f'{s / 1e6:.1f}' for s in sizes)} MB in {read:4.1f} s, "
                f"{rss_mb(svc.pid):7.1f} MB after DELETE ({'gone' if gone else 'still there'})"
            )
        time.sleep(2)
        poller.stop.set()
        poller.join()
        end = rss_mb(svc.pid)
    grew = end - start
    print(f"end            RSS {end:7.1f} MB  ({grew:+.1f} MB from the start)")
    phases = ", ".join(f"{k} {v * 1000:.0f}" for k, v in poller.by_phase.items())
    worst = poller.worst * 1000
    print(f"/healthz: {poller.count} asked, {poller.failures} failed, slowest {worst:.0f} ms ({phases} ms)")
    ok = grew <= LIMIT_MB and not poller.failures
    print(f"{'PASS' if ok else 'FAIL'}: memory back within {LIMIT_MB} MB of the start")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
