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
    process, a rate limit of ``limit`` starts per ``period`` seconds, and per tenant
    ``per_tenant`` runs in flight and ``per_tenant_rate=(count, seconds)`` starts (the
    queue is then a DBOS partitioned queue keyed by tenant; see :mod:`.admission`)."""

    name: str
    concurrency: int | None = None
    worker_concurrency: int | None = None
    limit: int | None = None
    period: float | None = None
    polling_interval: float = 0.2
    per_tenant: int | None = None
    per_tenant_rate: tuple[int, float] | None = None

    @property
    def per_tenant_limits(self) -> bool:
        """Whether runs on this queue are partitioned by tenant (a DBOS partitioned queue)."""
        return self.per_tenant is not None or self.per_tenant_rate is not None

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
        per, rate = self.per_tenant, self.per_tenant_rate
        if per is not None and (isinstance(per, bool) or not isinstance(per, int) or per < 1):
            raise BuildError(f"queue {self.name!r}: per_tenant={per!r} must be an int >= 1 "
                             "(runs in flight per tenant)")
        if per is not None and self.concurrency is not None and per > self.concurrency:
            raise BuildError(f"queue {self.name!r}: per_tenant={per} exceeds concurrency="
                             f"{self.concurrency}; a tenant can never use more than the queue")
        if rate is not None and not (
                isinstance(rate, tuple) and len(rate) == 2 and isinstance(rate[0], int)
                and not isinstance(rate[0], bool) and rate[0] >= 1
                and isinstance(rate[1], (int, float)) and rate[1] > 0):
            raise BuildError(f"queue {self.name!r}: per_tenant_rate={rate!r} must be a pair "
                             "(count, seconds): at most count run starts per tenant per seconds")


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
        if spec.per_tenant is not None:
            kwargs["partition_concurrency"] = spec.per_tenant
        if spec.per_tenant_rate is not None:
            count, seconds = spec.per_tenant_rate
            kwargs["partition_limiter"] = {"limit": count, "period": float(seconds)}
        DBOS.register_queue(spec.name, **kwargs)
