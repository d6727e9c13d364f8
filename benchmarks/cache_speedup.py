"""First answer vs cached answer of POST /v1/score, and bits per byte, per model.

Starts `codelen serve` (embedded mode) in a subprocess and talks to it over loopback, as a user
would. Baseline in the same run: the first (computed) request of each pair.

    python benchmarks/cache_speedup.py [--models smollm2-135m,gemma3-270m,gzip] [--repeat 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.servers import service  # noqa: E402

PARAGRAPHS = [
    "The committee met on Tuesday to review the proposal for the new library. After two hours of "
    "discussion, the members agreed that the building should be larger than first planned, with a "
    "reading room on the top floor and a children's section near the entrance. The architect will "
    "present revised drawings next month, and construction could begin in the autumn if the city "
    "approves the budget.",
    "Photosynthesis converts light energy into chemical energy stored in sugar. In the chloroplasts "
    "of plant cells, chlorophyll absorbs mostly red and blue light, which drives the splitting of "
    "water and the release of oxygen. The energy captured in this way is used to fix carbon dioxide "
    "from the air into organic molecules that the plant uses to grow.",
    "She had not expected the train to be so empty. The carriage smelled of coffee and old leather, "
    "and the only other passenger, a man in a grey coat, was asleep with a newspaper over his face. "
    "Outside, the fields turned from green to gold as the sun went down, and she realised she had "
    "forgotten to tell anyone where she was going.",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m,gzip")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    models = args.models.split(",")
    # inherit: a CODELEN_DEVICE or CODELEN_WEIGHTS_CACHE_DIR of this shell applies to the server
    server = service(models=args.models, preload=args.models, inherit=True, timeout=600)
    with server as svc, httpx.Client(base_url=svc.url, timeout=600) as http:
        cpu = platform.processor() or platform.machine()
        print(f"# {date.today()} · {cpu} · {os.cpu_count()} cores · embedded mode")
        print("| model | first answer (s) | cached, median (ms) | speed-up | bits/byte x | NCD(x,x) | NCD(x,z) |")
        print("|---|---|---|---|---|---|---|")
        for model in models:
            x, z = PARAGRAPHS[0], PARAGRAPHS[2]
            body = {"x": x, "y": PARAGRAPHS[1], "model": model}
            t = time.perf_counter()
            first = http.post("/v1/score", json=body)
            first_s = time.perf_counter() - t
            assert first.status_code == 200 and not first.json()["cached"], first.text
            cached = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                r = http.post("/v1/score", json=body)
                cached.append(time.perf_counter() - t)
                assert r.json()["cached"] is True
            med = statistics.median(cached)
            same = http.post("/v1/score", json={"x": x, "y": x, "model": model}).json()["ncd"]
            far = http.post("/v1/score", json={"x": x, "y": z, "model": model}).json()["ncd"]
            bpb = first.json()["bits_per_byte"]["x"]
            cells = [model, f"{first_s:.3f}", f"{med * 1000:.2f}", f"{first_s / med:.0f}×", f"{bpb:.3f}"]
            print("| " + " | ".join([*cells, f"{same:.3f}", f"{far:.3f}"]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
