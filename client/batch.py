"""`codelen submit`: thousands of pairs from a JSONL file, sent as chunked jobs, resumable.

Input, one pair a line (OpenAI-batch style):  {"custom_id": "a-17", "x": "...", "y": ["...", "..."]}
Output, one line a pair, appended as chunks finish:  {"custom_id": "a-17", "ncd": ..., ...}

Why it survives a crash, the network and a busy server:
- The input is cut into chunks the same way on every run, and a chunk's Idempotency-Key is the
  hash of its request body, so sending a chunk again returns the job that is already running.
- `<output>.state.json` maps each chunk in flight to its job id, so a rerun re-attaches to the
  job instead of sending the texts again.
- A chunk's lines are written with one `write` to a file opened for appending, only after its
  job finished, and a rerun first cuts off a trailing partial line (killed mid-write) and skips
  every custom_id already in the output: no line is ever written twice.
- Every request is retried with backoff; 429 waits for its Retry-After.
- A pair the server rejects (bad input, or a text the model cannot code) does not sink its
  chunk: it is set aside in `<output>.errors.jsonl` and the rest of the chunk is sent again.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.api import AsyncClient, CodelenError, JobFailed, JobStatus, Pair, RetryPolicy, content_key, pairs_body
from client.progress import ProgressBar, duration

MAX_ID_CHARS = 256  # the server's limit on a pair id
MAX_ATTEMPTS = 20  # fresh jobs for one chunk in one run, after failed ones


class InputError(ValueError):
    """The input or output file cannot be used as it is; the message says where and why."""


# -- files ------------------------------------------------------------------------------------


def _is_data(value: object) -> bool:
    if isinstance(value, list):
        return bool(value) and all(isinstance(v, str) for v in value)
    return isinstance(value, str)


def read_pairs(path: Path) -> list[Pair]:
    """The pairs of a JSONL file, checked: every line an object with a unique custom_id."""
    pairs: list[Pair] = []
    first_seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except ValueError as exc:
                raise InputError(f"{path}:{lineno}: not JSON ({exc})") from None
            if not isinstance(doc, dict):
                raise InputError(f"{path}:{lineno}: expected an object {{\"custom_id\", \"x\", \"y\"}}")
            cid = doc.get("custom_id")
            if not isinstance(cid, str) or not cid or len(cid) > MAX_ID_CHARS:
                raise InputError(
                    f"{path}:{lineno}: custom_id must be a non-empty string of at most {MAX_ID_CHARS} characters"
                )
            if cid in first_seen:
                raise InputError(f"{path}:{lineno}: duplicate custom_id {cid!r} (first on line {first_seen[cid]})")
            first_seen[cid] = lineno
            for side in ("x", "y"):
                if not _is_data(doc.get(side)):
                    raise InputError(f"{path}:{lineno}: {side!r} must be a string or a non-empty list of strings")
            pairs.append({"id": cid, "x": doc["x"], "y": doc["y"]})
    return pairs


def run_label(model: str | None, conditioning: str = "context", direction: str = "both") -> str | None:
    """The model as output and state files name it: with its conditioning and direction when
    they are not the defaults, so one file never mixes results of two kinds."""
    if model is None or (conditioning, direction) == ("context", "both"):
        return model
    return f"{model} [{conditioning}, {direction}]"


def read_done(path: Path) -> tuple[set[str], set[str]]:
    """(custom_ids already in the output, model ids of those lines). A trailing partial line —
    the client was killed in the middle of a write — is cut off the file first."""
    if not path.exists():
        return set(), set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with path.open("r+b") as f:
            f.truncate(end)
    done: set[str] = set()
    models: set[str] = set()
    for lineno, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            done.add(doc["custom_id"])
            mode = (doc.get("conditioning") or {}).get("mode", "context")
            models.add(run_label(doc["model"]["id"], mode, doc.get("direction", "both")))
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{path}:{lineno}: not a result line; is this the right output file?") from None
    return done, models


class AppendFile:
    """Whole lines appended with one write each: a crash leaves at most one partial line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def write_lines(self, docs: Iterable[dict[str, Any]]) -> None:
        data = b"".join(json.dumps(d, ensure_ascii=False, separators=(",", ":")).encode() + b"\n" for d in docs)
        if not data:
            return
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class State:
    """`<output>.state.json`: the jobs in flight, by chunk key, so a rerun re-attaches to them."""

    path: Path
    model: str | None
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, model: str | None) -> State:
        if not path.exists():
            return cls(path, model)
        try:
            doc = json.loads(path.read_text())
            jobs = dict(doc["jobs"])
        except (ValueError, KeyError, TypeError):
            return cls(path, model)  # unreadable: the idempotency keys still find the jobs
        if doc.get("model") != model:
            raise InputError(
                f"{path} was written for model {doc.get('model')!r}, not {model!r}: "
                "use the same --model, or another output file"
            )
        return cls(path, model, jobs)

    def save(self) -> None:
        if not self.jobs:
            self.path.unlink(missing_ok=True)
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"version": 1, "model": self.model, "jobs": self.jobs}, indent=1))
        os.replace(tmp, self.path)


def plan_chunks(pairs: list[Pair], done: set[str], size: int, max_bytes: int) -> list[list[Pair]]:
    """Cut the whole input into chunks (the same cut on every run, so the same keys), then keep
    each chunk's pairs that are not done yet. A chunk also ends before max_bytes of body."""
    chunks: list[list[Pair]] = []
    current: list[Pair] = []
    current_bytes = 0
    for p in pairs:
        n = len(json.dumps(p, ensure_ascii=False).encode())
        if current and (len(current) >= size or current_bytes + n > max_bytes):
            chunks.append(current)
            current, current_bytes = [], 0
        current.append(p)
        current_bytes += n
    if current:
        chunks.append(current)
    todo = [[p for p in c if p["id"] not in done] for c in chunks]
    return [c for c in todo if c]


def _culprit(error: CodelenError, remaining: list[Pair]) -> Pair | None:
    """The pair an error names: a JSON pointer /pairs/<i>/… (422/413) or "pair '<id>':" (failed job)."""
    pointers = [str(error.extra.get("pointer") or "")]
    pointers += [str(e.get("pointer", "")) for e in error.extra.get("errors", []) if isinstance(e, dict)]
    for pointer in pointers:
        m = re.match(r"^/pairs/(\d+)(/|$)", pointer)
        if m and int(m.group(1)) < len(remaining):
            return remaining[int(m.group(1))]
    for p in remaining:
        if f"pair {p['id']!r}:" in error.detail:
            return p
    return None


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Submission:
    api: AsyncClient
    model: str | None
    out: AppendFile
    errors: AppendFile
    state: State
    bar: ProgressBar
    written: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    in_flight: dict[int, int] = field(default_factory=dict)  # chunk number → pairs done on the server
    conditioning: str = "context"
    direction: str = "both"
    tokens: dict[int, tuple[int, int]] = field(default_factory=dict)  # chunk number → tokens done, planned

    def _progress(self) -> None:
        if self.tokens:
            done, planned = (sum(t[i] for t in self.tokens.values()) for i in (0, 1))
            self.bar.suffix = f"{done:,}/{planned:,} tokens"
        self.bar.update(len(self.written) + len(self.failed) + sum(self.in_flight.values()))

    def _write(self, rows: Iterable[dict[str, Any]], wanted: set[str]) -> set[str]:
        lines = []
        for row in rows:
            cid = row.get("id")
            if cid in wanted and cid not in self.written:
                lines.append({"custom_id": cid, **{k: v for k, v in row.items() if k != "id"}})
        self.out.write_lines(lines)
        got = {line["custom_id"] for line in lines}
        self.written |= got
        return got

    def _fail(self, pairs: list[Pair], reason: str) -> None:
        self.errors.write_lines({"custom_id": p["id"], "error": reason} for p in pairs)
        for p in pairs:
            self.failed[p["id"]] = reason
        self.bar.note(f"{len(pairs)} pair(s) failed: {reason[:300]}")

    async def _attach_or_submit(self, body: bytes, base: str) -> JobStatus:
        """The chunk's job: the one in the state file if the server still has it, else a new
        submission (the same key returns the same job; a failed one is sent again under a new key)."""
        entry = self.state.jobs.get(base)
        if entry:
            try:
                job = await self.api.job(entry["job"])
                if job["status"] not in ("failed", "cancelled"):
                    return job
            except CodelenError as exc:
                if exc.status != 404:
                    raise
        for attempt in range(MAX_ATTEMPTS):
            job = await self.api.submit(body, base if attempt == 0 else f"{base}-{attempt}")
            if job["status"] not in ("failed", "cancelled"):
                self.state.jobs[base] = {"job": job["id"], "attempt": attempt}
                self.state.save()
                return job
        raise CodelenError(None, "Job failed", f"{MAX_ATTEMPTS} jobs for this chunk failed")

    async def run_chunk(self, number: int, pairs: list[Pair], gate: asyncio.Semaphore) -> None:
        async with gate:
            remaining = pairs
            while remaining:
                body = pairs_body(remaining, self.model, conditioning=self.conditioning, direction=self.direction)
                base = content_key(body)
                wanted = {p["id"] for p in remaining}

                def progress(job: JobStatus, number: int = number) -> None:
                    self.in_flight[number] = job["progress"]["done"]
                    if job["status"] == "running":
                        p = job["progress"]
                        self.tokens[number] = (p.get("tokens_done", 0), p.get("tokens_total", 0))
                    self._progress()

                try:
                    job = await self._attach_or_submit(body, base)
                    try:
                        await self.api.wait(job["id"], on_progress=progress)
                        error = None
                    except JobFailed as exc:
                        error = exc
                    got = self._write(await self.api.results_ndjson(job["id"]), wanted)
                except CodelenError as exc:
                    if exc.status not in (413, 422):
                        raise  # not about this chunk's data (no server, no key, unknown model…): stop
                    error, got = exc, set()
                finally:
                    self.in_flight.pop(number, None)
                self.state.jobs.pop(base, None)
                self.state.save()
                self._progress()
                left = [p for p in remaining if p["id"] not in got]
                if error is None:
                    if left:  # never expected: say so rather than finish with lines missing
                        self._fail(left, f"job {job['id']} succeeded without a result for this pair")
                    return
                culprit = _culprit(error, left)
                if culprit is None:
                    self._fail(left, error.detail)
                    return
                self._fail([culprit], error.detail)
                remaining = [p for p in left if p is not culprit]


async def submit_file(
    input_path: Path,
    output: Path,
    *,
    url: str | None,
    api_key: str | None,
    model: str | None,
    chunk_size: int,
    concurrency: int,
    max_chunk_bytes: int,
    retries: int,
    quiet: bool,
    conditioning: str = "context",
    direction: str = "both",
) -> int:
    pairs = read_pairs(input_path)
    ids = {p["id"] for p in pairs}
    done, done_models = read_done(output)
    label = run_label(model, conditioning, direction)
    if label and done_models - {label}:
        raise InputError(f"{output} holds results of {sorted(done_models)}, not {label!r}: use another output file")
    errors_path = output.with_name(output.name + ".errors.jsonl")
    errors_path.unlink(missing_ok=True)  # failed pairs are tried again; this run writes its own
    state = State.load(output.with_name(output.name + ".state.json"), label)
    already = len(done & ids)
    chunks = plan_chunks(pairs, done, chunk_size, max_chunk_bytes)
    bar = ProgressBar(len(pairs), start=already, quiet=quiet)
    if already and not quiet:
        bar.note(f"resuming: {already} of {len(pairs)} pairs already in {output}"
                 + (f"; re-attaching to {len(state.jobs)} job(s)" if state.jobs else ""))
    started = time.monotonic()
    retry = RetryPolicy(retries=retries)
    out, errs = AppendFile(output), AppendFile(errors_path)
    def on_retry(why: str, seconds: float) -> None:
        bar.note(f"{why}; retrying in {seconds:.1f} s")

    async with AsyncClient(url, api_key, retry=retry, on_retry=on_retry) as api:
        batch = Submission(api, model, out, errs, state, bar, conditioning=conditioning, direction=direction)
        gate = asyncio.Semaphore(concurrency)
        tasks = [asyncio.create_task(batch.run_chunk(i, c, gate)) for i, c in enumerate(chunks)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            bar.close()
            out.close()
            errs.close()
    elapsed = time.monotonic() - started
    sent = len(batch.written)
    if not quiet:
        rate = sent / elapsed if elapsed > 0 else 0.0
        print(f"{sent} pairs written in {duration(elapsed)} ({rate:,.1f} pairs/s); "
              f"{already + sent} of {len(pairs)} in {output}", file=bar.stream)
    if batch.failed:
        print(f"{len(batch.failed)} pair(s) failed; reasons in {errors_path}; rerun the same command to try them again",
              file=bar.stream)
        return 1
    return 0
