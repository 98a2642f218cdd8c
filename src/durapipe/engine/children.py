"""Waiting for a child workflow's result, recorded as one ``DBOS.getResult`` operation.

DBOS's own ``get_result`` polls the database once a second. These waits are woken by the
child's in-process task when it runs here and poll every 50 ms otherwise, while keeping
the recorded operation (numbered at the call, naming the child) that replay and the audit
rely on. They use DBOS 3.4 internals (the step context snapshot and the system database's
recorded-result calls); they are kept to this module.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from dbos._context import snapshot_step_context
from dbos._dbos import _get_dbos_instance
from dbos._error import DBOSAwaitedWorkflowCancelledError, DBOSWorkflowCancelledError
from dbos._serialization import deserialize_exception, serialize_exception, serialize_value

from . import bounds
from .current import active_step_log

# How often a wait on a child workflow that runs elsewhere polls its status (DBOS's own
# get_result polls once a second).
RESULT_POLL_SEC = 0.05


def await_child(handle: Any) -> Awaitable[Any]:
    """The result of a child workflow, recorded as one ``DBOS.getResult`` operation.

    Like ``DBOS.get_result_async``, the operation takes its number when this is *called*
    (not when the child finishes), so a list of waits gathered in order is numbered the
    same on replay. A child running in this process wakes the wait directly; one running
    elsewhere (or recovered) is polled every ``RESULT_POLL_SEC``. The recorded row names
    the child (``child_workflow_id``, as a DBOS handle's ``get_result`` records it): the
    audit reads "this workflow joined that child" from it, with no write of its own.
    """
    workflow_id = handle if isinstance(handle, str) else handle.workflow_id
    task = getattr(handle, "task", None)
    step_ctx = snapshot_step_context(reserve_sleep_id=False)

    async def wait(sys_db: Any) -> Any:
        if task is None:
            return await sys_db.await_workflow_result_async(workflow_id, RESULT_POLL_SEC)
        if task.done() and not _cancelled(task):
            return task.result()  # finished in this process: nothing to read
        # The in-process task ends the wait at once; a slow poll (first after CANCEL_POLL_SEC,
        # so a short wait costs no read) still notices a child that was cancelled while it
        # sits in a long step or a recv.
        poll = asyncio.ensure_future(_poll_later(sys_db, workflow_id))
        try:
            await asyncio.wait({task, poll}, return_when=asyncio.FIRST_COMPLETED)
            if task.done() and not _cancelled(task):
                return task.result()
            return await poll
        finally:
            poll.cancel()

    # A live task means the child was started by this execution, so this later operation
    # cannot have been recorded before: the check for a recorded result is skipped (as a
    # DBOS handle's get_result does). A replay gets DBOS's polling handle, which has no task.
    return _recorded_get_result(workflow_id, wait, step_ctx, check=task is None)


CANCEL_POLL_SEC = 0.5


async def _poll_later(sys_db: Any, workflow_id: str) -> Any:
    await asyncio.sleep(CANCEL_POLL_SEC)
    return await sys_db.await_workflow_result_async(workflow_id, CANCEL_POLL_SEC)


GET_RESULT = "DBOS.getResult"


async def _recorded_get_result(
    workflow_id: str, wait: Callable[[Any], Awaitable[Any]], ctx: Any, check: bool
) -> Any:
    """``call_coroutine_as_step`` for a child's result, recorded with the child's id.

    On Postgres the check and the record are the two statements of :mod:`engine.steps`.
    """
    sys_db = _get_dbos_instance()._sys_db
    if not (ctx and ctx.is_workflow()):
        return await wait(sys_db)
    log = active_step_log()
    start_ms = int(time.time() * 1000)
    if check:
        if log is not None:
            found = await bounds.to_thread(log.check, ctx, GET_RESULT)
            if found is not None:
                return log.replay(found)
        else:
            recorded = await asyncio.to_thread(
                sys_db.check_operation_execution, ctx.workflow_id, ctx.function_id, GET_RESULT)
            if recorded is not None:
                return sys_db._replay_recorded(recorded, GET_RESULT)

    async def record(output: str | None, error: str | None, fmt: str | None) -> None:
        if log is not None:
            await bounds.to_thread(log.write, ctx, GET_RESULT, start_ms, output, error, fmt,
                                    workflow_id)
        else:
            await asyncio.to_thread(sys_db.record_get_result, workflow_id, output, error, fmt,
                                    ctx, started_at_epoch_ms=start_ms)

    try:
        result = await wait(sys_db)
    except Exception as exc:
        recorded_error = _portable_error(exc, sys_db.serializer)
        if recorded_error is not None:  # an unrecordable error is left for a replay to wait again
            await record(None, *recorded_error)
        raise
    output, fmt = serialize_value(result, None, sys_db.serializer)
    await record(output, None, fmt)
    return result


def _portable_error(exc: Exception, serializer: Any) -> tuple[str, str | None] | None:
    try:
        error, fmt = serialize_exception(exc, None, serializer)
        deserialize_exception(error, fmt, serializer)
    except Exception:
        return None
    return error, fmt


def _cancelled(task: Any) -> bool:
    exc = task.exception() if not task.cancelled() else None
    return task.cancelled() or isinstance(
        exc, (DBOSWorkflowCancelledError, DBOSAwaitedWorkflowCancelledError))
