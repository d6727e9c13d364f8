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

    # Models
    models: str = ",".join(ALL_MODELS)  # comma-separated ids to serve; "tiny-random" is for tests
    default_model: str = "smollm2-135m"
    preload: str = "smollm2-135m"  # models loaded at start-up (comma-separated), the rest on first use
    weights_cache_dir: Path = Path.home() / ".cache" / "codelen"
    device: str = "auto"  # auto | cpu | cuda
    context_tokens: int | None = None  # window length; default min(2048, model context)
    stride: int | None = None  # new tokens per window after the first; default context // 2

    # Batching (worker)
    batch_tokens: int = 16384  # token budget of one model batch (padded rows × length)
    batch_max_items: int = 256
    batch_wait_ms: float = 5.0

    # Request limits (enforced in both modes; 413/422 problem+json)
    max_body_bytes: int = 8 * 1024 * 1024
    max_record_bytes: int = 1024 * 1024
    max_dataset_bytes: int = 4 * 1024 * 1024
    max_records: int = 10_000
    max_pairs: int = 10_000
    max_matrix_datasets: int = 500

    # Behaviour
    score_wait_s: float = 60.0  # /v1/score waits this long, then answers 202 with a job
    cache_max_entries: int = 1_000_000  # embedded cache bound (LRU)
    cache_ttl_s: int = 30 * 24 * 3600  # Redis cache TTL
    job_ttl_s: int = 7 * 24 * 3600  # job records and results expire after this
    max_jobs: int = 10_000  # embedded: finished jobs kept (oldest dropped first)
    max_queue_items: int = 200_000  # past this queue depth, new work gets 429
    retry_after_s: int = 5

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
