"""Durable steps recorded with one statement each, in DBOS's own step table.

A durapipe step (fn, model turn, tool call) is a DBOS step: a row of
``dbos.operation_outputs`` keyed by (workflow id, step number), written before the next
operation of the workflow starts, and looked up on replay. DBOS's generic step path spends
two transactions of two statements each on that, built anew by SQLAlchemy Core for every
call (see bench/NOTES.md). On Postgres, durapipe writes the same row with the same
guarantees in two single statements on DBOS's own connection pool, prepared by the driver:

- before the body, only where a recorded row can exist: one ``SELECT`` returns the
  workflow's status and the step's recorded row, if any. A cancelled workflow stops here
  (``DBOSWorkflowCancelledError``); a recorded step is replayed (its output returned or
  its error raised) without running the body; a row of another name is
  ``DBOSUnexpectedStepError``. Exactly DBOS's check. It also returns the highest step
  number recorded: the execution's *frontier*. A step numbered above the frontier of its
  execution (an owner token: every start, recovery and resume has its own) was not
  recorded when the execution began, so it skips this statement: an execution that is
  not replaying spends one statement per step (``StepLog.must_check``).
- after the body: one ``INSERT ... SELECT`` from the workflow's status row locked
  ``FOR NO KEY UPDATE`` writes the output or the error only while this execution still
  owns the workflow (a cancel, resume or recovery elsewhere takes ownership away: DBOS's
  cancel clears the owner token, so this is also the cancel check;
  ``DBOSWorkflowConflictIDError``, which DBOS turns into adopting the owner's outcome).
  A conflicting row with another completion time is ``DBOSStepNondeterminismError``;
  the same time is this execution's own write retried after a lost connection.

Step numbers come from DBOS (``snapshot_step_ctx``, or a ``DBOS.reserve_step()``
reservation inside a parallel branch), serialization from DBOS's serializer, the body runs
in DBOS's step context (so ``DBOS.step_id``, events and progress work inside it), and
lost connections are retried with DBOS's backoff. The rows are the ones ``DBOS.run_step``
writes (``tests/test_steps.py`` compares them), so ``DBOS.list_workflow_steps``, fork, recovery and the audit
views read them unchanged. SQLite apps, and ``App(steps="dbos")``, use ``DBOS.run_step``.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
import sqlalchemy as sa
from dbos._context import DBOSContext, EnterDBOSStepCtx, EnterDBOSStepRetry, get_local_dbos_context
from dbos._error import (
    DBOSMaxStepRetriesExceeded,
    DBOSStepNondeterminismError,
    DBOSUnexpectedStepError,
    DBOSWorkflowCancelledError,
    DBOSWorkflowConflictIDError,
)
from dbos._serialization import deserialize_exception, deserialize_value, serialize_exception, serialize_value
from dbos._sys_db_postgres import PostgresSystemDatabase
from dbos._utils import retriable_postgres_exception

from ..errors import DurapipeError, error_text
from . import bounds

T = TypeVar("T")
log = logging.getLogger("durapipe")

_CHECK = """
SELECT ws.status, oo.function_name, oo.output, oo.error, oo.serialization,
       (SELECT max(function_id) FROM {s}.operation_outputs WHERE workflow_uuid = %(wf)s)
FROM {s}.workflow_status AS ws
LEFT JOIN {s}.operation_outputs AS oo
  ON oo.workflow_uuid = ws.workflow_uuid AND oo.function_id = %(fid)s
WHERE ws.workflow_uuid = %(wf)s
"""

_RECORD = """
WITH owner AS (
  SELECT owner_xid FROM {s}.workflow_status WHERE workflow_uuid = %(wf)s FOR NO KEY UPDATE
), ins AS (
  INSERT INTO {s}.operation_outputs AS oo
    (workflow_uuid, function_id, function_name, started_at_epoch_ms, completed_at_epoch_ms,
     output, error, child_workflow_id, serialization, application_name, retention_timestamp)
  SELECT %(wf)s, %(fid)s, %(name)s, %(started)s, %(completed)s, %(output)s, %(error)s, %(child)s,
         %(ser)s, %(app)s, CAST(EXTRACT(epoch FROM now()) * 1000 AS BIGINT)
  FROM owner WHERE %(xid)s::text IS NULL OR owner.owner_xid = %(xid)s
  ON CONFLICT (workflow_uuid, function_id)
    DO UPDATE SET completed_at_epoch_ms = oo.completed_at_epoch_ms
  RETURNING completed_at_epoch_ms
)
SELECT (SELECT owner_xid FROM owner), (SELECT completed_at_epoch_ms FROM ins)
"""
_OUTPUT = """
SELECT output, serialization FROM {s}.operation_outputs
WHERE workflow_uuid = %(wf)s AND function_id = %(fid)s
"""

# The columns the record statement writes; any other column must have a default.
_WRITES = frozenset({
    "workflow_uuid", "function_id", "function_name", "started_at_epoch_ms",
    "completed_at_epoch_ms", "output", "error", "child_workflow_id", "serialization",
    "application_name", "retention_timestamp",
})
_COLUMNS = """
SELECT column_name, is_nullable = 'NO' AND column_default IS NULL
FROM information_schema.columns WHERE table_schema = %(schema)s AND table_name = %(table)s
"""
_CANCELLED = "CANCELLED"
TESTED_DBOS = frozenset({"3.4.0"})
"""The DBOS releases whose ``SystemDatabase`` the two statements mirror (and the test suite
ran on). On any other, steps go through DBOS's public ``DBOS.run_step`` with a warning:
the column check below would miss a change in what a column means."""
_MAX_BACKOFF = 60.0
_FRONTIERS = 10_000  # executions whose frontier a process remembers


def dbos_release() -> str:
    """The installed DBOS release, e.g. ``3.4.0``."""
    return importlib.metadata.version("dbos")


def _now_ms() -> int:
    return int(time.time() * 1000)


class StepLog:
    """Reads and writes durapipe's step rows for one launched DBOS runtime (Postgres only)."""

    def __init__(self, dbos: Any) -> None:
        sys_db = dbos._sys_db
        self.sys_db = sys_db
        self.engine: sa.Engine = sys_db.engine
        self.serializer = dbos._serializer
        self.app_name = sys_db.app_name
        schema = '"' + str(sys_db.schema).replace('"', '""') + '"'
        self.check_sql = _CHECK.format(s=schema)
        self.record_sql = _RECORD.format(s=schema)
        self.output_sql = _OUTPUT.format(s=schema)
        # (workflow id, owner token) of an execution -> the highest step number recorded
        # when it first checked: a step numbered above it is new (see ``must_check``).
        self.frontiers: OrderedDict[tuple[str, str], int] = OrderedDict()

    @staticmethod
    def supports(dbos: Any) -> bool:
        """True for DBOS's plain Postgres system database (not SQLite, not a sharded one)
        of a DBOS release this module is tested with (see ``TESTED_DBOS``)."""
        if type(getattr(dbos, "_sys_db", None)) is not PostgresSystemDatabase:
            return False
        release = dbos_release()
        if release not in TESTED_DBOS:
            log.warning("durapipe writes step rows itself only on the DBOS releases it is tested "
                        "with (%s); DBOS %s is installed, so step rows are written by "
                        "DBOS.run_step", ", ".join(sorted(TESTED_DBOS)), release)
            return False
        return True

    def fits_schema(self) -> bool:
        """True when ``operation_outputs`` has the columns this module writes and needs no
        other; a DBOS whose table differs keeps its own step path (with a warning)."""
        rows = self._execute(_COLUMNS, {"schema": str(self.sys_db.schema), "table": "operation_outputs"},
                             fetch_all=True)
        columns = {name: required for name, required in rows or ()}
        missing = sorted(_WRITES - set(columns))
        extra = sorted(c for c, required in columns.items() if required and c not in _WRITES)
        if missing or extra:
            log.warning("DBOS's operation_outputs table differs from the one durapipe writes "
                        "(missing %s, required %s): step rows are written by DBOS.run_step",
                        missing, extra)
            return False
        return True

    # -- statements ------------------------------------------------------------------

    def _execute(self, sql: str, params: dict[str, Any], fetch_all: bool = False) -> Any:
        """One autocommit statement on a pooled connection; lost connections are retried
        without limit, with DBOS's backoff (DBOS blocks the same way)."""
        backoff, attempt = 1.0, 0
        while True:
            try:
                return self._execute_once(sql, params, fetch_all)
            except Exception as exc:
                if not self._retriable(exc):
                    raise
                attempt += 1
                wait = backoff * (0.5 + random.random())
                log.warning("database connection failed: %s; retrying in %.2fs (attempt %d)",
                            exc, wait, attempt)
                time.sleep(wait)
                backoff = min(backoff * 2, _MAX_BACKOFF)

    def _execute_once(self, sql: str, params: dict[str, Any], fetch_all: bool) -> Any:
        try:
            fairy = self.engine.raw_connection()
        except psycopg.Error as exc:  # a new connection could not be made
            raise sa.exc.DBAPIError.instance(None, None, exc, psycopg.Error) from exc
        try:
            conn: psycopg.Connection[Any] = fairy.driver_connection  # type: ignore[assignment]
            conn.autocommit = True
            try:
                with conn.cursor() as cur:
                    cur.execute(sql, params)
                    row = cur.fetchall() if fetch_all else cur.fetchone()
            finally:
                if not conn.closed:
                    conn.autocommit = False
        except psycopg.Error as exc:
            # Classified as SQLAlchemy classifies it for DBOS's own statements, so a lost
            # connection is retried (or not) exactly where DBOS would retry it.
            lost = self.engine.dialect.is_disconnect(exc, fairy, None)  # type: ignore[arg-type]
            if lost:
                # As SQLAlchemy does for DBOS's statements: every connection of the pool
                # made before now is replaced at its next checkout, this one at once.
                self.engine.pool._invalidate(fairy, exc)
            raise sa.exc.DBAPIError.instance(
                sql, params, exc, psycopg.Error, connection_invalidated=lost,
            ) from exc
        finally:
            fairy.close()
        return row

    def _retriable(self, exc: Exception) -> bool:
        if isinstance(exc, sa.exc.TimeoutError):
            return bool(getattr(self.sys_db, "_retry_connection_errors", True))
        return retriable_postgres_exception(exc) and getattr(
            self.sys_db, "_retry_connection_errors", True)

    def must_check(self, step: DBOSContext) -> bool:
        """False when this execution cannot find the step recorded: its number is above
        everything recorded for the workflow when this execution first checked a step.

        An execution is the workflow's owner token (``owner_xid``: a new one for every
        start, recovery and resume), so a replay or a recovery checks every step up to
        where the history it continues stopped. A row written at a higher number by
        anyone else since can only come from an execution that took the workflow over,
        and the record statement refuses to write for one that lost it.
        """
        if step.owner_xid is None:
            return True
        frontier = self.frontiers.get((step.workflow_id, step.owner_xid))
        return frontier is None or step.function_id <= frontier

    def check(self, step: DBOSContext, name: str) -> tuple[Any, Any, Any] | None:
        """The step's recorded (output, error, serialization), or None to run it."""
        row = self._execute(self.check_sql, {"wf": step.workflow_id, "fid": step.function_id})
        assert row is not None, f"workflow {step.workflow_id} does not exist"
        status, recorded_name, output, error, serialization, recorded_max = row
        if step.owner_xid is not None:
            key = (step.workflow_id, step.owner_xid)
            if key not in self.frontiers:
                self.frontiers[key] = int(recorded_max or 0)
                while len(self.frontiers) > _FRONTIERS:
                    self.frontiers.popitem(last=False)
        if status == _CANCELLED:
            raise DBOSWorkflowCancelledError(
                f"Workflow {step.workflow_id} is cancelled. Aborting function."
            )
        if recorded_name is None:
            return None
        if recorded_name != name:
            raise DBOSUnexpectedStepError(step.workflow_id, step.function_id, name, recorded_name)
        return output, error, serialization

    def replay(self, recorded: tuple[Any, Any, Any]) -> Any:
        output, error, serialization = recorded
        if error is not None:
            raise deserialize_exception(error, serialization, self.serializer)
        if output is None:
            raise DurapipeError("a recorded step has neither an output nor an error")
        return deserialize_value(output, serialization, self.serializer)

    def record(self, step: DBOSContext, name: str, started: int,
               output: Any = None, error: Exception | None = None) -> None:
        """Write the step's outcome while this execution owns the workflow."""
        if error is not None:
            err, serialization = serialize_exception(error, None, self.serializer)
            out = None
        else:
            out, serialization = serialize_value(output, None, self.serializer)
            err = None
        self.write(step, name, started, out, err, serialization)

    def write(self, step: DBOSContext, name: str, started: int, output: str | None,
              error: str | None, serialization: str | None, child: str | None = None) -> None:
        """Write one serialized operation row. With ``child`` (the ``DBOS.getResult`` row of a
        child workflow's result) a row already there is this write retried, as DBOS has it."""
        completed = _now_ms()
        row = self._execute(self.record_sql, {
            "wf": step.workflow_id, "fid": step.function_id, "name": name,
            "started": started, "completed": completed, "output": output, "error": error,
            "ser": serialization, "app": self.app_name, "xid": step.owner_xid, "child": child,
        })
        owner, recorded_at = row if row is not None else (None, None)
        if step.owner_xid is not None and owner != step.owner_xid:
            raise DBOSWorkflowConflictIDError(step.workflow_id)
        if child is None and (recorded_at is None or int(recorded_at) != completed):
            raise DBOSStepNondeterminismError(step.workflow_id, step.function_id)


    def output(self, workflow_id: str, function_id: int) -> Any:
        """The recorded output of one step (None when there is no such row)."""
        row = self._execute(self.output_sql, {"wf": workflow_id, "fid": function_id})
        if row is None or row[0] is None:
            return None
        return deserialize_value(row[0], row[1], self.serializer)


def take_step(reservation: Any | None) -> DBOSContext | None:
    """The step context of the next step: at ``reservation``'s number (a
    ``DBOS.reserve_step()`` of a parallel branch) or, without one, at the running
    workflow's next number. None outside workflow code."""
    if reservation is not None:
        reservation._claim()
        reserved: DBOSContext = reservation._step_ctx
        return reserved
    ctx = get_local_dbos_context()
    if ctx is None or not ctx.is_workflow():
        return None
    return ctx.snapshot_step_ctx()


def give_back(step: DBOSContext) -> bool:
    """Undo :func:`take_step` of the running workflow's last number (nothing was started
    at it, and no other operation has taken a number since): the next operation gets it.
    False when that cannot be done."""
    ctx = get_local_dbos_context()
    if ctx is None or ctx.workflow_id != step.workflow_id or ctx.function_id != step.function_id:
        return False
    ctx.function_id -= 1
    return True


def _attributes(name: str) -> dict[str, Any]:
    return {"name": name, "operationType": "step"}


def _retry_wait(name: str, attempt: int, attempts: int, exc: BaseException) -> float:
    log.warning("step %s failed (attempt %d of %d); retrying: %s", name, attempt + 1, attempts, exc)
    return float(min(0.5 * (2.0 ** attempt), 3600.0))


def _exceeded(name: str, attempts: int, errors: list[Exception]) -> DBOSMaxStepRetriesExceeded:
    """DBOS's error for a step out of attempts; its recorded message also names the last
    error, so the step's row says why (DBOS's own row says only that retries ran out)."""
    exc = DBOSMaxStepRetriesExceeded(name, attempts, errors)
    exc.message = f"{exc.message}; last error: {error_text(errors[-1])}"
    return exc


def run_sync(steps: StepLog, step: DBOSContext, name: str, retries: int,
             body: Callable[[], T], retry_if: Callable[[BaseException], bool]) -> T:
    """Run a sync step body at ``step``'s number (on the calling thread)."""
    started = _now_ms()
    recorded = steps.check(step, name) if steps.must_check(step) else None
    if recorded is not None:
        return steps.replay(recorded)  # type: ignore[no-any-return]
    with EnterDBOSStepCtx(_attributes(name), step):  # type: ignore[arg-type]
        try:
            out = _attempts_sync(name, retries + 1, body, retry_if)
        except DBOSWorkflowCancelledError:
            raise
        except Exception as exc:
            steps.record(step, name, started, error=exc)
            raise
        steps.record(step, name, started, output=out)
    return out


def _attempts_sync(name: str, attempts: int, body: Callable[[], T],
                   retry_if: Callable[[BaseException], bool]) -> T:
    if attempts == 1:  # no retry context, as DBOS has it for a step without retries
        return body()
    errors: list[Exception] = []
    for i in range(attempts):
        try:
            with EnterDBOSStepRetry(i, attempts):
                return body()
        except DBOSWorkflowCancelledError:
            raise
        except Exception as exc:
            if not retry_if(exc):
                raise
            errors.append(exc)
            if i < attempts - 1:
                time.sleep(_retry_wait(name, i, attempts, exc))
    raise _exceeded(name, attempts, errors)


async def run_async(steps: StepLog, step: DBOSContext, name: str, retries: int,
                    body: Callable[[], Awaitable[T]],
                    retry_if: Callable[[BaseException], bool]) -> T:
    """Run an async step body at ``step``'s number on the loop; the two statements run on
    a worker thread."""
    started = _now_ms()
    recorded = await bounds.to_thread(steps.check, step, name) if steps.must_check(step) else None
    if recorded is not None:
        return steps.replay(recorded)  # type: ignore[no-any-return]
    with EnterDBOSStepCtx(_attributes(name), step):  # type: ignore[arg-type]
        try:
            out = await _attempts_async(name, retries + 1, body, retry_if)
        except DBOSWorkflowCancelledError:
            raise
        except Exception as exc:
            await bounds.to_thread(steps.record, step, name, started, None, exc)
            raise
        await bounds.to_thread(steps.record, step, name, started, out)
    return out


async def _attempts_async(name: str, attempts: int, body: Callable[[], Awaitable[T]],
                          retry_if: Callable[[BaseException], bool]) -> T:
    if attempts == 1:  # no retry context, as DBOS has it for a step without retries
        return await body()
    errors: list[Exception] = []
    for i in range(attempts):
        try:
            with EnterDBOSStepRetry(i, attempts):
                return await body()
        except DBOSWorkflowCancelledError:
            raise
        except Exception as exc:
            if not retry_if(exc):
                raise
            errors.append(exc)
            if i < attempts - 1:
                await asyncio.sleep(_retry_wait(name, i, attempts, exc))
    raise _exceeded(name, attempts, errors)
