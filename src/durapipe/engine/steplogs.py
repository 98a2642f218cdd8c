"""Logs and tracebacks per step: what a step's code logged, and where it failed.

While a step body runs, records of the ``logging`` module emitted on its thread or task
(at the levels your logging configuration lets through; WARNING by default) are collected,
bounded (:data:`MAX_RECORDS` records of at most :data:`MAX_MESSAGE` characters). When the
body logged anything or failed, they are stored with the step as the run's DBOS event
``log:<step name>`` (``log:0.2:writer``), together with the failure's traceback: the
``file:line`` frames of the user's code, durapipe's and DBOS's own frames left out. A step
that logs nothing and succeeds writes nothing more.

A retried step keeps every attempt: each record names its ``attempt`` (1, 2, ...), and
``attempts`` lists the failed attempts with their error and traceback (at most
:data:`MAX_ATTEMPTS`, the latest). The bound holds for the step as a whole: when the
attempts logged more than :data:`MAX_RECORDS` records, the earliest attempts' records go
first (``dropped`` counts them). ``error``/``traceback`` at the top are the last attempt's,
so a step that succeeded on a retry has none. ``durapipe show``, the console and the view
``durapipe.step_logs`` read them.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sysconfig
import traceback
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from dbos import WorkflowSerializationFormat
from dbos._context import snapshot_step_context
from dbos._core import set_event as _dbos_set_event
from dbos._dbos import _get_dbos_instance

from ..errors import error_text
from . import outcomes

LOG_EVENT_PREFIX = "log:"
MAX_RECORDS = 200
MAX_MESSAGE = 2000
MAX_FRAMES = 20
MAX_ATTEMPTS = 10
_buffer: ContextVar[list[dict[str, Any]] | None] = ContextVar("durapipe_step_logs", default=None)
_OWN_DIRS = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,       # durapipe/
             os.path.dirname(os.path.abspath(inspect.getfile(_dbos_set_event))) + os.sep)  # dbos/
_STDLIB = os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep


class _StepHandler(logging.Handler):
    """Adds each record to the buffer of the step running in this thread or task."""

    def emit(self, record: logging.LogRecord) -> None:
        _last_resort(record)
        buf = _buffer.get()
        if buf is None or record.name == "dbos" or record.name.startswith("dbos."):
            return
        if len(buf) >= MAX_RECORDS:
            buf[-1]["dropped"] = buf[-1].get("dropped", 0) + 1
            return
        try:
            message = record.getMessage()
        except Exception:  # a bad format string in user code must not fail the step
            message = str(record.msg)
        if record.exc_info and record.exc_info[1] is not None:
            message += f" [{error_text(record.exc_info[1])}]"
        buf.append({"at_ms": int(record.created * 1000), "level": record.levelname,
                    "logger": record.name, "message": message[:MAX_MESSAGE]})


_HANDLER = _StepHandler()


def _last_resort(record: logging.LogRecord) -> None:
    """Print ``record`` the way Python would if this handler were not on the root logger.

    With no handler configured anywhere, Python prints warnings and errors to stderr
    (``logging.lastResort``); a handler on the root logger, even this one, turns that off.
    So a record that no other handler would see goes to ``lastResort`` here, and an app
    that never configured logging still sees durapipe's and its own warnings.
    """
    resort = logging.lastResort
    if resort is None or record.levelno < resort.level:
        return
    logger: logging.Logger | None = logging.getLogger(record.name)
    while logger is not None:
        if any(h is not _HANDLER for h in logger.handlers):
            return
        logger = logger.parent if logger.propagate else None
    resort.handle(record)


def _install() -> None:
    root = logging.getLogger()
    if _HANDLER not in root.handlers:
        root.addHandler(_HANDLER)


def user_frames(exc: BaseException) -> list[dict[str, Any]]:
    """The traceback's frames outside durapipe, DBOS and the standard library, innermost last."""
    frames = []
    for fr in traceback.extract_tb(exc.__traceback__):
        path = os.path.abspath(fr.filename)
        if path.startswith(_OWN_DIRS) or (path.startswith(_STDLIB) and "site-packages" not in path):
            continue
        frames.append({"file": fr.filename, "line": fr.lineno, "function": fr.name,
                       "code": (fr.line or "")[:200]})
    return frames[-MAX_FRAMES:]


class _Attempts:
    """What the attempts of one step execution logged so far, kept within the bounds."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.count = 0
        self.records: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self.dropped = 0

    def publish(self, records: list[dict[str, Any]], exc: BaseException | None) -> None:
        """Store this attempt's records and outcome with the earlier attempts'."""
        attempt = self.count
        if not records and exc is None and not self.records and not self.failures:
            return  # a quiet success (also after quiet attempts): nothing to store
        for rec in records:
            rec["attempt"] = attempt
        self.records.extend(records)
        while len(self.records) > MAX_RECORDS and self.records[0]["attempt"] < attempt:
            gone = self.records.pop(0)  # the earliest attempts' records go first
            self.dropped += 1 + int(gone.get("dropped", 0))
        value: dict[str, Any] = {"step": self.where, "attempt": attempt, "records": self.records}
        if self.dropped:
            value["dropped"] = self.dropped
        if exc is not None:
            value["error"] = error_text(exc)
            value["traceback"] = user_frames(exc)
        if self.failures:
            value["attempts"] = self.failures
        _store(self.where, value)
        if exc is not None:
            self.failures = [*self.failures, {"attempt": attempt, "error": value["error"],
                                              "traceback": value["traceback"]}][-MAX_ATTEMPTS:]


def _store(where: str, value: dict[str, Any]) -> None:
    try:
        _dbos_set_event(_get_dbos_instance(), snapshot_step_context(), LOG_EVENT_PREFIX + where, value,
                        serialization_type=WorkflowSerializationFormat.DEFAULT)
    except Exception as err:  # the step's own outcome matters more than its logs
        logging.getLogger("durapipe").warning("could not store the logs of step %s: %s", where, err)


def capturing(where: str, body: Callable[[], Any]) -> Callable[[], Any]:
    """``body`` (sync or async) that stores its logs and traceback as the step ``where``'s;
    called once per attempt, it keeps the earlier attempts' too."""
    _install()
    attempts = _Attempts(where)
    if inspect.iscoroutinefunction(body):
        @functools.wraps(body)
        async def run_async() -> Any:
            records: list[dict[str, Any]] = []
            attempts.count += 1
            token = _buffer.set(records)
            try:
                out = await body()
            except BaseException as exc:
                attempts.publish(records, exc)
                raise
            finally:
                _buffer.reset(token)
            attempts.publish(records, None)
            return out
        return run_async

    @functools.wraps(body)
    def run_sync() -> Any:
        records: list[dict[str, Any]] = []
        attempts.count += 1
        token = _buffer.set(records)
        try:
            out = body()
        except BaseException as exc:
            attempts.publish(records, exc)
            raise
        finally:
            _buffer.reset(token)
        attempts.publish(records, None)
        return out
    return run_sync


outcomes.install()

__all__ = ["LOG_EVENT_PREFIX", "capturing", "user_frames"]
