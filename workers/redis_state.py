"""Job and queue state in Redis, shared by the API (`redis_backend.py`) and the workers (`worker.py`).

A job is five keys (codelen/keys.py: job_keys): its record, its pairs, the code lengths its pairs
need (`values`), which pairs wait on which task (`waiting`) and how many values each pair still
lacks (`remaining`). Each missing task is one stream entry for that job. A worker that has a value
runs RECORD, one atomic script: set the value once (HSETNX), count down the waiting pairs, count
the pairs that reach 0 as done, finish the job when all are, and XACK the entry. Running it twice
changes nothing, so a redelivered entry is harmless.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from codelen import keys
from codelen.redis_client import connect as connect  # re-exported: worker.py, redis_backend.py call it here
from codelen.settings import Settings
from models.protocol import CONTEXT, Conditioning, ModelInfo, WindowPolicy
from workers.compute import ClassifyTask, Task
from workers.jobs import JobState

# KEYS: job keys (5), stream.  ARGV: group, entry id, task id, bits, now, job ttl
RECORD = """
local st = redis.call('HGET', KEYS[1], 'status')
if st == 'queued' or st == 'running' then
  if redis.call('HSETNX', KEYS[3], ARGV[3], ARGV[4]) == 1 then
    if st == 'queued' then redis.call('HSET', KEYS[1], 'status', 'running') end
    local waiting = redis.call('HGET', KEYS[4], ARGV[3])
    local finished = 0
    if waiting then
      for idx in string.gmatch(waiting, '[^,]+') do
        if redis.call('HINCRBY', KEYS[5], idx, -1) == 0 then finished = finished + 1 end
      end
      redis.call('HDEL', KEYS[4], ARGV[3])
    end
    if finished > 0 then
      local done = redis.call('HINCRBY', KEYS[1], 'done', finished)
      if done >= tonumber(redis.call('HGET', KEYS[1], 'total')) then
        redis.call('HSET', KEYS[1], 'status', 'succeeded', 'finished_at', ARGV[5])
        redis.call('DEL', KEYS[4], KEYS[5])
        for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[6]) end
      end
    end
  end
end
return redis.call('XACK', KEYS[6], ARGV[1], ARGV[2])
"""

# KEYS: job keys (5), stream, dead letter.  ARGV: group, entry id, reason, now, job ttl, dead-letter
# max length, then field/value pairs of the dead-letter entry. Fails the job unless it is finished.
FAIL = """
local st = redis.call('HGET', KEYS[1], 'status')
if st == 'queued' or st == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'error', ARGV[3], 'finished_at', ARGV[4])
  redis.call('DEL', KEYS[4], KEYS[5])
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[5]) end
end
local entry = {'reason', ARGV[3]}
for i = 7, #ARGV do entry[#entry + 1] = ARGV[i] end
redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[6], '*', unpack(entry))
return redis.call('XACK', KEYS[6], ARGV[1], ARGV[2])
"""

# KEYS: job keys (5), then its Idempotency-Key's key if it has one.  ARGV: now, job ttl.
# Cancels a queued or running job; deletes a succeeded or failed one (with its Idempotency-Key, so
# the key makes a new job). Returns the status before a delete, else after the call (nil: no job).
CANCEL = """
local st = redis.call('HGET', KEYS[1], 'status')
if st == 'queued' or st == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1])
  redis.call('DEL', KEYS[4], KEYS[5])
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[2]) end
  return 'cancelled'
end
if st == 'succeeded' or st == 'failed' then
  redis.call('DEL', unpack(KEYS))
end
return st
"""


# KEYS: job record.  ARGV: tokens coded, tokens planned. A job that is gone is not re-created.
PROGRESS = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'tokens_done', ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'tokens_total', ARGV[2])
end
return 0
"""


def out_of_memory(exc: ResponseError) -> bool:
    """Redis refused a write at maxmemory (noeviction): wait for TTLs, do not fail work."""
    return str(exc).startswith("OOM")


def task_id(task: Task | ClassifyTask) -> str:
    """A task's name inside one job (the job fixes the model and its revision)."""
    if isinstance(task, ClassifyTask):
        return task.tid
    return task.hx if task.hy is None else f"{task.hx}>{task.hy}"


@dataclass(frozen=True)
class Entry:
    """One stream entry: a task wanted by a job, under the cache namespace the API expected.
    `cost` is the UTF-8 size of the texts the task codes: the worker's batch budget counts it as
    tokens (a byte-level tokenizer never makes more tokens than bytes)."""

    id: str
    job: str
    ns: str
    task: Task | ClassifyTask
    cost: int

    @property
    def stream(self) -> str:
        return keys.stream(self.task.model)


def entry_fields(job_id: str, ns: str, task: Task | ClassifyTask, cost: int) -> dict[str, str]:
    if isinstance(task, ClassifyTask):
        return {
            "job": job_id,
            "model": task.model,
            "mode": task.mode,
            "ns": ns,
            "kind": "classify",
            "classifier": task.classifier,
            "start": str(task.start),
            "count": str(task.count),
            "bytes": str(cost),
        }
    return {
        "job": job_id,
        "model": task.model,
        "mode": task.mode,
        "ns": ns,
        "hx": task.hx,
        "hy": task.hy or "",
        "bytes": str(cost),
    }


def parse_entry(entry_id: str, fields: dict[str, str]) -> Entry:
    """Raises KeyError/ValueError for an entry that is not ours (the worker dead-letters it)."""
    if fields.get("kind") == "classify":
        if not keys.is_job_id(fields["job"]):
            raise ValueError(f"bad job id in {fields}")
        keys.classifier(fields["classifier"])  # UnknownId (a LookupError) for a name we never issue
        start, count = int(fields["start"]), int(fields["count"])
        ctask = ClassifyTask(fields["model"], fields["classifier"], fields["job"], start, count)
        return Entry(entry_id, fields["job"], fields["ns"], ctask, int(fields.get("bytes", 0)))
    hx, hy = fields["hx"], fields.get("hy") or None
    if len(hx) != 64 or (hy is not None and len(hy) != 64):
        raise ValueError(f"bad sha256 in {fields}")
    if not keys.is_job_id(fields["job"]):
        raise ValueError(f"bad job id in {fields}")
    task = Task(fields["model"], hx, hy, fields.get("mode") or "context")
    return Entry(entry_id, fields["job"], fields["ns"], task, int(fields.get("bytes", 0)))


def info_to_json(info: ModelInfo) -> str:
    return json.dumps(dataclasses.asdict(info))


def info_from_json(raw: str) -> ModelInfo:
    doc = json.loads(raw)
    window = doc.pop("window", None)
    conditioning = _conditioning(doc.pop("conditioning", None) or {})
    modes = tuple(_conditioning(m) for m in doc.pop("modes", None) or ()) or (conditioning,)
    return ModelInfo(
        **doc,
        window=WindowPolicy(**window) if window else None,
        conditioning=conditioning,
        modes=modes,
    )


def _conditioning(doc: dict) -> Conditioning:
    """A Conditioning from dataclasses.asdict (params arrive as lists of [name, value])."""
    if not doc:
        return CONTEXT
    params = tuple((str(k), v) for k, v in doc.get("params", ()))
    return Conditioning(mode=doc["mode"], params=params, key=doc.get("key", ""))


def job_state(record: dict[str, str]) -> JobState:
    matrix_ids = record.get("matrix_ids")
    finished = record.get("finished_at")
    return JobState(
        id=record["id"],
        model=record["model"],
        kind=record["kind"],
        total=int(record["total"]),
        status=record["status"],
        done=int(record.get("done", 0)),
        error=record.get("error") or None,
        matrix_ids=json.loads(matrix_ids) if matrix_ids else None,
        created_at=float(record["created_at"]),
        finished_at=float(finished) if finished else None,
        mode=record.get("mode") or "context",
        direction=record.get("direction") or "both",
        tokens_done=int(record.get("tokens_done", 0)),
        tokens_total=int(record.get("tokens_total", 0)),
        classifier=record.get("classifier") or None,
    )


async def ensure_group(r: aioredis.Redis, model_id: str) -> None:
    """Create a model's stream and its consumer group if missing (at start, and after Redis lost them)."""
    try:
        await r.xgroup_create(keys.stream(model_id), keys.GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def live_workers(r: aioredis.Redis, settings: Settings) -> int:
    """Workers whose heartbeat is recent (three periods)."""
    return await r.zcount(keys.WORKERS, time.time() - 3 * settings.heartbeat_s, "+inf")


async def queue_depth(r: aioredis.Redis, model_ids: list[str]) -> int:
    """Entries not yet acknowledged, all models: never delivered (lag) plus delivered and pending."""
    pipe = r.pipeline(transaction=False)
    for m in model_ids:
        pipe.xinfo_groups(keys.stream(m))
    depth = 0
    for m, groups in zip(model_ids, await pipe.execute(raise_on_error=False), strict=True):
        if isinstance(groups, Exception):  # no stream yet
            continue
        for g in groups:
            if g["name"] == keys.GROUP:
                lag = g.get("lag")
                if lag is None:  # Redis cannot tell (deleted entries): count the whole stream
                    lag = await r.xlen(keys.stream(m))
                depth += int(lag) + int(g["pending"])
    return depth
