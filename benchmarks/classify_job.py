"""A classifier of N examples and a prediction job of M texts, through the real service over HTTP,
in embedded or distributed mode.

    nice python benchmarks/classify_job.py --data ../shared/data/ag_news/test.csv \\
        --train-per-class 250 --test-per-class 250 --model smollm2-135m --method probe \\
        --mode distributed --workers 2 --kill-worker-at 0.4 --compare-eval

Starts the service (benchmarks/servers.py): embedded mode is `codelen serve` alone with the model
preloaded; distributed mode is a redis-server, `--workers` x `codelen worker` (each with its own
metrics port) and a `codelen serve` that loads no model. Then:

1. creates the classifier (`POST /v1/classifiers`: a fit job; 201 when it finished within the
   API's wait, else 202 and we poll the classifier until it is ready);
2. submits the test texts as one prediction job (`POST /v1/classifiers/{id}/predictions`) and
   polls `/v1/jobs/{id}`; with `--kill-worker-at F` (distributed) SIGKILLs, once the progress
   passes F, the worker that computed most of this job so far; the job must still succeed;
3. reads the results (`/v1/jobs/{id}/results`), the accuracy against the split's labels, the API's
   `/readyz` `models_loaded` (empty in distributed mode: the workers hold the models), and per
   worker the `codelen_classify_values_total` counters of its `/metrics` (values computed by a
   model pass, values reused from the cache; a killed worker's are its last ones read);
4. creates the same classifier again and predicts the same texts again with it, and prints what
   the workers computed for them (nothing, when the cache does its work) and whether the
   predictions are the same;
5. with `--compare-eval`, runs `codelen eval` on the same split, method, model and options after
   the service has stopped, and prints its accuracy beside the job's (the command is printed
   either way).

The issue's scale is 1,000 examples and 1,000 texts (AG News: 250 per class). Same split as
`codelen eval` (classify.data.split with the same seed). The report is one JSON document on
stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.servers import ROOT, service  # noqa: E402
from classify.data import load_examples, split  # noqa: E402
from codelen.settings import Settings  # noqa: E402

COUNTER = "codelen_classify_values_total"  # {outcome="computed"|"reused"}, per worker process
TERMINAL = ("succeeded", "failed", "cancelled")


def default(setting: str) -> object:
    """A setting's default: the service runs under the defaults (servers.py drops our CODELEN_*)."""
    return Settings.model_fields[setting].default


def worker_values(port: int) -> dict[str, float] | None:
    """The worker's classify value counters ({"computed": n, "reused": n}); None if it does not answer."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    out = {"computed": 0.0, "reused": 0.0}
    for line in text.splitlines():
        if line.startswith(COUNTER + "{"):
            for outcome in out:
                if f'outcome="{outcome}"' in line:
                    out[outcome] += float(line.split()[-1])
    return out


class Workers:
    """The last counters read from each worker (a SIGKILLed one keeps its last reading)."""

    def __init__(self, ports: tuple[int, ...], pids: tuple[int, ...]) -> None:
        self.ports, self.pids = ports, pids
        self.last: list[dict[str, float]] = [{"computed": 0.0, "reused": 0.0} for _ in ports]
        self.killed: set[int] = set()

    def read(self) -> list[dict[str, float]]:
        for i, port in enumerate(self.ports):
            if i not in self.killed and (got := worker_values(port)) is not None:
                self.last[i] = got
        return [dict(v) for v in self.last]


def delta(after: list[dict[str, float]], before: list[dict[str, float]]) -> list[dict[str, int]]:
    return [{k: int(a[k] - b[k]) for k in a} for a, b in zip(after, before, strict=True)]


def create(api: httpx.Client, body: dict) -> tuple[dict, int, float]:
    """POST /v1/classifiers, then poll until the fit is done: (classifier, first status code, seconds)."""
    t0 = time.perf_counter()
    r = api.post("/v1/classifiers", json=body)
    r.raise_for_status()
    code, info = r.status_code, r.json()
    while info["status"] == "fitting":  # 202: the fit outlasted the API's wait
        time.sleep(1)
        info = api.get(f"/v1/classifiers/{info['id']}").json()
    if info["status"] != "ready":
        raise RuntimeError(f"the fit did not succeed: {info}")
    return info, code, time.perf_counter() - t0


def predict(
    api: httpx.Client, cid: str, texts: list[str], workers: Workers | None, kill_at: float | None
) -> tuple[dict, list[dict], float, dict | None]:
    """One prediction job, polled to its end: (job, rows, seconds, what was killed when)."""
    t0 = time.perf_counter()
    r = api.post(f"/v1/classifiers/{cid}/predictions", json={"texts": texts})
    r.raise_for_status()
    job_id = r.json()["id"]
    before = workers.read() if workers else []
    killed = None
    while True:
        job = api.get(f"/v1/jobs/{job_id}").json()
        done, total = job["progress"]["done"], job["progress"]["total"]
        print(f"\r  {job['status']} {done}/{total}", end="", file=sys.stderr, flush=True)
        if job["status"] in TERMINAL:
            break
        if workers and kill_at is not None and killed is None and done >= kill_at * total:
            # the worker that computed most of this job so far: it holds part of it
            now = delta(workers.read(), before)
            victim = max(range(len(now)), key=lambda i: now[i]["computed"])
            os.kill(workers.pids[victim], signal.SIGKILL)
            workers.killed.add(victim)
            killed = {
                "worker": victim,
                "pid": workers.pids[victim],
                "at_done": done,
                "total": total,
                "at_s": round(time.perf_counter() - t0, 1),
                "its_computed_so_far": now[victim]["computed"],
            }
            print(f"\n  SIGKILL worker {victim} (pid {workers.pids[victim]}) at {done}/{total}", file=sys.stderr)
        elif workers:
            workers.read()
        time.sleep(0.5)
    seconds = time.perf_counter() - t0
    print(file=sys.stderr)
    rows = api.get(f"/v1/jobs/{job_id}/results").json()["results"] if job["status"] == "succeeded" else []
    return job, rows, seconds, killed


def eval_command(args: argparse.Namespace, options: dict) -> list[str]:
    cmd = ["codelen", "eval", "--data", args.data, "--text-col", args.text_col, "--method", args.method,
           "--model", args.model, "--train-per-class", str(args.train_per_class),
           "--test-per-class", str(args.test_per_class), "--seed", str(args.seed)]  # fmt: skip
    for k, v in options.items():
        if k != "seed":
            cmd += ["--option", f"{k}={json.dumps(v)}"]
    return cmd


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--text-col", default="text")
    p.add_argument("--train-per-class", type=int, default=250)
    p.add_argument("--test-per-class", type=int, default=250)
    p.add_argument("--seed", type=int, default=0, help="the split's seed, and the method's (as codelen eval)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="knn-lm")
    p.add_argument("--options", default="{}", help="method options as JSON")
    p.add_argument("--mode", default="embedded", choices=["embedded", "distributed"])
    p.add_argument("--workers", type=int, default=2, help="distributed: codelen worker processes")
    p.add_argument("--kill-worker-at", type=float, metavar="F", help="distributed: SIGKILL a worker past progress F")
    p.add_argument("--torch-threads", type=int, help="OMP_NUM_THREADS of each service process (default: torch's)")
    p.add_argument("--compare-eval", action="store_true", help="also run codelen eval on the same split")
    p.add_argument("--logs", help="keep the service's logs in this folder (default: a temporary one)")
    args = p.parse_args()
    if args.kill_worker_at is not None and (args.mode != "distributed" or args.workers < 2):
        p.error("--kill-worker-at needs --mode distributed and --workers >= 2")

    sp = split(load_examples(args.data, text_col=args.text_col), args.train_per_class, args.test_per_class, args.seed)
    examples = [{"text": e.text, "label": e.label} for e in sp.train]
    texts, truth = [e.text for e in sp.test], [e.label for e in sp.test]
    options = {"seed": args.seed, **json.loads(args.options)}  # codelen eval passes its --seed the same way
    body = {"model": args.model, "method": args.method, "examples": examples, "options": options}
    env = {"OMP_NUM_THREADS": str(args.torch_threads)} if args.torch_threads else {}
    distributed = args.mode == "distributed"
    report: dict = {
        "mode": args.mode,
        "workers": args.workers if distributed else 0,
        "data": args.data,
        "model": args.model,
        "method": args.method,
        "options": options,
        "seed": args.seed,
        "examples": len(examples),
        "texts": len(texts),
    }
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(args.logs or tmp)
        logs.mkdir(parents=True, exist_ok=True)
        kw: dict = dict(models=f"{args.model},gzip", log_dir=logs, env=env, timeout=600)
        if distributed:  # the API loads nothing; each worker loads the model and serves its metrics
            server = service("distributed", workers=args.workers, worker_metrics=True, **kw)
        else:
            server = service(preload=args.model, ready_path="/healthz", **kw)
        with server as svc, httpx.Client(base_url=svc.url, timeout=3600) as api:
            workers = Workers(svc.worker_metrics_ports, svc.worker_pids) if distributed else None
            start = workers.read() if workers else []

            info, code, create_s = create(api, body)
            after_create = workers.read() if workers else []
            fit_job = api.get(f"/v1/jobs/{info['fit_job']}").json() if info.get("fit_job") else {}
            report["create"] = {
                "s": round(create_s, 1),
                "status_code": code,
                "waited_for_fit_job": code == 202,
                "fit_job_status": fit_job.get("status"),
                "fitted": info.get("fitted"),
            }
            if workers:
                report["create"]["per_worker"] = delta(after_create, start)

            job, rows, job_s, killed = predict(api, info["id"], texts, workers, args.kill_worker_at)
            after_job = workers.read() if workers else []
            report["predict"] = {
                "status": job["status"],
                "error": job.get("error"),
                "s": round(job_s, 1),
                "texts_per_s": round(len(texts) / job_s, 2),
                "progress": job["progress"],
            }
            if workers:
                report["predict"]["per_worker"] = delta(after_job, after_create)
                report["predict"]["killed"] = killed
            predictions = [r["label"] for r in rows]
            if predictions:
                right = sum(p == t for p, t in zip(predictions, truth, strict=True))
                report["accuracy"] = round(right / len(texts), 4)

            ready = api.get("/readyz").json()
            metrics = api.get("/metrics").text
            report["api"] = {
                "readyz_status": ready.get("status"),
                "models_loaded": ready.get("models_loaded"),
                "metrics_models_loaded": [ln for ln in metrics.splitlines() if ln.startswith("codelen_models_loaded{")],
            }

            # the same classifier again, and the same texts again: every value from the cache
            info2, code2, create2_s = create(api, body)
            after_create2 = workers.read() if workers else []
            job2, rows2, job2_s, _ = predict(api, info2["id"], texts, workers, None)
            after_job2 = workers.read() if workers else []
            report["again"] = {
                "create_s": round(create2_s, 1),
                "create_status_code": code2,
                "predict_status": job2["status"],
                "predict_s": round(job2_s, 1),
                "same_predictions": [r["label"] for r in rows2] == predictions and bool(predictions),
                "same_rows": rows2 == rows and bool(rows),
            }
            if workers:
                report["again"]["create_per_worker"] = delta(after_create2, after_job)
                report["again"]["predict_per_worker"] = delta(after_job2, after_create2)
                report["again"]["computed"] = sum(
                    d["computed"] for d in report["again"]["create_per_worker"] + report["again"]["predict_per_worker"]
                )

    cmd = eval_command(args, options)
    report["eval_command"] = shlex.join(cmd)
    if args.compare_eval:
        eval_env = {k: v for k, v in os.environ.items() if not k.startswith("CODELEN_") and k != "REDIS_URL"}
        eval_env.update(env)
        t0 = time.perf_counter()
        run = [sys.executable, "-m", "codelen.cli", *cmd[1:], "--json", "--quiet"]
        out = subprocess.run(run, cwd=ROOT, env=eval_env, capture_output=True, text=True, check=False)
        if out.returncode == 0:
            result = json.loads(out.stdout)["results"][0]
            report["eval"] = {
                "accuracy": result["accuracy"],
                "fitted": result.get("fitted"),
                "s": round(time.perf_counter() - t0, 1),
                "same_accuracy": result["accuracy"] == report.get("accuracy"),
            }
        else:
            report["eval"] = {"error": out.stderr[-2000:]}

    torch_threads = None
    try:
        import torch

        torch_threads = torch.get_num_threads()
    except ImportError:
        pass
    report["conditions"] = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end",
        "torch_threads": args.torch_threads or torch_threads,
        "omp_num_threads_per_process": args.torch_threads,
        "classify_chunk_texts": default("classify_chunk_texts"),
        "reclaim_idle_s": default("reclaim_idle_s"),
        "score_wait_s": default("score_wait_s"),
        "batch_max_items": default("batch_max_items"),
        "python": platform.python_version(),
    }
    print(json.dumps(report, indent=2))
    ok = job["status"] == "succeeded" and (not distributed or report["api"]["models_loaded"] == [])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
