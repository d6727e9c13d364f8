"""A matrix at the documented maximum runs to the end in distributed mode (issue 16, finding 8).

    python benchmarks/matrix_max_distributed.py [--datasets 500] [--model zstd] [--workers 1]

Starts a redis-server on a free port (no persistence), `--workers` `codelen worker` processes and
`codelen serve`, all with the default settings (CODELEN_MAX_QUEUE_ITEMS included), then submits
one matrix job of `--datasets` AG News texts (generated sentences without ../shared/data), waits
for it and reads its matrix. Prints the conditions, the answer to the submission, the time to
finish and the matrix's shape. Before the fix the submission got 429 with Retry-After forever.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.memory_jobs import texts  # noqa: E402
from benchmarks.servers import service  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", type=int, default=500)
    ap.add_argument("--model", default="zstd")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    if shutil.which("redis-server") is None:
        print("redis-server is missing (apt-get install redis-server)")
        return 2
    n_pairs = args.datasets * (args.datasets + 1) // 2
    print(f"# matrix_max_distributed  {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}")
    print(f"# {platform.node()} {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"# distributed mode, model {args.model}, {args.workers} worker(s), one matrix of {args.datasets} datasets")
    # no CODELEN_* of this shell: the defaults (CODELEN_MAX_QUEUE_ITEMS, _STREAM_MAX_LEN) are what is checked
    server = service("distributed", models=args.model, workers=args.workers, timeout=120)
    with server as svc, httpx.Client(base_url=svc.url, timeout=600) as http:
        datasets = [{"id": f"d{i}", "data": t} for i, t in enumerate(texts(args.datasets))]
        t0 = time.perf_counter()
        r = http.post("/v1/jobs", json={"model": args.model, "matrix": {"datasets": datasets}})
        print(f"POST /v1/jobs: {r.status_code} in {time.perf_counter() - t0:.1f} s  {r.text[:200]}")
        if r.status_code != 202:
            return 1
        job_id = r.json()["id"]
        while (job := http.get(f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
            time.sleep(1)
        took = time.perf_counter() - t0
        done, total = job["progress"]["done"], job["progress"]["total"]
        print(f"job {job['status']}: {done}/{total} pairs in {took:.0f} s")
        doc = http.get(f"/v1/jobs/{job_id}/results", params={"include": "matrix"}).json()
        m = doc.get("matrix") or {}
        shape = (len(m.get("ncd", [])), len((m.get("ncd") or [[]])[0]))
        print(f"matrix: {shape[0]} x {shape[1]} NCD ({n_pairs} pairs)")
        ok = job["status"] == "succeeded" and shape == (args.datasets, args.datasets)
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
