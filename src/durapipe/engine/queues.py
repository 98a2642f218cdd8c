"""DBOS queues for runs: declared on the App before launch, registered right after it.

DBOS 3.x keeps queues as rows in ``dbos.queues``, so they can only be registered once the
system database is up; :meth:`App.queue` records the wish and :func:`register_queues` runs
inside ``App.launch``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dbos import DBOS

from ..errors import BuildError


@dataclass(frozen=True)
class QueueSpec:
    """Limits of one queue: ``concurrency`` across all workers, ``worker_concurrency`` per
    process, and a rate limit of ``limit`` starts per ``period`` seconds."""

    name: str
    concurrency: int | None = None
    worker_concurrency: int | None = None
    limit: int | None = None
    period: float | None = None
    polling_interval: float = 0.2

    def __post_init__(self) -> None:
        if not self.name or self.name.startswith("_dbos_"):
            raise BuildError(f"queue name {self.name!r}: use a non-empty name not starting with '_dbos_'")
        if (self.limit is None) != (self.period is None):
            raise BuildError(
                f"queue {self.name!r}: a rate limit needs both limit= and period= (got "
                f"limit={self.limit}, period={self.period})"
            )
        for key in ("concurrency", "worker_concurrency", "limit"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise BuildError(f"queue {self.name!r}: {key} must be at least 1, got {value}")


def register_queues(specs: dict[str, QueueSpec]) -> None:
    """Register declared queues with the launched DBOS (call after ``DBOS.launch``)."""
    for spec in specs.values():
        kwargs: dict[str, Any] = {
            "global_concurrency": spec.concurrency,
            "worker_concurrency": spec.worker_concurrency,
            "polling_interval_sec": spec.polling_interval,
            "on_conflict": "always_update",
        }
        if spec.limit is not None:
            kwargs["limiter"] = {"limit": spec.limit, "period": spec.period}
        DBOS.register_queue(spec.name, **kwargs)
