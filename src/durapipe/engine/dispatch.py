"""dispatch / join: background tasks as durable child workflows, and their progress.

A dispatched task runs in its own DBOS workflow ``durapipe.task`` with the stable id
``<run id>/<task path>:<task name>``, started directly (``DBOS.start_workflow_async``) or
enqueued on a DBOS queue when the dispatch has ``queue=`` or ``max_tasks=``. The
dispatching workflow keeps a table of its pending tasks (``RunContext.tasks``); a replay
rebuilds it, because dispatch re-runs and finds its child starts recorded.

Audit contract (no write of its own on the common path): the task workflow's status row
carries the attribute ``{"durapipe.task": <task name>}`` (set in the same insert that
starts it; its input carries the path), and the dispatching workflow records its start as
a child operation. The join is the dispatching workflow's ``DBOS.getResult`` row naming
the child (``child_workflow_id``): without one a task is ``running``; with one it is
``joined``, or ``failed`` when the row holds an error. The two fates that cannot be read
from those rows are written as the event ``task:<child workflow id>`` =
``{"status": "timed_out" | "auto_joined", "at": epoch ms}`` of the dispatching workflow,
only when they happen. :func:`task_status` is the rule; the ``background_tasks`` view and
``durapipe show`` apply it.

Progress: a task publishes with :func:`progress` (from a fn, an agent's model step, or
workflow code of the task); the value is the DBOS event ``durapipe.progress`` of the task
workflow (its history is in ``workflow_events_history``). The dispatching sequence reads
it before each later node with ``DBOS.get_event_async``, which is checkpointed, so a
replay sees the value the first execution saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from dbos import DBOS, SetEnqueueOptions, SetWorkflowAttributes, SetWorkflowID, WorkflowSerializationFormat
from dbos._context import get_local_dbos_context, snapshot_step_context
from dbos._core import set_event as _dbos_set_event
from dbos._dbos import _get_dbos_instance
from dbos._error import DBOSAwaitedWorkflowCancelledError, DBOSWorkflowCancelledError

from ..errors import BudgetExceeded, DurapipeError, NodeFailed, RunError, error_text, from_portable
from ..ir import Dispatch, Join
from ..state import State, check_updates
from . import admission, bounds, events, lifecycle
from .children import await_child
from .context import RunContext, run_step
from .handoff import Handoff
from .scope import TASK_WORKFLOW

PROGRESS_EVENT = "durapipe.progress"
QUEUE_POLL_SEC = 0.1


TASK_ATTRIBUTE = "durapipe.task"  # workflow attribute of a task workflow: its task name
DETACHED_ATTRIBUTE = "durapipe.detached"  # "true" on the task workflow of dispatch(detach=True)
FATE_PREFIX = "task:"
RARE_FATES = ("timed_out", "auto_joined", "cancelled")


def fate_key(child_id: str) -> str:
    """The event of the dispatching workflow recording a task's timed_out/auto_joined fate."""
    return f"{FATE_PREFIX}{child_id}"


def task_status(joined: bool, join_failed: bool, fate: Any, detached: bool = False) -> str:
    """A task's status from what was recorded: its join row (if any) and its fate event."""
    if detached:
        return "detached"
    if isinstance(fate, dict) and fate.get("status") in RARE_FATES:
        return str(fate["status"])
    if not joined:
        return "running"
    return "failed" if join_failed else "joined"


def find_task(run_id: str, name: str) -> str | None:
    """The workflow id of the latest task ``name`` dispatched in run ``run_id`` (or None)."""
    sys_db = _get_dbos_instance()._sys_db
    return find_task_in(run_id, name, DBOS.list_workflows(**task_query(run_id, name, sys_db)))


async def find_task_async(run_id: str, name: str) -> str | None:
    sys_db = _get_dbos_instance()._sys_db
    found = await DBOS.list_workflows_async(**task_query(run_id, name, sys_db))
    return find_task_in(run_id, name, found)


def _not_started(run_id: str, name: str) -> RunError:
    return RunError(f"run {run_id!r} has not started a background task named {name!r} (yet); "
                    "nothing was cancelled", run_id=run_id, task=name)


def cancel_task(run_id: str, name: str) -> str:
    """Cancel the latest task ``name`` of a run with its child workflows; its workflow id."""
    child = find_task(run_id, name)
    if child is None:
        raise _not_started(run_id, name)
    DBOS.cancel_workflow(child, cancel_children=True)
    return child


async def cancel_task_async(run_id: str, name: str) -> str:
    child = await find_task_async(run_id, name)
    if child is None:
        raise _not_started(run_id, name)
    await DBOS.cancel_workflow_async(child, cancel_children=True)
    return child


def task_query(run_id: str, name: str, sys_db: Any) -> dict[str, Any]:
    """``list_workflows`` arguments that find the task workflows of a run named ``name``."""
    query: dict[str, Any] = {"workflow_id_prefix": f"{run_id}/", "name": TASK_WORKFLOW,
                             "sort_desc": True, "load_input": False, "load_output": False}
    if sys_db.engine.dialect.name == "postgresql":
        query["attributes"] = {TASK_ATTRIBUTE: name}  # DBOS filters attributes on Postgres only
    return query


def find_task_in(run_id: str, name: str, found: list[Any]) -> str | None:
    """The id of the latest task ``name`` of run ``run_id`` among ``found``."""
    # Task ids are "<run id>/<path>:<name>" and a path has no ":"; the prefix is a LIKE
    # pattern, so the start is checked too.
    prefix = f"{run_id}/"
    for st in found:
        wid = str(st.workflow_id)
        if wid.startswith(prefix) and wid[len(prefix):].partition(":")[2] == name:
            return wid
    return None


@dataclass
class Task:
    """A background task started by a dispatch and not joined yet."""

    name: str
    path: str
    child_id: str
    node: Dispatch
    scope: str  # path of the sequence holding the dispatch: its later nodes see progress
    handle: Any = None  # DBOS handle of a task started here: a join is woken when it ends


# -- progress -------------------------------------------------------------------------------

def _progress_value(value: Any) -> Any:
    return check_updates({"progress": value}, "durapipe.progress()")["progress"]


def progress(value: Any) -> None:
    """Publish the latest partial result of the background task this code runs in.

    Call it from a ``fn`` (sync or async) or from a model step of a dispatched task; the
    dispatch's ``progress_key`` then shows the value to later nodes of the main pipeline,
    and ``RunHandle.progress(name)`` reads it live. The value must be JSON.

    >>> def optimize(state):
    ...     for i, chunk in enumerate(chunks):
    ...         durapipe.progress({"done": i + 1, "of": len(chunks)})
    """
    value = _progress_value(value)
    ctx = get_local_dbos_context()
    if ctx is None or not (ctx.is_workflow() or ctx.is_step()):
        raise DurapipeError(
            "durapipe.progress() was called outside a running pipeline; call it from a fn or "
            "agent step of a dispatched task"
        )
    # DBOS's public set_event refuses to run on a thread with an event loop; an async fn
    # runs on the workflow's loop, so the (short) event write is made directly.
    _dbos_set_event(_get_dbos_instance(), snapshot_step_context(), PROGRESS_EVENT, value,
                    serialization_type=WorkflowSerializationFormat.DEFAULT)
    _progress_event(value)


async def progress_async(value: Any) -> None:
    """:func:`progress` for async code that should not block its event loop (e.g. streaming)."""
    value = _progress_value(value)
    if get_local_dbos_context() is None:
        raise DurapipeError("durapipe.progress_async() was called outside a running pipeline")
    await DBOS.set_event_async(PROGRESS_EVENT, value)
    _progress_event(value)


def _progress_event(value: Any) -> None:
    """The progress value on the run's stream too (at least once: it comes from a step)."""
    workflow = DBOS.workflow_id or ""
    path, _, name = workflow.rpartition("/")[2].partition(":")
    events.emit("task_progress", path=path or None, name=name or None, kind="task",
                data={"value": value})


async def read_progress(child_id: str) -> Any:
    """The latest progress value of a task workflow, checkpointed when read in a workflow."""
    return await DBOS.get_event_async(child_id, PROGRESS_EVENT, timeout_seconds=0)


def _progress_updates(tasks: list[Task], values: list[Any], state: State) -> State:
    """A one-task dispatch shows its task's value; a larger one ``{task name: value}``."""
    out: State = {}
    for task, value in zip(tasks, values, strict=True):
        key = task.node.progress_key
        if not key:
            continue
        if len(task.node.names) == 1:
            out[key] = value
        else:
            current = out.get(key, state.get(key))
            out[key] = {**(current if isinstance(current, dict) else {}), task.name: value}
    return out


async def refresh_progress(ctx: RunContext, seq_path: str, state: State) -> State:
    tasks = [t for t in ctx.tasks.values() if t.node.progress_key and t.scope == seq_path]
    values = [await read_progress(t.child_id) for t in tasks]
    return _progress_updates(tasks, values, state)


# -- the task workflow ----------------------------------------------------------------------

def parent_path(path: str) -> str:
    return path.rsplit(".", 1)[0]


# -- dispatch -------------------------------------------------------------------------------

# (database, queue name) -> partitioned: queues this process registered already.
_queues_ready: dict[tuple[str, str], bool] = {}


def queue_name(app_name: str, node: Dispatch, width: int) -> str | None:
    """The DBOS queue a dispatch enqueues its tasks on; None when it starts them directly.

    A dispatch of more than ``width`` tasks (the process's default bound, see
    :mod:`.bounds`) without ``max_tasks=`` runs at most ``width`` of them at once.
    """
    if node.queue is None and _max_tasks(node, width) is None:
        return None
    return node.queue or f"durapipe-{app_name}-max{_max_tasks(node, width)}"


def _max_tasks(node: Dispatch, width: int) -> int | None:
    if node.max_tasks is not None or node.queue is not None:
        return node.max_tasks
    return width if len(node.names) > width else None


async def _queue_for(ctx: RunContext, node: Dispatch) -> tuple[str, bool] | None:
    """The queue a dispatch enqueues on, registered if needed, and whether it is partitioned.

    ``max_tasks`` is per dispatch instance: the queue has that partition concurrency and
    each dispatch instance enqueues on a partition of its own. A queue registered before
    (by the user, or another dispatch) keeps its settings.
    """
    width = bounds.limit()
    name = queue_name(ctx.app.dbos_name, node, width)
    if name is None:
        return None
    key = (ctx.app.database_url, name)
    if key not in _queues_ready:
        queue = await DBOS.register_queue_async(
            name, partition_concurrency=_max_tasks(node, width), polling_interval_sec=QUEUE_POLL_SEC,
            on_conflict="never_update",
        )
        _queues_ready[key] = any(
            getattr(queue, a, None) is not None
            for a in ("_partition_concurrency", "_partition_worker_concurrency",
                      "_partition_limiter")
        )
    return name, _queues_ready[key]


async def _record_fate(task: Task, status: str) -> None:
    await DBOS.set_event_async(fate_key(task.child_id), {
        "status": status, "at": int(time.time() * 1000)})


async def run_dispatch(ctx: RunContext, node: Dispatch, path: str, state: State) -> State:
    for name in node.names:
        if name in ctx.tasks:
            raise RunError(
                f"dispatch {path}: background task {name!r} from {ctx.tasks[name].path} is still "
                "pending; join it before dispatching a task of the same name again (e.g. "
                "inside the loop body)", node=path, task=name,
            )
    queue = await _queue_for(ctx, node)
    # On a per-tenant queue (App.queue(per_tenant=)) a task is in its run's tenant's partition.
    tenant = await admission.task_partition(ctx.app, queue[0], ctx.root) if queue else None
    handoff = Handoff(path, state)
    for i, name in enumerate(node.names):
        tpath = f"{path}.{i}"
        task = Task(name, tpath, f"{ctx.root}/{tpath}:{name}", node, parent_path(path))
        inputs = await handoff.input(node.tasks[i])
        args = (ctx.pipeline.name, ctx.pipeline.version, inputs, tpath, ctx.root, name)
        propagate = ctx.tracer.propagate() if ctx.tracer is not None else contextlib.nullcontext()
        attributes = {TASK_ATTRIBUTE: name, **({DETACHED_ATTRIBUTE: "true"} if node.detach else {})}
        with SetWorkflowID(task.child_id), SetWorkflowAttributes(attributes), propagate:
            if queue is None:
                task.handle = await DBOS.start_workflow_async(ctx.table.task, *args)
            else:
                qname, partitioned = queue
                part = (tenant or f"{ctx.root}/{path}") if partitioned else None
                with SetEnqueueOptions(queue_partition_key=part):
                    task.handle = await DBOS.enqueue_workflow_async(qname, ctx.table.task, *args)
        if not node.detach:  # a detached task is never joined, not even at the run's end
            ctx.tasks[name] = task
        events.emit("task_dispatched", path=tpath, name=name, kind="task",
                    key=f"dispatched:{tpath}",
                    data={"workflow_id": task.child_id, "detached": node.detach})
    if not node.progress_key:
        return {}
    return {node.progress_key: None if len(node.names) == 1 else dict.fromkeys(node.names)}


# -- join -----------------------------------------------------------------------------------

async def join_tasks(
    ctx: RunContext, tasks: list[Task], path: str, timeout: float | None, status: str,
    state: State,
) -> State:
    """Wait for ``tasks``; merge their writes in dispatch order; record each task's fate."""
    if not tasks:
        return {}
    timed_out: set[int] = set()
    if timeout is None:
        results = await asyncio.gather(*(await_child(t.handle or t.child_id) for t in tasks),
                                       return_exceptions=True)
    else:
        # The deadline is a recorded step: a restarted join waits only what is left.
        deadline: float = await run_step(f"{path}:deadline", 0, lambda: time.time() + timeout)
        # Futures are created before asyncio_wait runs; it takes its operation number first,
        # then they take theirs in list order: the numbering does not depend on timing.
        futures: list[Awaitable[Any]] = [
            asyncio.ensure_future(await_child(t.handle or t.child_id)) for t in tasks]
        done, _ = await DBOS.asyncio_wait(futures, timeout=max(0.0, deadline - time.time()))
        timed_out = {i for i, f in enumerate(futures) if f not in done}
        for i in sorted(timed_out):
            await DBOS.cancel_workflow_async(tasks[i].child_id, cancel_children=True)
            lifecycle.cancel_local(tasks[i].child_id)
        results = await asyncio.gather(*futures, return_exceptions=True)
    merged: State = {}
    failure: BaseException | None = None
    for i, (task, result) in enumerate(zip(tasks, results, strict=True)):
        del ctx.tasks[task.name]
        fate = ("timed_out" if i in timed_out else "failed" if isinstance(result, BaseException)
                else status)
        events.emit("task_joined", path=task.path, name=task.name, kind="task",
                    key=f"joined:{task.path}", data={"status": fate, "join": path})
        if i in timed_out:
            await _record_fate(task, "timed_out")
        elif isinstance(result, (DBOSAwaitedWorkflowCancelledError, DBOSWorkflowCancelledError)):
            # Cancelled by name (handle.cancel_task): its writes are dropped, the join goes on.
            await _record_fate(task, "cancelled")
        elif isinstance(result, BaseException):
            if task.node.on_error is None and failure is None:
                cause = from_portable(result)
                message = (f"join {path}: background task {task.name!r} ({task.child_id}) "
                           f"failed: {cause if isinstance(cause, DurapipeError) else error_text(cause)}")
                if isinstance(cause, BudgetExceeded):  # the run's budget, used by a task
                    failure = BudgetExceeded(message, **{**cause.data, "task": task.name,
                                                         "child": task.child_id})
                else:
                    failure = NodeFailed(message, node=f"{task.path}:{task.name}", task=task.name,
                                         child=task.child_id, cause=error_text(cause))
        else:
            merged.update(result or {})
            if status != "joined":
                await _record_fate(task, status)
    if failure is not None:
        raise failure
    with_progress = [t for t in tasks if t.node.progress_key]
    values = [await read_progress(t.child_id) for t in with_progress]
    return {**merged, **_progress_updates(with_progress, values, state)}


async def run_join(ctx: RunContext, node: Join, path: str, state: State) -> State:
    if node.names:
        missing = [n for n in node.names if n not in ctx.tasks]
        if missing:
            raise RunError(
                f"join {path}: no background task named {missing[0]!r} is pending here "
                f"(pending: {sorted(ctx.tasks)}); a task is joined once, in the workflow that "
                "dispatched it (a dispatch inside a parallel branch is joined in that branch)",
                node=path, task=missing[0],
            )
        tasks = [t for t in ctx.tasks.values() if t.name in node.names]
    else:
        tasks = list(ctx.tasks.values())
    return await join_tasks(ctx, tasks, f"{path}:join", node.timeout_seconds, "joined", state)


async def auto_join(ctx: RunContext, path: str, state: State) -> State:
    """A workflow that ends with tasks pending joins them: their writes are not lost."""
    if not ctx.tasks:
        return {}
    return await join_tasks(ctx, list(ctx.tasks.values()), f"{path}:end", None, "auto_joined",
                            state)
