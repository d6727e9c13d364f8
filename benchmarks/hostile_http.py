"""Hostile HTTP clients against a real `codelen serve`, while a second process probes /healthz.

    python benchmarks/hostile_http.py [--mode embedded|distributed|both] [--slow-clients 200]

Attacks, one after the other (issue 16, findings 4-6): 64 MB of request headers; 200 slow clients
(half trickle their headers a byte a second, half their body); an 8 MB `[{},{},…]` body and an
8 MB `[[],[],…]` body; JSON nested 4 million deep; an 8 MB body of small strings (just under the
expansion bound: parsed). For each: the answer (status line, or how the connection ended), how long
the server held it, and the API process's resident memory before and after. Throughout, a probe
process sends GET /healthz on a new connection every 20 ms and records its latency: the target is
every probe under 100 ms. Prints the conditions and one line per attack, then the probe's numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.servers import HOST, service  # noqa: E402

CLASSICAL = "gzip,zlib,bz2,lzma,zstd"


# -- the probe (its own process, so the attackers' CPU does not delay its clock) -------------


def probe_main(port: int, out: Path) -> None:
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    lat: list[tuple[float, float]] = []  # (time, seconds; -1 on failure)
    request = b"GET /healthz HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n"
    while not stop:
        started = time.perf_counter()
        try:
            with socket.create_connection((HOST, port), timeout=5) as s:
                s.sendall(request)
                answer = b""
                while chunk := s.recv(4096):
                    answer += chunk
            ok = answer.startswith(b"HTTP/1.1 200")
        except OSError:
            ok = False
        lat.append((time.time(), time.perf_counter() - started if ok else -1.0))
        time.sleep(0.02)
    out.write_text(json.dumps(lat))


# -- the attacks -------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def _answer(reader: asyncio.StreamReader) -> str:
    try:
        data = await reader.read(65536)
    except (ConnectionError, OSError) as exc:
        return f"connection reset ({type(exc).__name__})"
    if not data:
        return "closed without an answer"
    return data.split(b"\r\n", 1)[0].decode("latin-1")


async def huge_headers(port: int, total: int = 64 * 1024 * 1024) -> dict[str, object]:
    reader, writer = await asyncio.open_connection(HOST, port)
    started, sent = time.perf_counter(), 0
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
    chunk = b"a" * 65536
    try:
        while sent < total:
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)
    except (ConnectionError, OSError):
        pass
    answer = await _answer(reader)
    writer.close()
    return {"answer": answer, "header_bytes_sent_before_close": sent, "held_s": time.perf_counter() - started}


async def _slow(port: int, kind: str, results: list[dict[str, object]], limit_s: float) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    started = time.perf_counter()
    if kind == "headers":
        head, trickle = b"GET /healthz HTTP/1.1\r\nHost: x\r\n", b"X-Slow: a\r\n"
    else:
        head, trickle = b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n", b"{"
    writer.write(head)
    read = asyncio.ensure_future(_answer(reader))
    answer = "still open at the end"
    while time.perf_counter() - started < limit_s:
        done, _ = await asyncio.wait({read}, timeout=1.0)
        if done:
            answer = read.result()
            break
        try:
            writer.write(trickle)
            await writer.drain()
        except (ConnectionError, OSError):
            answer = await read
            break
    else:
        read.cancel()
    results.append({"kind": kind, "answer": answer, "held_s": time.perf_counter() - started})
    writer.close()


async def slow_clients(port: int, n: int, limit_s: float) -> dict[str, object]:
    results: list[dict[str, object]] = []
    kinds = ["headers" if i % 2 == 0 else "body" for i in range(n)]
    await asyncio.gather(*(_slow(port, k, results, limit_s) for k in kinds))
    summary: dict[str, object] = {}
    for kind in ("headers", "body"):
        mine = [r for r in results if r["kind"] == kind]
        answers: dict[str, int] = {}
        for r in mine:
            answers[str(r["answer"])] = answers.get(str(r["answer"]), 0) + 1
        summary[f"slow_{kind}"] = {
            "clients": len(mine),
            "answers": answers,
            "max_held_s": round(max(float(r["held_s"]) for r in mine), 1),  # type: ignore[arg-type]
        }
    return summary


async def post(port: int, body: bytes) -> dict[str, object]:
    reader, writer = await asyncio.open_connection(HOST, port)
    started = time.perf_counter()
    head = b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    try:
        writer.write(head % len(body) + body)
        await writer.drain()
    except (ConnectionError, OSError):
        pass
    answer = await _answer(reader)
    writer.close()
    return {"answer": answer, "body_bytes": len(body), "seconds": round(time.perf_counter() - started, 3)}


def bodies() -> dict[str, bytes]:
    n = 2_800_000
    return {
        "8 MB [{},{},...]": b"[" + b",".join([b"{}"] * n) + b"]",
        "8 MB [[],[],...]": b"[" + b",".join([b"[]"] * n) + b"]",
        "JSON nested 4M deep": b"[" * 4_000_000 + b"]" * 4_000_000,
        "{x: 500k records of 8 B}": json.dumps({"x": ["record" + str(i % 10) for i in range(500_000)], "y": "b",
                                                "model": "gzip"}).encode(),  # fmt: skip
    }


async def attack(port: int, pid: int, slow: int, slow_limit_s: float) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []

    async def run(name: str, coro) -> None:
        before, started = rss_mb(pid), time.time()
        row = {"attack": name, **(await coro)}
        await asyncio.sleep(0.5)
        row.update(rss_before_mb=round(before, 1), rss_after_mb=round(rss_mb(pid), 1))
        row.update(started_at=started, ended_at=time.time())
        rows.append(row)
        print(json.dumps(row), flush=True)

    await run("64 MB of headers", huge_headers(port))
    await run(f"{slow} slow clients", slow_clients(port, slow, slow_limit_s))
    for name, body in bodies().items():
        await run(name, post(port, body))
    return rows


def _during(rows: list[dict[str, object]], t: float) -> str:
    for row in rows:
        if float(row["started_at"]) <= t <= float(row["ended_at"]):  # type: ignore[arg-type]
            return str(row["attack"])
    return "between attacks"


def run_mode(mode: str, slow: int, slow_limit_s: float, workdir: Path) -> dict[str, object]:
    with service(mode, models=CLASSICAL, worker_models="gzip", log_dir=workdir) as svc:
        port, pid = svc.port, svc.pid
        probe_out = workdir / f"probe-{mode}.json"
        probe = subprocess.Popen([sys.executable, __file__, "--probe", str(port), str(probe_out)], cwd=ROOT)
        time.sleep(1.0)
        try:
            rows = asyncio.run(attack(port, pid, slow, slow_limit_s))
        finally:
            time.sleep(1.0)
            probe.send_signal(signal.SIGTERM)
            probe.wait(timeout=30)
    lat = json.loads(probe_out.read_text())
    ok = sorted(s for _, s in lat if s >= 0)
    summary = {
        "mode": mode,
        "probes": len(lat),
        "probe_failures": sum(1 for _, s in lat if s < 0),
        "healthz_p50_ms": round(1000 * ok[len(ok) // 2], 2) if ok else None,
        "healthz_p99_ms": round(1000 * ok[int(len(ok) * 0.99)], 2) if ok else None,
        "healthz_max_ms": round(1000 * ok[-1], 2) if ok else None,
        "over_100_ms": sum(1 for s in ok if s > 0.1),
        "slow_probes": [  # each probe over 100 ms (or failed), and the attack running when it started
            {"ms": round(1000 * s, 1), "during": _during(rows, t - max(s, 0))} for t, s in lat if s > 0.1 or s < 0
        ],
        "attacks": rows,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "attacks"}), flush=True)
    return summary


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--probe":
        probe_main(int(sys.argv[2]), Path(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["embedded", "distributed", "both"], default="both")
    parser.add_argument("--slow-clients", type=int, default=200)
    parser.add_argument("--slow-limit-s", type=float, default=90.0, help="how long a slow client keeps trying")
    args = parser.parse_args()
    print(json.dumps({
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(),
        "load_avg_before": os.getloadavg(),
        "limits": "defaults: headers 10 s, body 60 s, 64 KiB of headers, 8 MiB body, 64 MiB parsed",
    }))  # fmt: skip
    modes = ["embedded", "distributed"] if args.mode == "both" else [args.mode]
    bad = False
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        for mode in modes:
            summary = run_mode(mode, args.slow_clients, args.slow_limit_s, Path(tmp))
            bad |= bool(summary["over_100_ms"]) or bool(summary["probe_failures"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
