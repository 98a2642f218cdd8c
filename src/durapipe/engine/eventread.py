"""Reading a run's event stream, from any process, with or without a launched App.

>>> reader = EventReader("postgresql://localhost/app")
>>> for event in reader.follow("post-42", from_offset=0):   # until the run ends
...     print(event.offset, event.type, event.path, event.name)

``follow`` yields events in offset order until the run's ``run_finished`` event once its
end is recorded (a run resumed after it goes on), or, for a run that ended without
writing one, its terminal status; a reader that stops can start
again at ``last.offset + 1`` and gets exactly the rest. On Postgres it wakes on
``NOTIFY durapipe_events`` (the writer notifies on commit), and polls every
``idle`` seconds besides; on SQLite it polls.
"""

from __future__ import annotations

import asyncio
import enum
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from ..errors import DurapipeError
from .eventlog import CHANNEL, table_name

TERMINAL = frozenset({"SUCCESS", "ERROR", "CANCELLED", "MAX_RECOVERY_ATTEMPTS_EXCEEDED"})


class EventType(str, enum.Enum):
    """What an event says. ``run_resumed`` and ``model_restarted`` mark a restart: a process
    took the run over after a crash, or a model call runs again (drop its partial text)."""

    RUN_STARTED = "run_started"
    RUN_RESUMED = "run_resumed"
    RUN_FINISHED = "run_finished"
    NODE_STARTED = "node_started"
    NODE_FINISHED = "node_finished"
    NODE_FAILED = "node_failed"
    NODE_SKIPPED = "node_skipped"
    GATE_WAITING = "gate_waiting"
    GATE_ANSWERED = "gate_answered"
    TASK_DISPATCHED = "task_dispatched"
    TASK_PROGRESS = "task_progress"
    TASK_JOINED = "task_joined"
    RETRY = "retry"
    MODEL_STARTED = "model_started"
    TOKEN = "token"
    MODEL_RESTARTED = "model_restarted"


@dataclass(frozen=True)
class Event:
    """One event of a run's stream. ``offset`` counts from 0 without gaps."""

    offset: int
    type: EventType
    run_id: str
    path: str | None
    name: str | None
    kind: str | None
    data: dict[str, Any]
    at: float

    @property
    def ends_run(self) -> bool:
        return self.type is EventType.RUN_FINISHED

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["type"] = self.type.value
        return out


def _event(run_id: str, row: tuple[Any, ...]) -> Event:
    seq, type_, path, name, kind, data, at = row
    if isinstance(data, str):
        data = json.loads(data)
    return Event(int(seq), EventType(type_), run_id, path, name, kind, data or {}, float(at))


class EventReader:
    """Reads run event streams from a database URL (``postgresql://`` or ``sqlite:///``)."""

    def __init__(self, url: str, schema: str = "dbos") -> None:
        self.url = url
        self.postgres = not url.startswith("sqlite")
        self.schema = schema
        self._pg: psycopg.Connection[Any] | None = None
        self._lite: sqlite3.Connection | None = None
        self._listening = False

    def close(self) -> None:
        if self._pg is not None:
            self._pg.close()
            self._pg = None
        if self._lite is not None:
            self._lite.close()
            self._lite = None

    def __enter__(self) -> EventReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        if self.postgres:
            if self._pg is None or self._pg.closed:
                url = self.url.replace("postgresql+psycopg://", "postgresql://")
                self._pg = psycopg.connect(url, autocommit=True)
            try:
                return self._pg.execute(sql, params).fetchall()
            except psycopg.errors.UndefinedTable:
                return []
        if self._lite is None:
            self._lite = sqlite3.connect(self.url.removeprefix("sqlite:///"),
                                         check_same_thread=False)
        try:
            return self._lite.execute(sql.replace("%s", "?"), params).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise

    def read(self, run_id: str, from_offset: int = 0, limit: int = 1000) -> list[Event]:
        """The events of ``run_id`` from ``from_offset`` on (at most ``limit``), in order."""
        rows = self._query(
            f"SELECT seq, type, path, name, kind, data, at FROM {table_name(self.postgres)} "
            "WHERE run_id = %s AND seq >= %s ORDER BY seq LIMIT %s",
            (run_id, int(from_offset), int(limit)))
        return [_event(run_id, r) for r in rows]

    def waits(self, run_id: str, kinds: tuple[str, ...] = ("join", "sleep")) -> list[Event]:
        """The start and end events of the run's nodes of ``kinds``: the waits that record
        nothing of their own (a join for its tasks, a durable sleep), for the timeline."""
        marks = ", ".join(["%s"] * len(kinds))
        rows = self._query(
            f"SELECT seq, type, path, name, kind, data, at FROM {table_name(self.postgres)} "
            f"WHERE run_id = %s AND kind IN ({marks}) "
            "AND type IN ('node_started', 'node_finished', 'node_failed') ORDER BY seq",
            (run_id, *kinds))
        return [_event(run_id, r) for r in rows]

    def status(self, run_id: str) -> str | None:
        table = f'"{self.schema}".workflow_status' if self.postgres else "workflow_status"
        rows = self._query(f"SELECT status FROM {table} WHERE workflow_uuid = %s", (run_id,))
        return str(rows[0][0]) if rows else None

    def _wait(self, idle: float) -> None:
        if not self.postgres or self._pg is None:
            time.sleep(min(idle, 0.1))
            return
        if not self._listening:
            self._pg.execute(f"LISTEN {CHANNEL}")
            self._listening = True
            return  # read again: an event may have landed before LISTEN
        for _ in self._pg.notifies(timeout=idle, stop_after=1):
            pass

    def _ended(self, run_id: str, offset: int, patience: float = 2.0) -> bool:
        """After a ``run_finished``: True once the run's end is recorded; False when events
        follow it (the run was resumed, e.g. ``durapipe resume`` after an error)."""
        give_up = time.monotonic() + patience
        while time.monotonic() < give_up:
            if self.read(run_id, offset, limit=1):
                return False
            if self.status(run_id) in TERMINAL:
                return not self.read(run_id, offset, limit=1)
            time.sleep(0.01)
        return False  # resumed and quiet (e.g. at a gate): follow on

    def follow(self, run_id: str, from_offset: int = 0, *, idle: float = 0.5,
               timeout: float | None = None) -> Iterator[Event]:
        """Yield the run's events from ``from_offset`` until the run ends.

        ``timeout`` (seconds) bounds the wait for the next event with ``TimeoutError``.
        """
        if isinstance(from_offset, bool) or not isinstance(from_offset, int) or from_offset < 0:
            raise DurapipeError(f"from_offset={from_offset!r} must be an int >= 0 (the offset "
                                "after the last event read, or 0 for the whole stream)")
        offset = from_offset
        last_seen = time.monotonic()
        while True:
            batch = self.read(run_id, offset)
            for event in batch:
                offset = event.offset + 1
                yield event
                if event.ends_run and self._ended(run_id, offset):
                    return
            if batch:
                last_seen = time.monotonic()
                continue
            if self.status(run_id) in TERMINAL:
                # Ended without a run_finished event (cancelled elsewhere, or recorded before
                # streams existed): whatever was written is read; then stop.
                rest = self.read(run_id, offset)
                yield from rest
                return
            if timeout is not None and time.monotonic() - last_seen > timeout:
                raise TimeoutError(f"run {run_id!r}: no event within {timeout} s")
            self._wait(idle)


async def follow_async(url: str, run_id: str, from_offset: int = 0, *, schema: str = "dbos",
                       timeout: float | None = None) -> AsyncIterator[Event]:
    """:meth:`EventReader.follow` as an async iterator; each read runs on a worker thread,
    and closing the iterator (a client gone) closes the reader's connection."""
    reader = EventReader(url, schema)
    events = reader.follow(run_id, from_offset, timeout=timeout)
    done = object()

    def step() -> Any:
        return next(events, done)
    try:
        while True:
            event = await asyncio.to_thread(step)
            if event is done:
                return
            yield event
    finally:
        await asyncio.to_thread(reader.close)
