"""A classifier of N examples and a prediction job of M texts, through the real service over HTTP.

    nice python benchmarks/classify_job.py --data ../shared/data/ag_news/test.csv \\
        --train-per-class 250 --test-per-class 250 --model smollm2-135m --method knn-lm

Starts `codelen serve` (embedded mode, only the asked model and gzip loaded) as a subprocess,
creates the classifier (`POST /v1/classifiers`: the fit, e.g. knn-lm's LM pass over the examples),
submits the test texts as one prediction job (`POST /v1/classifiers/{id}/predictions`), polls it
with progress, and prints the times (create, job), texts/s, accuracy against the split's labels,
and the conditions. The issue's scale is 1,000 examples and 1,000 texts (AG News: 250 per class).
Same split as `codelen eval`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.servers import service  # noqa: E402
from classify.data import load_examples, split  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--text-col", default="text")
    p.add_argument("--train-per-class", type=int, default=250)
    p.add_argument("--test-per-class", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="knn-lm")
    p.add_argument("--options", default="{}", help="method options as JSON")
    args = p.parse_args()

    sp = split(load_examples(args.data, text_col=args.text_col), args.train_per_class, args.test_per_class, args.seed)
    examples = [{"text": e.text, "label": e.label} for e in sp.train]
    texts, truth = [e.text for e in sp.test], [e.label for e in sp.test]
    models = f"{args.model},gzip"
    with tempfile.TemporaryDirectory() as tmp:
        server = service(models=models, preload=args.model, log_dir=Path(tmp), ready_path="/healthz", timeout=300)
        with server as svc, httpx.Client(base_url=svc.url, timeout=3600) as api:
            body = {
                "model": args.model,
                "method": args.method,
                "examples": examples,
                "options": json.loads(args.options),
            }
            t0 = time.perf_counter()
            r = api.post("/v1/classifiers", json=body)
            r.raise_for_status()
            cid = r.json()["id"]
            while r.json()["status"] == "fitting":  # 202: the fit outlasted the wait
                time.sleep(2)
                r = api.get(f"/v1/classifiers/{cid}")
            create_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            r = api.post(f"/v1/classifiers/{cid}/predictions", json={"texts": texts})
            r.raise_for_status()
            location = r.headers["location"]
            while True:
                job = api.get(location).json()
                print(f"\r  {job['status']} {job['done']}/{job['total']}", end="", file=sys.stderr, flush=True)
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(2)
            job_s = time.perf_counter() - t0
            print(file=sys.stderr)
    if job["status"] != "succeeded":
        print(json.dumps({"status": job["status"], "error": job.get("error")}))
        return 1
    right = sum(p["label"] == t for p, t in zip(job["predictions"], truth, strict=True))
    print(
        json.dumps(
            {
                "data": args.data,
                "model": args.model,
                "method": args.method,
                "examples": len(examples),
                "texts": len(texts),
                "create_s": round(create_s, 1),
                "job_s": round(job_s, 1),
                "texts_per_s": round(len(texts) / job_s, 2),
                "total_s": round(create_s + job_s, 1),
                "accuracy": round(right / len(texts), 4),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                "date": datetime.date.today().isoformat(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
