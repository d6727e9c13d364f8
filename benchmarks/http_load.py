"""Load benchmark of the HTTP layer: cached /v1/score answers per second and latency, both modes.

    python benchmarks/http_load.py [--mode embedded|distributed|both] [--concurrency 8 32]
                                   [--duration 10] [--json]

For each mode it starts the real service as a subprocess (`codelen serve`, model gzip so no LM is
loaded; in distributed mode also a redis-server on a free port and a `codelen worker`), fills the
cache with one request, then drives POST /v1/score with that same body from a *second process*
over loopback: a keep-alive HTTP/1.1 load generator (asyncio + uvloop, N connections, each sending
its next request when the previous answer arrived: closed loop). Every answer is checked (200 and
"cached": true). Prints the conditions (date, CPU, load, mode, concurrency) and one row per run.
Target (issue 3): p50 < 5 ms and >= 1,500 answers/s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.servers import service  # noqa: E402

BODY = {
    "x": "The river flooded the valley after a week of heavy rain; farmers moved their cattle uphill.",
    "y": ["A compiler turns source code into machine instructions.", "It optimizes loops and registers."],
    "model": "gzip",
}


# -- the load generator (runs in its own process) -------------------------------------------


async def _connection(
    host: str, port: int, request: bytes, stop_at: float, lat: list[float], errors: list[str]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length)
            lat.append(time.perf_counter() - started)
            if not head.startswith(b"HTTP/1.1 200") or b'"cached":true' not in body.replace(b" ", b""):
                errors.append(head.split(b"\r\n", 1)[0].decode() + " " + body[:200].decode(errors="replace"))
    finally:
        writer.close()


async def _generate(url: str, concurrency: int, duration: float, warmup: float) -> dict[str, object]:
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(BODY).encode()
    request = (
        f"POST /v1/score HTTP/1.1\r\nHost: {host}:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    warm_until = time.perf_counter() + warmup
    await asyncio.gather(*(_connection(host, int(port), request, warm_until, [], []) for _ in range(concurrency)))
    lat: list[float] = []
    errors: list[str] = []
    started = time.perf_counter()
    stop_at = started + duration
    await asyncio.gather(*(_connection(host, int(port), request, stop_at, lat, errors) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    lat.sort()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000

    return {
        "answers": len(lat),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "answers_per_s": len(lat) / elapsed,
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "max_ms": lat[-1] * 1000,
    }


def generate_main(args: argparse.Namespace) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(_generate(args.url, args.concurrency[0], args.duration, args.warmup))))


# -- the service under test --------------------------------------------------------------------


@contextmanager
def warm_service(mode: str, workdir: Path, fast_path: bool = True):
    """The service (models gzip; distributed: Redis and one gzip worker) with BODY's answer cached; yields its URL."""
    with service(mode, models="gzip", preload="gzip", fast_path=fast_path, log_dir=workdir) as svc:
        deadline = time.monotonic() + 60
        while True:  # fill the cache
            r = httpx.post(svc.url + "/v1/score", json=BODY, timeout=30)
            if r.status_code == 200 and r.json()["cached"]:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"cache never warmed: {r.status_code} {r.text[:300]}")
            time.sleep(0.1)
        yield svc.url


def conditions() -> dict[str, object]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import uvicorn

    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg_before": os.getloadavg(),
        "python": platform.python_version(),
        "uvicorn": uvicorn.__version__,
        "server": "codelen serve: 1 uvicorn process (uvloop + httptools when installed)",
        "generator": "second process, asyncio+uvloop keep-alive HTTP/1.1 closed loop",
        "model": "gzip (cache hits only)",
        "body_bytes": len(json.dumps(BODY)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["embedded", "distributed", "both"], default="both")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--baseline", action="store_true", help="also run without the cached fast path (same run)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)  # the load process
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate_main(args)
        return 0

    cond = conditions()
    modes = ["embedded", "distributed"] if args.mode == "both" else [args.mode]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            for fast in (False, True) if args.baseline else (True,):
                with warm_service(mode, Path(tmp), fast) as url:
                    for c in args.concurrency:
                        cmd = [sys.executable, __file__, "--generate", "--url", url, "--concurrency", str(c),
                               "--duration", str(args.duration), "--warmup", str(args.warmup)]  # fmt: skip
                        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                        rows.append({"mode": mode, "fast_path": fast, "concurrency": c, **json.loads(out)})
    if args.json:
        print(json.dumps({"conditions": cond, "runs": rows}, indent=2))
        return 0
    for k, v in cond.items():
        print(f"# {k}: {v}")
    print("| mode | cached fast path | concurrency | answers/s | p50 ms | p90 ms | p99 ms | max ms | errors |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        fast = "on" if r["fast_path"] else "off"
        print(f"| {r['mode']} | {fast} | {r['concurrency']} | {r['answers_per_s']:,.0f} | {r['p50_ms']:.2f} "
              f"| {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.1f} | {r['errors']} |")  # fmt: skip
        if r["first_error"]:
            print(f"#   first error: {r['first_error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
