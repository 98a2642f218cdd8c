"""The writer of the run event streams: one thread per process that writes events in batches.

Events are buffered and written by one thread per process in batches, one statement each
(``QUIET``/``LINGER`` below: a short run's events go in one batch at its end), off the run's
path. On Postgres the statement is ``durapipe.append_event_rows`` (``sql/events.sql``): per
run, under the run's lock, events whose key is already there are skipped or become their
``on_repeat`` marker, and the rest are numbered from the run's next offset. What is emitted
and when: :mod:`.events`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from importlib import resources
from typing import Any, NamedTuple

import sqlalchemy as sa

log = logging.getLogger("durapipe")

CHANNEL = "durapipe_events"
# When the writer writes a batch (unless a workflow waits for it: then at once): once no
# event came for QUIET seconds, or LINGER seconds after the batch's first event. A run busy
# emitting (a short pipeline, a token stream) costs one write per LINGER or one at its end;
# an event after which the run goes quiet (a slow node finishing) is written QUIET later.
QUIET = 0.002
LINGER = 0.025

def pg_ddl() -> str:
    """The Postgres table ``durapipe.events`` and its append function (``sql/events.sql``)."""
    return resources.files("durapipe").joinpath("sql/events.sql").read_text(encoding="utf-8")


SQLITE_DDL = [
    """CREATE TABLE IF NOT EXISTS durapipe_events (
        run_id text NOT NULL, seq integer NOT NULL, key text, type text NOT NULL,
        path text, name text, kind text, data text NOT NULL DEFAULT '{}',
        at real NOT NULL, PRIMARY KEY (run_id, seq))""",
    "CREATE UNIQUE INDEX IF NOT EXISTS durapipe_events_key ON durapipe_events (run_id, key)",
]


def table_name(postgres: bool) -> str:
    return "durapipe.events" if postgres else "durapipe_events"


class Pending(NamedTuple):
    """An event waiting to be written (a tuple: built once per event on the run's thread)."""

    run_id: str
    type: str
    path: str | None
    name: str | None
    kind: str | None
    data: dict[str, Any]
    at: float
    key: str | None = None
    on_repeat: str | None = None


class EventLog:
    """Buffers a process's events and writes them in batches on one thread.

    ``emit`` never blocks on the database; ``flush(run_id)`` waits until every event of the
    run emitted so far is written (a workflow calls it before it returns).
    """

    def __init__(self, url: str) -> None:
        self.postgres = not url.startswith("sqlite")
        # Postgres: the writer thread's own psycopg connection; SQLite: through SQLAlchemy.
        self.engine = None if self.postgres else sa.create_engine(url)
        self.table = table_name(self.postgres)
        self.url = url
        self._pg: Any = None  # the writer thread's own connection (Postgres)
        self._ready = False
        self._buffer: list[Pending] = []
        # emit takes the plain lock under the condition (not re-entrant: cheaper per event)
        self._mutex = threading.Lock()
        self._lock = threading.Condition(self._mutex)
        self._emitted = 0
        self._written = 0
        self._stopped = False
        self._failing = False  # the last write found the database away
        self._urgent = False  # someone waits for what is buffered: write it now
        self._waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._thread = threading.Thread(target=self._loop, name="durapipe-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _install(self) -> None:
        if self.postgres:
            con = self._pg_connection()
            with con.transaction():
                con.execute("SELECT pg_advisory_xact_lock(hashtext('durapipe.events'))")
                con.execute(pg_ddl())
        else:
            assert self.engine is not None
            with self.engine.begin() as lite:
                for ddl in SQLITE_DDL:
                    lite.exec_driver_sql(ddl)
        self._ready = True

    def stop(self, wait: float = 5.0) -> None:
        """Write what is buffered (up to ``wait`` seconds), then stop the writer thread."""
        with self._lock:
            target = self._emitted
            self._urgent = True
            self._lock.notify_all()
            self._lock.wait_for(lambda: self._written >= target or not self._thread.is_alive(),
                                timeout=wait)
            self._stopped = True
            self._wake()
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=wait)
        if self._pg is not None:
            self._pg.close()
        if self.engine is not None:
            self.engine.dispose()

    def emit(self, event: Pending) -> None:
        with self._mutex:
            if self._stopped:
                return
            self._buffer.append(event)
            self._emitted += 1
            if len(self._buffer) == 1:  # the writer waits for a first event only
                self._lock.notify_all()

    def wait_written(self, timeout: float = 30.0) -> None:
        """Block until every event emitted so far is written (or ``timeout`` passes)."""
        with self._lock:
            target = self._emitted
            self._urgent = True
            self._lock.notify_all()
            self._lock.wait_for(lambda: self._written >= target or self._stopped, timeout=timeout)

    async def flush(self, timeout: float = 30.0) -> None:
        """:meth:`wait_written` for a coroutine: the writer wakes it, no thread waits."""
        loop = asyncio.get_running_loop()
        with self._lock:
            # While the database is away the workflow's end cannot be recorded either: do
            # not hold it until the database is back (it would then record an outage's error
            # as the run's end); the events stay queued and are written when it is back.
            if self._written >= self._emitted or self._stopped or self._failing:
                return
            done: asyncio.Future[None] = loop.create_future()
            self._waiters.append((self._emitted, loop, done))
            self._urgent = True
            self._lock.notify_all()
        try:
            await asyncio.wait_for(done, timeout)
        except asyncio.TimeoutError:
            log.warning("durapipe: run events not written within %s s; going on", timeout)

    def _wake_all(self) -> None:
        """Resolve every waiting flush (called holding the lock): the database is away."""
        for _, loop, done in self._waiters:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, done)
        self._waiters = []

    def _wake(self) -> None:
        """Resolve the flushes whose events are written (called holding the lock)."""
        keep = []
        for target, loop, done in self._waiters:
            if self._written >= target or self._stopped:
                with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
                    loop.call_soon_threadsafe(_resolve, done)
            else:
                keep.append((target, loop, done))
        self._waiters = keep

    # -- the writer thread ------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: bool(self._buffer) or self._stopped)
                if self._stopped and not self._buffer:
                    return
                self._gather()
                self._urgent = False
                batch, self._buffer = self._buffer, []
            delay = 0.05
            while True:
                try:
                    self._write(batch)
                    self._failing = False
                    break
                except Exception as exc:
                    if not _retriable(exc):  # a value the database refuses: never retried
                        self._one_by_one(batch, exc)
                        break
                    with self._lock:
                        self._failing = True
                        self._wake_all()
                    if self._stopped:  # the database is away: keep the batch, retry
                        log.warning("durapipe: %d run events not written at stop: %s",
                                    len(batch), exc)
                        break
                    log.warning("durapipe: writing run events failed, retrying: %s", exc)
                    time.sleep(delay)
                    delay = min(delay * 2, 2.0)
            with self._lock:
                self._written += len(batch)
                self._wake()
                self._lock.notify_all()

    def _gather(self) -> None:
        """Let more events join the batch (holding the lock): see QUIET and LINGER."""
        until = time.monotonic() + LINGER
        seen = self._emitted
        while not (self._urgent or self._stopped):
            left = until - time.monotonic()
            if left <= 0:
                return
            self._lock.wait(timeout=min(QUIET, left))
            if self._emitted == seen:
                return  # quiet: nothing came since the last look
            seen = self._emitted

    def _one_by_one(self, batch: list[Pending], exc: Exception) -> None:
        """Write a refused batch event by event, so only the refused ones are lost."""
        for event in batch if len(batch) > 1 else ():
            try:
                self._write([event])
            except Exception as one:
                log.warning("durapipe: run event %s %s of run %s not written: %s", event.type,
                            event.path, event.run_id, one)
        if len(batch) == 1:
            log.warning("durapipe: run event %s %s of run %s not written: %s", batch[0].type,
                        batch[0].path, batch[0].run_id, exc)

    def _write(self, batch: list[Pending]) -> None:
        if not self._ready:
            self._install()
        by_run: dict[str, list[Pending]] = {}
        for e in batch:
            by_run.setdefault(e.run_id, []).append(e)
        if self.postgres:  # one statement, one round trip (autocommit)
            payload = {run: _rows(evs) for run, evs in by_run.items()}
            self._pg_connection().execute("SELECT durapipe.append_event_rows(%s::jsonb)",
                                          (json.dumps(payload, separators=(",", ":")),))
            return
        assert self.engine is not None
        with self.engine.begin() as con:
            for run_id in sorted(by_run):
                self._append(con, run_id, by_run[run_id])

    def _pg_connection(self) -> Any:
        con = self._pg
        if con is None or con.closed or con.broken:
            import psycopg

            con = self._pg = psycopg.connect(self.url, autocommit=True)
        return con

    def _append(self, con: sa.Connection, run_id: str, events: list[Pending]) -> None:
        t = self.table  # SQLite: one writer at a time, so max(seq) + 1 is free
        last = con.execute(sa.text(f"SELECT max(seq) FROM {t} WHERE run_id = :run"),
                           {"run": run_id}).scalar()
        keys = sorted({e.key for e in events if e.key is not None})
        present: set[str] = set()
        if keys:
            q = sa.text(f"SELECT key FROM {t} WHERE run_id = :run AND key IN :keys").bindparams(
                sa.bindparam("keys", expanding=True))
            present = {r[0] for r in con.execute(q, {"run": run_id, "keys": keys})}
        seq = -1 if last is None else int(last)
        rows = []
        for e in events:
            key, kind_of = e.key, e.type
            if key is not None and key in present:
                if e.on_repeat is None:
                    continue
                key, kind_of = None, e.on_repeat
            elif key is not None:
                present.add(key)
            seq += 1
            rows.append({"run": run_id, "seq": seq, "key": key, "type": kind_of, "path": e.path,
                         "name": e.name, "kind": e.kind, "data": json.dumps(e.data),
                         "at": e.at})
        if not rows:
            return
        con.execute(sa.text(
            f"INSERT INTO {t} (run_id, seq, key, type, path, name, kind, data, at) "
            "VALUES (:run, :seq, :key, :type, :path, :name, :kind, :data, :at)"), rows)


def _rows(events: list[Pending]) -> list[list[Any]]:
    """One run's events as ``append_event_rows`` takes them: lists, in order; a key repeated
    within the batch already turns into its ``on_repeat`` marker (or is dropped) here."""
    rows: list[list[Any]] = []
    keys: set[str] = set()
    for e in events:
        key, kind_of = e.key, e.type
        if key is not None:
            if key in keys:
                if e.on_repeat is None:
                    continue
                key, kind_of = None, e.on_repeat
            else:
                keys.add(key)
        rows.append([kind_of, e.path, e.name, e.kind, e.data, e.at, key, e.on_repeat])
    return rows


def _resolve(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def _retriable(exc: Exception) -> bool:
    """A lost or busy database (worth another try), not a statement it refuses."""
    import psycopg

    return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError,
                            sa.exc.OperationalError, sa.exc.InterfaceError, OSError))
