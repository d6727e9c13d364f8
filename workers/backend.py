"""What the HTTP layer needs from a backend. Two implementations: `workers.embedded.EmbeddedBackend`
(in-process queue and worker) and `workers.redis_backend.RedisBackend` (Redis streams, separate
`codelen worker` processes). Routes depend on this protocol only."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from codelen.datasets import Dataset
from codelen.scores import PairLengths
from models.protocol import ModelInfo
from workers.jobs import JobSpec

JobDoc = dict[str, object]


class Backend(Protocol):
    mode: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def ready(self) -> tuple[bool, str]:
        """(ready, detail) for /readyz."""
        ...

    async def model_info(self, model_id: str, mode: str = "context") -> ModelInfo:
        """The model's info in conditioning `mode`; models.protocol.UnsupportedMode if it has none."""
        ...

    def queue_depth(self) -> int: ...

    async def lookup(
        self, model_id: str, x: Dataset, y: Dataset, mode: str = "context", direction: str = "both"
    ) -> PairLengths | None:
        """The code lengths of a pair (three with direction y_given_x) if all are cached, else None.
        Never queues work."""
        ...

    async def score(
        self, model_id: str, x: Dataset, y: Dataset, wait_s: float, mode: str = "context", direction: str = "both"
    ) -> tuple[PairLengths | None, bool, JobDoc | None]:
        """(lengths, cached, None) within wait_s, else (None, False, the job now holding the pair)."""
        ...

    async def submit(self, spec: JobSpec, idempotency_key: str | None) -> JobDoc: ...

    async def job(self, job_id: str) -> JobDoc | None: ...

    async def results(self, job_id: str) -> tuple[JobDoc, Iterable[dict], dict | None] | None:
        """(job with its `conditioning_parameters`, finished results in pair order, matrix document
        or None); None if unknown. The results may be built as they are iterated (embedded: from
        compact arrays)."""
        ...

    async def cancel(self, job_id: str) -> JobDoc | None:
        """Cancel a queued or running job; delete a succeeded or failed one (its last state is
        returned, then it is unknown: 404). None if unknown."""
        ...
