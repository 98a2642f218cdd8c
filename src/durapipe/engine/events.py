"""A run's event stream: what the engine writes, and how.

Every run appends ordered events to the table ``durapipe.events`` (``durapipe_events`` on
SQLite): ``(run_id, seq, key, type, path, name, kind, data, at)``. ``seq`` is the offset, a
per-run counter without gaps, assigned at insert under a per-run lock, so a reader that
reads everything past its last offset never misses an event that commits later.

Why a table of our own rather than ``DBOS.write_stream``: a write from the workflow is a
DBOS operation with its own number, which would shift the number of every step after it
(the engine reserves step numbers for parallel branches, and a deploy compares a run's
recorded steps to the new code), and costs a round trip on the run's critical path. Here
events are buffered and written by one thread per process in batches, one statement each
(:mod:`.eventlog`: a short run's events go in one batch at its end), off that path
(``bench/bench_stream.py`` measures both). On the run's path an event is a tuple appended
under a lock; the rows and their JSON are built by the writer.

Exactly once from the workflow: an event the workflow writes has a ``key`` (``started:0.2``),
unique per run; a replay after a crash emits it again and the insert skips it. Events from
inside a step (token chunks, task progress, retries) have no key: at least once. An event
may name a marker for when its key is already there (``on_repeat``): the first event of a
run (``run_started``) turns into ``run_resumed`` when a restarted process replays it, and
the first token chunk of a model call into ``model_restarted`` when the call runs again, so
a reader sees the restart instead of a silent mix. A workflow waits for its events to be
written before it returns, so a finished run's stream is complete.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..errors import storable_text
from .eventlog import EventLog, Pending

# -- emitting ---------------------------------------------------------------------------

_log: dict[str, EventLog] = {}
_NO_DATA: dict[str, Any] = {}  # the data of the events that carry none (never changed)
# The run (root id) whose stream the code running here writes to; set by the workflows.
_run: contextvars.ContextVar[str | None] = contextvars.ContextVar("durapipe_event_run",
                                                                  default=None)


def set_log(event_log: EventLog | None) -> None:
    _log.clear()
    if event_log is not None:
        _log["log"] = event_log


def start_log(url: str | None) -> None:
    """Start this process's event writer for ``url`` (None: events off)."""
    stop_log()
    if url is not None:
        event_log = EventLog(url)
        event_log.start()
        set_log(event_log)


def stop_log() -> None:
    event_log = _log.pop("log", None)
    if event_log is not None:
        event_log.stop()


def active() -> EventLog | None:
    return _log.get("log")


def bind_run(run_id: str) -> contextvars.Token[str | None]:
    return _run.set(run_id)


def unbind_run(token: contextvars.Token[str | None]) -> None:
    _run.reset(token)


def current_run() -> str | None:
    return _run.get()


def emit(type: str, *, path: str | None = None, name: str | None = None,
         kind: str | None = None, data: dict[str, Any] | None = None, key: str | None = None,
         on_repeat: str | None = None, run_id: str | None = None) -> None:
    """Append an event to the stream of the run running here; a no-op with events off."""
    event_log = _log.get("log")
    if event_log is None:
        return
    run = run_id or _run.get()
    if run is None:
        return
    event_log.emit(Pending(run, type, path, name, kind, data or _NO_DATA, time.time(), key,
                           on_repeat))


@contextlib.asynccontextmanager
async def streaming(run_id: str, path: str, pipeline: str) -> AsyncIterator[None]:
    """Bind a workflow's code to its run's stream; the run's own workflow (path ``0``)
    writes ``run_started`` (``run_resumed`` when a restart replays it) and ``run_finished``.
    The workflow's events are written before it returns."""
    token = _run.set(run_id)
    root = path == "0"
    if root:
        emit("run_started", path=path, name=pipeline, kind="run", key="run",
             on_repeat="run_resumed")
    try:
        yield
    except Exception as exc:
        if root:
            status = "CANCELLED" if "Cancel" in type(exc).__name__ else "ERROR"
            emit("run_finished", path=path, name=pipeline, kind="run", key="run_end",
                 on_repeat="run_finished", data={"status": status, "error": _text(exc)})
        await flush()
        raise
    else:
        if root:
            emit("run_finished", path=path, name=pipeline, kind="run", key="run_end",
                 on_repeat="run_finished", data={"status": "SUCCESS"})
        await flush()
    finally:
        _run.reset(token)


async def flush() -> None:
    event_log = _log.get("log")
    if event_log is not None:
        await event_log.flush()


async def observe(node: Any, path: str, run: Callable[[], Any]) -> Any:
    """Run a node between its started and finished (or failed) events (with the duration).

    On the run's path per node: two tuples and a lock each; the rows are built by the writer.
    """
    event_log, run_id = _log.get("log"), _run.get()
    if event_log is None or run_id is None:
        return await run()
    label, kind, ended = node.label, node.kind, "ended:" + path
    event_log.emit(_started(run_id, path, label, kind))
    began = time.perf_counter()
    try:
        out = await run()
    except BaseException as exc:
        event_log.emit(_failed(run_id, path, label, kind, ended, began, exc))
        raise
    event_log.emit(_finished(run_id, path, label, kind, ended, began))
    return out


def observe_sync(node: Any, path: str, run: Callable[[], Any]) -> Any:
    """:func:`observe` for a node run on a worker thread."""
    event_log, run_id = _log.get("log"), _run.get()
    if event_log is None or run_id is None:
        return run()
    label, kind, ended = node.label, node.kind, "ended:" + path
    event_log.emit(_started(run_id, path, label, kind))
    began = time.perf_counter()
    try:
        out = run()
    except BaseException as exc:
        event_log.emit(_failed(run_id, path, label, kind, ended, began, exc))
        raise
    event_log.emit(_finished(run_id, path, label, kind, ended, began))
    return out


def _started(run_id: str, path: str, label: str, kind: str) -> Pending:
    return Pending(run_id, "node_started", path, label, kind, _NO_DATA, time.time(),
                   "started:" + path)


def _finished(run_id: str, path: str, label: str, kind: str, key: str, began: float) -> Pending:
    return Pending(run_id, "node_finished", path, label, kind, {"duration_ms": _ms(began)},
                   time.time(), key)


def _failed(run_id: str, path: str, label: str, kind: str, key: str, began: float,
            exc: BaseException) -> Pending:
    return Pending(run_id, "node_failed", path, label, kind,
                   {"error": _text(exc), "duration_ms": _ms(began)}, time.time(), key)


def attempts(where: str, body: Callable[[], Any]) -> Callable[[], Any]:
    """``body`` that writes a ``retry`` event each time it runs again (a step's retry)."""
    if _log.get("log") is None:
        return body
    count = [0]
    path, _, name = where.partition(":")

    def again() -> None:
        count[0] += 1
        if count[0] > 1:
            emit("retry", path=path, name=name, kind="step", data={"attempt": count[0]})

    if inspect.iscoroutinefunction(body):
        async def run_async() -> Any:
            again()
            return await body()
        return run_async

    def run() -> Any:
        again()
        return body()
    return run


def _text(exc: BaseException) -> str:
    return storable_text(f"{type(exc).__name__}: {exc}"[:2000])


def _ms(began: float) -> float:
    return round((time.perf_counter() - began) * 1000, 3)
