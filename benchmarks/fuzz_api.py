"""Long schemathesis run against a real `codelen serve`: embedded and distributed mode, with and
without API keys, classical models only, every check schemathesis has.

    python benchmarks/fuzz_api.py [--mode embedded|distributed|both] [--max-examples 400] [--json]

Each configuration starts the service as a subprocess (`codelen serve`; in distributed mode also a
redis-server on a free port and one `codelen worker`), runs `schemathesis run --checks all` over
its /openapi.json (all phases: examples, coverage, fuzzing, stateful) and reads the JSON report.
Prints the conditions, then one row per configuration: test cases generated, server errors, schema
violations (response body, status code, content type or headers not as documented), and every
other failure by schemathesis code. Target (issue 16): >= 10,000 cases per mode, 0 server errors,
0 schema violations.

`positive_data_acceptance` is told that 413 and 422 are acceptable answers to schema-valid data:
the service checks what a JSON schema cannot say (a dataset of 0 bytes, a method that needs a
language model asked of gzip, sizes summed over records), and answers those 422 or 413 by contract.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.servers import service  # noqa: E402

CLASSICAL = "gzip,zlib,bz2,lzma,zstd"
API_KEY = "fuzz-key-0123456789"
SERVER_ERRORS = {"ServerError"}
SCHEMA_VIOLATIONS = {
    "JsonSchemaError", "MalformedJson", "UndefinedStatusCode", "UndefinedContentType", "MissingContentType",
    "MalformedMediaType", "MissingHeaders", "JsonSchemaHeaderError",
}  # fmt: skip
SETTINGS = {"CODELEN_SCORE_WAIT_S": "5"}
CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2XX", "401", "403", "404", "409", "413", "422", "429"]
"""


def fuzz(url: str, keys: bool, max_examples: int, workdir: Path, name: str) -> dict[str, object]:
    config = workdir / "schemathesis.toml"
    config.write_text(CONFIG)
    report = workdir / f"{name}.json"
    st = Path(sys.executable).with_name("schemathesis")
    cmd = [str(st), "--config-file", str(config), "run", f"{url}/openapi.json", "--checks", "all",
           "--max-examples", str(max_examples), "--report", "json", "--report-json-path", str(report),
           "--no-color", "--seed", "16"]  # fmt: skip
    if keys:
        cmd += ["--header", f"Authorization: Bearer {API_KEY}"]
    started = time.monotonic()
    with open(workdir / f"{name}.txt", "w") as out:
        subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, check=False)
    doc = json.loads(report.read_text())
    by_type: Counter[str] = Counter()
    for failure in doc["failures"]:
        by_type[f"{failure['code']} {failure['type']}"] += failure["count"]
    return {
        "configuration": name,
        "cases": doc["test_cases"]["generated"],
        "server_errors": sum(n for t, n in by_type.items() if t.split()[1] in SERVER_ERRORS),
        "schema_violations": sum(n for t, n in by_type.items() if t.split()[1] in SCHEMA_VIOLATIONS),
        "other_failures": {t: n for t, n in by_type.items() if t.split()[1] not in SERVER_ERRORS | SCHEMA_VIOLATIONS},
        "errors": doc["errors"],
        "seconds": round(time.monotonic() - started, 1),
        "log": str(workdir / f"{name}.txt"),
    }


def conditions() -> dict[str, object]:
    import schemathesis

    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "schemathesis": schemathesis.__version__,
        "models": CLASSICAL,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["embedded", "distributed", "both"], default="both")
    parser.add_argument("--max-examples", type=int, default=400, help="per operation and phase (schemathesis -n)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", type=Path, default=None, help="keep logs and reports in this folder")
    args = parser.parse_args()
    modes = ["embedded", "distributed"] if args.mode == "both" else [args.mode]
    print(json.dumps(conditions()))
    rows = []
    with ExitStack() as stack:
        workdir = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fuzz-")))
        workdir.mkdir(parents=True, exist_ok=True)
        for mode in modes:
            for keys in (False, True):
                name = f"{mode}-{'keys' if keys else 'open'}"
                logs = workdir / name
                logs.mkdir(exist_ok=True)
                api_key = API_KEY if keys else None
                with service(mode, models=CLASSICAL, env=SETTINGS, api_key=api_key, log_dir=logs) as svc:
                    row = fuzz(svc.url, keys, args.max_examples, workdir, name)
                rows.append(row)
                print(json.dumps(row) if args.json else
                      f"{name:20s} cases {row['cases']:6d}  server errors {row['server_errors']}  schema violations "
                      f"{row['schema_violations']}  other {row['other_failures'] or '-'}  ({row['seconds']} s)",
                      flush=True)  # fmt: skip
    for mode in modes:
        mine = [r for r in rows if str(r["configuration"]).startswith(mode)]
        print(f"{mode}: {sum(int(r['cases']) for r in mine)} cases, "  # type: ignore[call-overload]
              f"{sum(int(r['server_errors']) for r in mine)} server errors, "  # type: ignore[call-overload]
              f"{sum(int(r['schema_violations']) for r in mine)} schema violations")  # type: ignore[call-overload]
    bad = any(r["server_errors"] or r["schema_violations"] for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
