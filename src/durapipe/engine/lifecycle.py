"""The runs executing in this process: graceful stop, drain, and cancellation of running work.

Every durapipe workflow (run, subtree, background task) registers its asyncio task here
while it executes in this process. That gives the App three things DBOS 3.4 does not:

- **A clean stop keeps runs resumable.** ``stop(drain)`` stops new steps from starting,
  waits up to ``drain`` seconds for the steps in flight, then cancels every registered
  task. A cancelled async workflow task is not recorded by DBOS (its status stays
  PENDING), so the next process with the same executor id, or ``durapipe recover``,
  resumes it from its last recorded step. (Without this, DBOS's own ``destroy`` cancels
  the tasks of runs started from sync code through a thread that records the
  cancellation as ``ERROR CancelledError``.)
- **Cancellation reaches running work.** :func:`cancel_local` cancels the tasks of a
  workflow and of its descendants now, so an async step in flight gets ``CancelledError``
  at its next await. A watcher thread reads, a few times a second while workflows run
  here, which of them another process cancelled (``durapipe cancel``, a run deadline)
  and cancels those too.
- **Counting steps in flight** (``step_started``/``step_done``) for the drain.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("durapipe")

# How often the watcher looks for workflows cancelled elsewhere while any run here.
WATCH_SECONDS = 0.2
# How long stop() waits for cancelled tasks to unwind.
UNWIND_SECONDS = 10.0
STOP_MESSAGE = "durapipe: the app is stopping; the run stays PENDING for recovery"
CANCEL_MESSAGE = "durapipe: the run was cancelled"

_lock = threading.Condition()
_tasks: dict[str, list[tuple[asyncio.Task[Any], asyncio.AbstractEventLoop]]] = {}
_since: dict[str, float] = {}  # workflow id -> when it began executing here (monotonic)
_state = {"stopping": False, "in_flight": 0}
_watcher: dict[str, Any] = {}


class _QuietStop(logging.Filter):
    """Drop DBOS's warning per cancelled workflow task while the app stops on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_state["stopping"] and str(record.msg).startswith("Asyncio task cancelled"))


logging.getLogger("dbos").addFilter(_QuietStop())


class _Stopped(asyncio.CancelledError):
    """A step refused to start because the app is stopping (raised on a worker thread)."""


def reset() -> None:
    """Forget a previous stop: called when an App launches."""
    with _lock:
        _state["stopping"] = False


def stopping() -> bool:
    return bool(_state["stopping"])


@contextmanager
def running(workflow_id: str) -> Iterator[None]:
    """Register the current asyncio task as the execution of ``workflow_id`` while it runs."""
    task = asyncio.current_task()
    if task is None or not workflow_id:
        yield
        return
    entry = (task, asyncio.get_running_loop())
    with _lock:
        _tasks.setdefault(workflow_id, []).append(entry)
        _since.setdefault(workflow_id, time.monotonic())
        _lock.notify_all()
    try:
        yield
    finally:
        with _lock:
            found = _tasks.get(workflow_id, [])
            if entry in found:
                found.remove(entry)
            if not found:
                _tasks.pop(workflow_id, None)
                _since.pop(workflow_id, None)
            _lock.notify_all()


# -- steps in flight --------------------------------------------------------------------

def step_started() -> bool:
    """Count a step about to run its body; False (nothing counted) when the app stops."""
    with _lock:
        if _state["stopping"]:
            return False
        _state["in_flight"] += 1
        return True


def step_done() -> None:
    with _lock:
        _state["in_flight"] -= 1
        _lock.notify_all()


async def hold() -> None:
    """Where a step that may not start waits: until the stop cancels its task."""
    await asyncio.Event().wait()


def refuse_on_thread() -> None:
    """A step on a worker thread that may not start ends its workflow's task here."""
    raise _Stopped(STOP_MESSAGE)


# -- stop -------------------------------------------------------------------------------

def _cancel(entries: list[tuple[asyncio.Task[Any], asyncio.AbstractEventLoop]], msg: str) -> None:
    for task, loop in entries:
        if task.done():
            continue
        try:
            if _on_loop(loop):
                task.cancel(msg)
            else:
                loop.call_soon_threadsafe(task.cancel, msg)
        except RuntimeError:  # the loop is closed: the task is gone with it
            pass


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def stop(drain: float = 0.0) -> list[str]:
    """Stop new steps, wait up to ``drain`` s for those in flight, cancel every running
    workflow task here and wait for them to unwind. Returns the ids of the runs left
    unfinished (root runs, not their subtrees or tasks)."""
    deadline = time.monotonic() + max(0.0, drain)
    with _lock:
        _state["stopping"] = True
        while _state["in_flight"] > 0 and time.monotonic() < deadline:
            _lock.wait(max(0.0, deadline - time.monotonic()))
        entries = [e for found in _tasks.values() for e in found]
        left = sorted({wid.split("/", 1)[0] for wid in _tasks})
    _cancel(entries, STOP_MESSAGE)
    if any(_on_loop(loop) for _, loop in entries):
        return left  # called on the loop the tasks run on: they unwind after we return
    unwind = time.monotonic() + UNWIND_SECONDS
    with _lock:
        while any(not t.done() for t, _ in entries) and time.monotonic() < unwind:
            _lock.wait(0.05)
    return left


# -- cancellation -----------------------------------------------------------------------

def cancel_local(*workflow_ids: str) -> int:
    """Cancel the tasks of these workflows and of their descendants running in this
    process (child ids start with ``<root>/``). Returns how many were cancelled."""
    with _lock:
        entries = [
            e for wid, found in _tasks.items()
            if any(wid == w or wid.startswith(f"{w}/") or _descends(wid, w) for w in workflow_ids)
            for e in found
        ]
    _cancel(entries, CANCEL_MESSAGE)
    return len(entries)


def _descends(child: str, parent: str) -> bool:
    """Children of a subtree ``<root>/<path>:<name>`` are ``<root>/<path>.<i>...``."""
    if "/" not in parent:
        return False
    root, _, rest = parent.partition("/")
    path = rest.split(":", 1)[0]
    return child.startswith(f"{root}/{path}.")


def start_watcher(find_cancelled: Callable[[list[str]], list[str]]) -> None:
    """Start the thread that cancels here what was cancelled elsewhere (one per launch)."""
    stop_watcher()
    halt = threading.Event()

    def watch() -> None:
        while not halt.wait(WATCH_SECONDS):
            # The executions seen now (a resumed one started later is not hit), and only
            # those running for a tick already: short runs never cost a query.
            now = time.monotonic()
            with _lock:
                seen = {wid: list(found) for wid, found in _tasks.items()
                        if now - _since.get(wid, now) >= WATCH_SECONDS}
            if not seen:
                continue
            try:
                cancelled = find_cancelled(list(seen))
            except Exception as exc:  # the database is away: try again at the next tick
                log.debug("durapipe: cancel watcher could not read statuses: %s", exc)
                continue
            _cancel([e for wid in cancelled for e in seen.get(wid, [])], CANCEL_MESSAGE)

    thread = threading.Thread(target=watch, name="durapipe-cancel-watcher", daemon=True)
    _watcher.update(halt=halt, thread=thread)
    thread.start()


def stop_watcher() -> None:
    halt, thread = _watcher.pop("halt", None), _watcher.pop("thread", None)
    if halt is not None:
        halt.set()
    if thread is not None and thread is not threading.current_thread():
        thread.join(timeout=5)
