"""How a run is admitted: tenant, priority, dedup key, delay and token budget.

>>> handle = publish.enqueue({"topic": "x"}, queue="work", tenant="acme", priority=5)
>>> handle = publish.start({"order": 42}, dedup_key="order-42", delay=30, max_tokens=20_000)

What each option becomes in DBOS 3.4:

- ``tenant``: recorded on the run as the workflow attribute ``durapipe.tenant`` (filterable
  in ``durapipe runs --tenant``, the ``durapipe.runs`` view and the console). On a queue
  declared with ``per_tenant=`` / ``per_tenant_rate=`` it is the DBOS queue partition key,
  so DBOS caps each tenant's runs in flight (and its start rate) while the queue's
  ``concurrency`` caps them all: DBOS 3.4 checks the per-partition and the queue-wide limits
  of one partitioned queue in the same dequeue (``_sys_db.start_queued_workflows``), so
  no second queue level is needed. Background tasks dispatched onto such a queue take the
  run's tenant as their partition, so they count against the tenant's limit too (runs and
  the tasks they join go on different queues: ``Pipeline.enqueue`` refuses the same one).
- ``priority`` (0 to 2**31-1, lowest first; 0 is the default) and ``delay`` (seconds) are
  DBOS enqueue options. ``start(...)`` with either goes through the app's own start queue
  (``durapipe-<app>-start``, no limits), since DBOS orders and delays only queued work; with
  no limit there, a priority orders only runs that become due together.
- ``dedup_key``: while a run of the pipeline started with that key is unfinished, another
  start with the key returns it. DBOS's own deduplication works only on non-partitioned
  queues and not for direct starts, so durapipe holds a Postgres advisory lock on the key
  around "find the unfinished run with this key, else start one" (the run records the key
  as attribute ``durapipe.dedup``); concurrent starts in any number of processes give one
  run. Threads and tasks of one process first queue on a lock of the key in the process,
  so one connection per key and process waits on the database, and never one of DBOS's
  pool, which the lock's holder needs to start the run. On SQLite (one process) only the
  process lock is taken.
- ``max_tokens``: recorded as attribute ``durapipe.max_tokens`` (the app's ``max_tokens``
  default when not given), read by :mod:`.budget` before each model call; a budgeted run's
  model calls take the run's lock (:func:`keyed_lock_async`) one at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from dbos import DBOS, SetEnqueueOptions, SetWorkflowAttributes

from ..errors import DurapipeError
from .scope import WORKFLOW_NAME, belongs_to, run_workflow_name

if TYPE_CHECKING:
    from .app import App
    from .queues import QueueSpec

TENANT = "durapipe.tenant"
DEDUP = "durapipe.dedup"
MAX_TOKENS = "durapipe.max_tokens"
SCHEDULE = "durapipe.schedule"
MAX_PRIORITY = 2**31 - 1
MAX_KEY = 200
UNFINISHED = ["ENQUEUED", "DELAYED", "PENDING"]


def start_queue(app_name: str) -> str:
    """The app's queue for runs started with a priority or a delay (no limits)."""
    return f"durapipe-{app_name}-start"


def _text(value: Any, what: str, where: str) -> str | None:
    if value is None:
        return None
    if (not isinstance(value, str) or not value or len(value) > MAX_KEY
            or any(ord(c) < 32 for c in value)):
        raise DurapipeError(
            f"{where}: {what}={value!r} must be a non-empty string of at most {MAX_KEY} "
            "printable characters, as " + ('tenant="acme"' if what == "tenant"
                                           else 'dedup_key="order-42"'),
            **{what: repr(value)})
    return value


@dataclass(frozen=True)
class Admission:
    """The checked start options of one run."""

    where: str
    pipeline: str
    tenant: str | None = None
    priority: int | None = None
    dedup_key: str | None = None
    delay: float | None = None
    max_tokens: int | None = None
    schedule: str | None = None

    @classmethod
    def of(cls, where: str, pipeline: str, *, tenant: Any = None, priority: Any = None,
           dedup_key: Any = None, delay: Any = None, max_tokens: Any = None,
           default_max_tokens: int | None = None, schedule: str | None = None) -> Admission:
        """Check every option, raising one clear error naming the bad value and the fix."""
        if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)
                                     or not 0 <= priority <= MAX_PRIORITY):
            raise DurapipeError(
                f"{where}: priority={priority!r} must be an int from 0 (the default, first) to "
                f"{MAX_PRIORITY}; lower numbers run first", priority=repr(priority))
        if delay is not None and (isinstance(delay, bool) or not isinstance(delay, (int, float))
                                  or not 0 <= delay < 10**9):
            raise DurapipeError(
                f"{where}: delay={delay!r} must be a number of seconds >= 0 before the run "
                "starts", delay=repr(delay))
        if max_tokens is None:
            max_tokens = default_max_tokens
        if max_tokens is not None and (isinstance(max_tokens, bool)
                                       or not isinstance(max_tokens, int) or max_tokens < 1):
            raise DurapipeError(
                f"{where}: max_tokens={max_tokens!r} must be a positive int (input plus output "
                "tokens of every model call of the run and its background tasks), or None",
                max_tokens=repr(max_tokens))
        return cls(where, pipeline, _text(tenant, "tenant", where), priority or None,
                   _text(dedup_key, "dedup_key", where), float(delay) if delay else None,
                   max_tokens, schedule)

    @property
    def queued(self) -> bool:
        """Whether a direct start must go through the app's start queue."""
        return self.priority is not None or self.delay is not None

    def attributes(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {}
        if self.tenant is not None:
            attrs[TENANT] = self.tenant
        if self.dedup_key is not None:
            attrs[DEDUP] = self.dedup_token
        if self.max_tokens is not None:
            attrs[MAX_TOKENS] = self.max_tokens
        if self.schedule is not None:
            attrs[SCHEDULE] = self.schedule
        return attrs

    @property
    def dedup_token(self) -> str:
        return f"{self.pipeline}\x1f{self.dedup_key}"

    @contextlib.contextmanager
    def options(self, spec: QueueSpec | None = None, queued: bool = False) -> Iterator[None]:
        """The DBOS contexts of the start: attributes, and for a queued start the enqueue
        options (priority, delay, the tenant as partition key on a per-tenant queue)."""
        with contextlib.ExitStack() as stack:
            attrs = self.attributes()
            if attrs:
                stack.enter_context(SetWorkflowAttributes(attrs))
            if queued:
                partition = None
                if spec is not None and spec.per_tenant_limits:
                    if self.tenant is None:
                        raise DurapipeError(
                            f"{self.where}: queue {spec.name!r} limits each tenant "
                            "(per_tenant=/per_tenant_rate=); pass tenant= to enqueue on it",
                            queue=spec.name)
                    partition = self.tenant
                if self.priority is not None or self.delay is not None or partition:
                    stack.enter_context(SetEnqueueOptions(
                        priority=self.priority, delay_seconds=self.delay,
                        queue_partition_key=partition))
            yield


# -- dedup ----------------------------------------------------------------------------------

_engines: dict[str, sa.Engine] = {}
_engines_lock = threading.Lock()


def _pg_url(url: str) -> str:
    if url.startswith("sqlite"):
        return url
    return url.replace("postgres://", "postgresql://", 1).replace(
        "postgresql://", "postgresql+psycopg://", 1)


def system_engine(app: App) -> sa.Engine:
    """An engine on the app's system database, for durapipe's own reads and locks: DBOS's
    own pool where durapipe writes step rows itself (a DBOS release it is tested with, see
    ``steps.TESTED_DBOS``), else one of its own on the URL, opening a connection per use."""
    log = app.step_log()
    if log is not None:
        return log.engine
    url = app.database_url
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            engine = sa.create_engine(_pg_url(url), poolclass=sa.pool.NullPool)
            _engines[url] = engine
        return engine


def _lock_engine(url: str) -> sa.Engine:
    """The connections that wait on dedup advisory locks: never DBOS's pool, whose
    connections the lock's holder needs to find and start its run (a pool filled with
    waiters would leave it none)."""
    key = f"lock\x1f{url}"
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = sa.create_engine(_pg_url(url), pool_size=1, max_overflow=15,
                                      pool_pre_ping=True)
            _engines[key] = engine
        return engine


class _KeyLocks:
    """One lock per key while anyone holds or waits for it (then dropped), so that a
    process has at most one waiter per key on the database's advisory lock."""

    def __init__(self, make: Any) -> None:
        self._make = make
        self._guard = threading.Lock()
        self._held: dict[Any, list[Any]] = {}

    @contextlib.contextmanager
    def entry(self, key: Any) -> Iterator[Any]:
        with self._guard:
            found = self._held.setdefault(key, [self._make(), 0])
            found[1] += 1
        try:
            yield found[0]
        finally:
            with self._guard:
                found[1] -= 1
                if found[1] == 0:
                    del self._held[key]


_thread_locks = _KeyLocks(threading.Lock)
_task_locks = _KeyLocks(asyncio.Lock)


def _lock_key(app: App, adm: Admission) -> str:
    return f"{app.dbos_name}\x1f{adm.dedup_token}"


@contextlib.contextmanager
def _advisory_lock(app: App, key: str) -> Iterator[None]:
    """Postgres's advisory lock of ``key`` (a no-op on SQLite: one process)."""
    if app.database_url.startswith("sqlite"):
        yield
        return
    # Two 32-bit halves: the pair is the advisory lock's key (a crc clash only serializes
    # two unrelated starts, it never merges them: the run is found by its attribute).
    k1, k2 = zlib.crc32(key.encode()), zlib.adler32(key.encode())
    k1, k2 = k1 - 2**32 if k1 >= 2**31 else k1, k2 - 2**32 if k2 >= 2**31 else k2
    with _lock_engine(app.database_url).connect() as con:
        con.execute(sa.text("SELECT pg_advisory_lock(:a, :b)"), {"a": k1, "b": k2})
        con.commit()
        try:
            yield
        finally:
            con.execute(sa.text("SELECT pg_advisory_unlock(:a, :b)"), {"a": k1, "b": k2})
            con.commit()


@contextlib.contextmanager
def dedup_lock(app: App, adm: Admission) -> Iterator[None]:
    """Hold the lock of ``adm``'s dedup key of this app (a no-op without a key): first the
    process's own lock of the key, then the database's, so any number of threads starting
    one key wait on one connection."""
    if adm.dedup_key is None:
        yield
        return
    key = _lock_key(app, adm)
    with _thread_locks.entry(key) as lock, lock, _advisory_lock(app, key):
        yield


@contextlib.asynccontextmanager
async def dedup_lock_async(app: App, adm: Admission) -> AsyncIterator[None]:
    """:func:`dedup_lock` for async code: tasks of one loop wait on an asyncio lock of the
    key, and only its holder waits, off the loop, for the database's lock."""
    if adm.dedup_key is None:
        yield
        return
    async with keyed_lock_async(app, _lock_key(app, adm)):
        yield


@contextlib.asynccontextmanager
async def keyed_lock_async(app: App, key: str, shared: bool = True) -> AsyncIterator[None]:
    """Hold ``key``'s lock across processes, from async code: tasks of one loop queue (first
    come, first served) on an asyncio lock of the key; its holder then takes, off the loop,
    the process's lock of the key and, when ``shared``, the database's advisory lock (on a
    connection of :func:`_lock_engine`, never DBOS's pool). Used for dedup keys and token
    budgets."""
    with _task_locks.entry((id(asyncio.get_running_loop()), key)) as local:
        async with local:
            with _thread_locks.entry(key) as lock:
                held = _held(lock, app, key, shared)
                loop = asyncio.get_running_loop()
                entering = asyncio.ensure_future(asyncio.to_thread(held.__enter__))
                try:
                    await asyncio.shield(entering)
                except asyncio.CancelledError:
                    # The thread still takes the locks: release them once it has them.
                    entering.add_done_callback(lambda f: f.cancelled() or f.exception() or (
                        loop.run_in_executor(None, held.__exit__, None, None, None) and None))
                    raise
                try:
                    yield
                finally:
                    await asyncio.to_thread(held.__exit__, None, None, None)


@contextlib.contextmanager
def _held(lock: threading.Lock, app: App, key: str, shared: bool = True) -> Iterator[None]:
    with lock, (_advisory_lock(app, key) if shared else contextlib.nullcontext()):
        yield


def active_run(app: App, adm: Admission) -> str | None:
    """The unfinished run of this app started with ``adm``'s dedup key, if any."""
    if adm.dedup_key is None:
        return None
    # The pipeline's runs (and runs recorded before runs were named by pipeline).
    names = [run_workflow_name(adm.pipeline), WORKFLOW_NAME]
    if app.database_url.startswith("sqlite"):  # DBOS filters attributes on Postgres only
        found = [st for st in DBOS.list_workflows(name=names, status=UNFINISHED,
                                                  load_input=False, load_output=False)
                 if (st.attributes or {}).get(DEDUP) == adm.dedup_token]
    else:
        found = DBOS.list_workflows(name=names, status=UNFINISHED,
                                    attributes={DEDUP: adm.dedup_token},
                                    load_input=False, load_output=False)
    mine = [st for st in found if belongs_to(app.dbos_name, st)]
    return mine[0].workflow_id if mine else None


# -- reading a run's admission back (tenant of a run, budget) --------------------------------

_attrs_cache: dict[str, dict[str, Any]] = {}


def cached_attributes(run_id: str) -> dict[str, Any] | None:
    return _attrs_cache.get(run_id)


def run_attributes(app: App, run_id: str) -> dict[str, Any]:
    """The attributes a run was started with (fixed at its start, so cached)."""
    found = _attrs_cache.get(run_id)
    if found is not None:
        return found
    schema = "" if app.database_url.startswith("sqlite") else f"{_schema(app)}."
    with system_engine(app).connect() as con:
        raw = con.execute(sa.text(f"SELECT attributes FROM {schema}workflow_status "
                                  "WHERE workflow_uuid = :id"), {"id": run_id}).scalar()
    if isinstance(raw, str):
        import json

        raw = json.loads(raw)
    attrs = dict(raw) if isinstance(raw, dict) else {}
    if len(_attrs_cache) > 10_000:
        _attrs_cache.clear()
    _attrs_cache[run_id] = attrs
    return attrs


def _schema(app: App) -> str:
    return str(app.dbos_config().get("dbos_system_schema") or "dbos")


async def task_partition(app: App, queue: str, root: str) -> str | None:
    """The partition of a background task on ``queue``: its run's tenant when the queue is
    one of the app's per-tenant queues and the run has a tenant, else None."""
    spec = app.queue_spec(queue)
    if spec is None or not spec.per_tenant_limits:
        return None
    attrs = cached_attributes(root)
    if attrs is None:
        attrs = await asyncio.to_thread(run_attributes, app, root)
    tenant = attrs.get(TENANT)
    return tenant if isinstance(tenant, str) else None
