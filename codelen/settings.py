"""The one settings object. Every knob is an environment variable `CODELEN_<NAME>`
(REDIS_URL is also read without the prefix), documented in README.md."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ALL_MODELS = ("smollm2-135m", "gemma3-270m", "gzip", "zlib", "bz2", "lzma", "zstd")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CODELEN_", extra="ignore")

    # Mode: embedded when unset, distributed (Redis queue + workers) when set.
    redis_url: str | None = Field(default=None, validation_alias=AliasChoices("CODELEN_REDIS_URL", "REDIS_URL"))
    # Optional second Redis for the `clc:` cache only (maxmemory-policy allkeys-lru); default: REDIS_URL.
    cache_redis_url: str | None = None

    # Models
    models: str = ",".join(ALL_MODELS)  # comma-separated ids to serve; "tiny-random" is for tests
    default_model: str = "smollm2-135m"
    preload: str = "smollm2-135m,gemma3-270m"  # models loaded at start-up (comma-separated), the rest on first use
    weights_cache_dir: Path = Path.home() / ".cache" / "codelen"
    device: str = "auto"  # auto | cpu | cuda
    context_tokens: int | None = None  # window length; default min(2048, model context)
    stride: int | None = None  # new tokens per window after the first; default context // 2

    # Conditioning on a dataset (`conditioning`: memory, adapt); models/memory.py, models/adapt.py
    # Bytes of token memories kept per model: fp16 keys of the tokens within the horizon of what
    # follows (for SmolLM2 at most 262,144 + 6,144 tokens x 260 B, ~70 MB) and <= 97 B a token
    # (tokens, bits, the copy model's index, the n-gram cache's: ~80 B for English), so 1 GiB holds
    # ~6 memories of 4 MiB datasets (~1M tokens: ~70 MB of keys and <= 97 MB besides) or many
    # smaller ones; one over the bound is built once per call, not kept. Keys on the model's
    # device, the rest in RAM (counted together).
    memory_cache_bytes: int = 1 << 30
    adapt_cache_bytes: int = 256 << 20  # trained adapter states (a few MB each, + <= 88 B a token of X) kept per model

    # Batching (worker)
    batch_tokens: int | None = None  # token budget of one model batch; default 8192 on CPU, 65536 on CUDA
    # Tasks per model call. Progress and results are written when a call returns, so on a CPU
    # (~150 tokens/s) a small batch keeps progress moving; on a GPU raise it (e.g. 512).
    batch_max_items: int = 32
    batch_wait_ms: float = 5.0

    # Request limits (enforced in both modes; 413/422 problem+json)
    max_body_bytes: int = 8 * 1024 * 1024
    # Estimated size of a parsed JSON body (413 above). Parsing runs on the event loop at ~100-300 ns an
    # object (~90 B): 64 MiB of small objects is ~0.1-0.2 s during which nothing else is answered.
    max_body_expansion_bytes: int = 64 * 1024 * 1024
    # HTTP (service/http_limits.py): a slow or huge request is refused with 408 or 431 and closed
    header_timeout_s: float = 10.0  # the request line and headers, from the connection or the request's first byte
    body_timeout_s: float = 60.0  # the whole body, from the end of the headers
    max_header_bytes: int = 64 * 1024  # request line and headers together
    max_dataset_bytes: int = 4 * 1024 * 1024
    # A record may be as large as a dataset: `codelen score corpus.txt test.txt` sends each file as
    # one record, and a 4 MiB X must work. Tokenizing is linear in a record's size (~1.5 s a MiB of
    # one unbroken word on the CPU), so one large record costs what many small ones of its size do.
    max_record_bytes: int = 4 * 1024 * 1024
    max_records: int = 10_000
    max_pairs: int = 10_000
    max_matrix_datasets: int = 500

    # Classifiers (/v1/classifiers); limits answer 413
    max_classifiers: int = 1_000  # embedded: kept in memory, least recently used dropped first
    max_classifier_examples: int = 10_000
    max_classifier_bytes: int = 16 * 1024 * 1024  # all example texts together
    max_predict_texts: int = 1_000  # texts per predict request
    max_predict_segments: int = 1_000_000  # code lengths one predict request may need (knn: texts x examples)
    classifier_ttl_s: int = 90 * 24 * 3600  # Redis: a classifier unused this long expires
    fitted_classifiers: int = 8  # fitted classifiers (dictionaries, encoded contexts) kept per process that runs them
    # Classifier jobs (fits, predictions) run on the queue: a prediction job is a task per chunk of texts
    max_prediction_job_texts: int = 100_000  # texts per prediction job (413 above)
    classify_chunk_texts: int = 16  # texts per prediction task: progress and reclaim move by this much
    # embedded: bytes of classifier model-pass values kept (code lengths of segments, probe features,
    # knn-lm token states; classify/caching.py); Redis keeps them in the cache with cache_ttl_s
    classifier_cache_bytes: int = 256 << 20

    # Behaviour
    # /v1/score, /v1/classifiers and .../predict wait this long, then answer 202 with a job
    score_wait_s: float = 60.0
    score_fast_path: bool = True  # answer cached /v1/score before routing (service/fastpath.py)
    cache_max_entries: int = 1_000_000  # embedded cache bound (LRU), with cache_max_bytes
    cache_max_bytes: int = 64 << 20  # embedded cache bound in bytes (264 B a code length: 254k of them)
    cache_ttl_s: int = 30 * 24 * 3600  # Redis cache TTL
    job_ttl_s: int = 7 * 24 * 3600  # job records and results expire after this
    max_jobs: int = 10_000  # embedded: finished jobs kept (oldest dropped first)
    # embedded: bytes of job results kept (49 B a pair); past it the oldest finished jobs are dropped
    max_job_result_bytes: int = 256 << 20
    # Past this queue depth new work gets 429; a request needing more than this gets 413. A matrix
    # of max_matrix_datasets (500) needs 250,500 code lengths (500 C(X), 500 x 500 C(Y|X)).
    max_queue_items: int = 500_000
    retry_after_s: int = 5

    # Distributed mode (Redis queue, `codelen worker`); see docs/RELIABILITY.md
    stream_max_len: int = 2_000_000  # XADD MAXLEN ~ backstop; keep well above max_queue_items
    dead_letter_max_len: int = 10_000  # dead-letter stream entries kept (MAXLEN ~)
    reclaim_idle_s: float = 60.0  # XAUTOCLAIM: an entry pending this long belongs to a dead worker
    reclaim_interval_s: float = 5.0  # how often a worker looks for such entries and trims the stream
    max_deliveries: int = 3  # an entry that raised and was delivered more often than this: dead-letter stream
    max_crash_deliveries: int = 10  # the same for an entry whose worker died each time (no error recorded)
    heartbeat_s: float = 5.0  # worker heartbeat period; it also keeps its own pending entries fresh
    model_info_refresh_s: float = 5.0  # API: how long it trusts the model info workers published
    score_poll_max_s: float = 0.05  # API: longest pause between polls while /v1/score waits on a job

    # Security
    api_keys: str = ""  # comma-separated SHA-256 hex digests of accepted API keys
    rate_limit_per_s: float = 0.0  # per API key; 0 = unlimited
    rate_limit_burst: int = 100

    def model_ids(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]

    def preload_ids(self) -> list[str]:
        return [m.strip() for m in self.preload.split(",") if m.strip() and m.strip() in self.model_ids()]

    def api_key_digests(self) -> frozenset[str]:
        return frozenset(k.strip().lower() for k in self.api_keys.split(",") if k.strip())


@lru_cache
def get_settings() -> Settings:
    return Settings()
