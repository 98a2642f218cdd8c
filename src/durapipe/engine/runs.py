"""Registered pipelines, runs and their handles.

>>> handle = publish.start({"topic": "x"}, run_id="post-42")   # returns at once
>>> handle.status(), handle.result(timeout=60).state
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dbos import DBOS, SetWorkflowID, SetWorkflowTimeout

from ..errors import (
    AppStateError,
    BuildError,
    DurapipeError,
    RunCancelled,
    RunError,
    RunTimeout,
    StateError,
    UnknownRun,
    UnknownTask,
    error_text,
    from_portable,
)
from ..ir import Dispatch, Node
from ..state import State, check_inputs
from . import admission, dispatch, lifecycle
from .ask import AskMixin
from .handlestream import StreamMixin
from .interpreter import run_workflow
from .scope import belongs_to, check_run_id, is_run_workflow, refuse

if TYPE_CHECKING:
    from .app import App

_INSTANCE_RE = re.compile(r"#\d+")
_UNREADABLE = "UNREADABLE"

class RunStatus(str, enum.Enum):
    """Where a run is. Mirrors DBOS's workflow status."""

    ENQUEUED = "ENQUEUED"
    DELAYED = "DELAYED"
    PENDING = "PENDING"
    SUCCESS = "SUCCESS"
    ERROR = "ERROR"
    CANCELLED = "CANCELLED"
    MAX_RECOVERY_ATTEMPTS_EXCEEDED = "MAX_RECOVERY_ATTEMPTS_EXCEEDED"

    @property
    def finished(self) -> bool:
        return self in (RunStatus.SUCCESS, RunStatus.ERROR, RunStatus.CANCELLED,
                        RunStatus.MAX_RECOVERY_ATTEMPTS_EXCEEDED)


@dataclass(frozen=True)
class RunResult:
    run_id: str
    status: RunStatus
    state: State


@dataclass(frozen=True)
class Registered:
    """A pipeline registered in an App: name, IR, shape version and the inputs it needs."""

    name: str
    node: Node
    version: str
    inputs: frozenset[str]
    declared_inputs: bool
    nodes: dict[str, Node] = field(repr=False, compare=False)

    def node_at(self, path: str) -> Node:
        """The node at a path; instance marks (``#3`` for a loop pass or map item) are ignored."""
        try:
            return self.nodes[_INSTANCE_RE.sub("", path)]
        except KeyError:
            raise BuildError(f"pipeline {self.name!r} has no node at path {path!r}") from None


class Pipeline(AskMixin):
    """A pipeline registered in an App. Start runs with :meth:`run` or :meth:`start`."""

    def __init__(self, app: App, registered: Registered) -> None:
        self.app = app
        self.name = registered.name
        self.version = registered.version
        self.node = registered.node
        self._reg = registered
        # Registered with DBOS now (before launch): runs are ``durapipe.run:<name>``.
        self._workflow = run_workflow(registered.name)

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, version={self.version!r})"

    def mermaid(self, statuses: dict[str, str] | None = None) -> str:
        """The pipeline as a Mermaid flowchart (see :mod:`durapipe.diagram`)."""
        from ..diagram import mermaid

        return mermaid(self.node, statuses, title=self.name)

    def _inputs(self, inputs: Any) -> State:
        state = check_inputs(inputs, self.name)
        missing = sorted(k for k in self._reg.inputs if k not in state)
        if missing:
            raise StateError(
                f"pipeline {self.name!r} needs input {missing[0]!r} (needed: "
                f"{sorted(self._reg.inputs)}, given: {sorted(state)})",
                pipeline=self.name, key=missing[0],
            )
        return state

    def _run_id(self, run_id: Any, what: str) -> str | None:
        if run_id is None:
            return None
        return check_run_id(run_id, f"pipeline {self.name!r}.{what}", new=True)

    def _check_existing(self, run_id: str, status: Any) -> None:
        if status is None:
            return
        if not belongs_to(self.app.dbos_name, status):
            raise UnknownRun(
                f"pipeline {self.name!r}: run id {run_id!r} is taken by a workflow that is not "
                f"one of app {self.app.name!r}'s; choose another run id", run_id=run_id)
        args = (status.input or {}).get("args") if isinstance(status.input, dict) else None
        recorded = args[0] if args else None
        if not is_run_workflow(status.name) or (recorded is not None and recorded != self.name):
            raise DurapipeError(
                f"run id {run_id!r} is already used by another workflow "
                f"({status.name} {recorded or ''}); choose another run id",
                run_id=run_id,
            )

    def _admission(self, what: str, opts: dict[str, Any]) -> admission.Admission:
        return admission.Admission.of(f"pipeline {self.name!r}.{what}", self.name,
                                      default_max_tokens=self.app.max_tokens, **opts)

    def start(self, inputs: Any = None, *, run_id: str | None = None,
              timeout: float | None = None, tenant: str | None = None,
              priority: int | None = None, dedup_key: str | None = None,
              delay: float | None = None, max_tokens: int | None = None) -> RunHandle:
        """Start a run and return at once. Starting an existing ``run_id`` returns that run.

        ``timeout`` (seconds) is a durable deadline for the whole run, kept across
        restarts: past it the run is cancelled, with its child workflows and background
        tasks, and its result raises :class:`~durapipe.errors.RunTimeout`.
        ``tenant``, ``priority`` (lowest first), ``dedup_key`` (an unfinished run started
        with it is returned instead), ``delay`` (seconds) and ``max_tokens`` (the run's
        token budget): see :mod:`durapipe.engine.admission`.
        """
        self.app._require_launched(f"pipeline {self.name!r}.start")
        run_id = self._run_id(run_id, "start")
        state = self._inputs(inputs)
        deadline = self._deadline(timeout)
        adm = self._admission("start", dict(tenant=tenant, priority=priority, dedup_key=dedup_key,
                                            delay=delay, max_tokens=max_tokens))
        if run_id is not None:
            self._check_existing(run_id, DBOS.get_workflow_status(run_id))
        workflow_id = run_id or str(uuid.uuid4())
        with admission.dedup_lock(self.app, adm):
            found = admission.active_run(self.app, adm)
            if found is not None:
                return RunHandle(self.app, found)
            if adm.queued:
                with SetWorkflowID(workflow_id), deadline, adm.options(queued=True):
                    handle = DBOS.enqueue_workflow(admission.start_queue(self.app.dbos_name),
                                                   self._workflow, self.name, self.version, state)
                return RunHandle(self.app, handle.workflow_id)
            submit = _loop_submit()
            if submit is None:
                with SetWorkflowID(workflow_id), deadline, adm.options():
                    handle = DBOS.start_workflow(self._workflow, self.name, self.version, state)
                return RunHandle(self.app, handle.workflow_id, handle)

            async def start() -> _Started:
                with SetWorkflowID(workflow_id), deadline, adm.options():
                    started = await DBOS.start_workflow_async(self._workflow, self.name,
                                                              self.version, state)
                return _Started(started.workflow_id, _future_of(getattr(started, "task", None)))
            return RunHandle(self.app, workflow_id, submit(start()))

    def _deadline(self, timeout: float | None) -> Any:
        if timeout is None:
            return contextlib.nullcontext()
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise DurapipeError(
                f"pipeline {self.name!r}: timeout={timeout!r} must be a number of seconds > 0 "
                "(the run's deadline), or None for no deadline", pipeline=self.name,
            )
        return SetWorkflowTimeout(float(timeout))

    async def start_async(self, inputs: Any = None, *, run_id: str | None = None,
                          timeout: float | None = None, tenant: str | None = None,
                          priority: int | None = None, dedup_key: str | None = None,
                          delay: float | None = None, max_tokens: int | None = None) -> RunHandle:
        self.app._require_launched(f"pipeline {self.name!r}.start_async")
        run_id = self._run_id(run_id, "start_async")
        state = self._inputs(inputs)
        deadline = self._deadline(timeout)
        adm = self._admission("start_async", dict(
            tenant=tenant, priority=priority, dedup_key=dedup_key, delay=delay,
            max_tokens=max_tokens))
        if run_id is not None:
            self._check_existing(run_id, await DBOS.get_workflow_status_async(run_id))
        async with admission.dedup_lock_async(self.app, adm):
            found = await asyncio.to_thread(admission.active_run, self.app, adm)
            if found is not None:
                return RunHandle(self.app, found)
            with SetWorkflowID(run_id or str(uuid.uuid4())), deadline, adm.options(queued=adm.queued):
                if adm.queued:
                    handle = await DBOS.enqueue_workflow_async(
                        admission.start_queue(self.app.dbos_name), self._workflow, self.name,
                        self.version, state)
                    return RunHandle(self.app, handle.workflow_id)
                handle = await DBOS.start_workflow_async(self._workflow, self.name, self.version, state)
        return RunHandle(self.app, handle.workflow_id, async_handle=handle)

    def run(self, inputs: Any = None, *, run_id: str | None = None,
            timeout: float | None = None, **admit: Any) -> RunResult:
        """Run to the end and return the result; a failed run raises its error.

        ``timeout`` is the run's durable deadline (see :meth:`start`): past it the run is
        cancelled and this raises ``RunTimeout`` (a ``TimeoutError``); ``admit``: the
        other options of :meth:`start`.
        """
        return self.start(inputs, run_id=run_id, timeout=timeout, **admit).result(
            timeout=_wait_for(timeout))

    def schedule(self, cron: str, inputs: Any = None, *, name: str | None = None,
                 backfill: bool = True) -> str:
        """Start a run with ``inputs`` at every tick of ``cron`` (UTC; 6 fields: seconds
        first); return the schedule's name. Durable, once per tick across workers, missed
        ticks fired at the next launch with ``backfill`` (see :mod:`.schedules`)."""
        return self.app.schedule(self.name, cron, inputs, name=name, backfill=backfill)

    def enqueue(self, inputs: Any = None, *, queue: str, run_id: str | None = None,
                timeout: float | None = None, tenant: str | None = None,
                priority: int | None = None, dedup_key: str | None = None,
                delay: float | None = None, max_tokens: int | None = None) -> RunHandle:
        """Place a run on a queue declared with :meth:`App.queue`; any worker may run it.
        Options as for :meth:`start`; a queue with ``per_tenant`` limits needs ``tenant``."""
        self.app._require_launched(f"pipeline {self.name!r}.enqueue")
        if queue not in self.app._queues:
            raise AppStateError(
                f"pipeline {self.name!r}.enqueue: app {self.app.name!r} has no queue {queue!r} "
                f"(declared: {sorted(self.app._queues)}); declare it with app.queue({queue!r}) "
                "before launch", queue=queue,
            )
        run_id = self._run_id(run_id, "enqueue")
        state = self._inputs(inputs)
        deadline = self._deadline(timeout)  # counted from when a worker dequeues the run
        adm = self._admission("enqueue", dict(tenant=tenant, priority=priority, dedup_key=dedup_key,
                                              delay=delay, max_tokens=max_tokens))
        if run_id is not None:
            self._check_existing(run_id, DBOS.get_workflow_status(run_id))
        with admission.dedup_lock(self.app, adm):
            found = admission.active_run(self.app, adm)
            if found is not None:
                return RunHandle(self.app, found)
            with SetWorkflowID(run_id or str(uuid.uuid4())), deadline, \
                    adm.options(self.app._queues[queue], queued=True):
                handle = DBOS.enqueue_workflow(queue, self._workflow, self.name, self.version, state)
        return RunHandle(self.app, handle.workflow_id)

    def start_many(self, inputs: Iterable[Any], *, run_ids: Iterable[str | None] | None = None,
                   timeout: float | None = None) -> list[RunHandle]:
        """Start one run per inputs in one batch (see :meth:`App.batch`); one handle each.

        ``run_ids`` gives each run its id (None: generated); a repeated id, or the id of a
        run that exists already, gives that run's handle and starts nothing.
        """
        items = list(inputs)
        ids = [None] * len(items) if run_ids is None else list(run_ids)
        if len(ids) != len(items):
            raise DurapipeError(
                f"pipeline {self.name!r}.start_many: {len(items)} inputs but {len(ids)} run "
                "ids; give one run id per input (None for a generated one)", pipeline=self.name)
        batch = self.app.batch()
        for state, run_id in zip(items, ids, strict=True):
            batch.add(self, state, run_id=run_id, timeout=timeout)
        return batch.start()

    async def run_async(self, inputs: Any = None, *, run_id: str | None = None,
                        timeout: float | None = None, **admit: Any) -> RunResult:
        handle = await self.start_async(inputs, run_id=run_id, timeout=timeout, **admit)
        return await handle.result_async(timeout=_wait_for(timeout))


# How long run() waits past a run's deadline for the cancel to land (DBOS sweeps deadlines
# about once a second) before it gives up waiting with a plain TimeoutError.
DEADLINE_GRACE = 10.0


def _wait_for(timeout: float | None) -> float | None:
    return None if timeout is None else timeout + DEADLINE_GRACE


@dataclass
class _Started:
    """A run started from sync code: its id and a thread-safe future of its result."""

    workflow_id: str
    future: concurrent.futures.Future[Any] | None


def _loop_submit() -> Any:
    """DBOS's ``submit_coroutine`` of its background event loop, for starting a run from
    sync code as an asyncio task there rather than through DBOS's thread path.

    ``DBOS.start_workflow`` runs an async workflow on a pool thread that blocks on the loop;
    when DBOS stops, that thread records the cancelled run as ``ERROR CancelledError``. A
    run started as a task with ``start_workflow_async`` stays PENDING when cancelled, so a
    stopped process leaves it for recovery. Private to DBOS 3.4 (``_background_event_loop``);
    without it, or on a thread with a running loop, ``DBOS.start_workflow`` is used.
    """
    from dbos._dbos import _get_dbos_instance

    loop = getattr(_get_dbos_instance(), "_background_event_loop", None)
    submit = getattr(loop, "submit_coroutine", None)
    target = getattr(loop, "target_loop", None)
    if submit is None or target is None or target() is None:
        return None
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return submit
    return None


def _future_of(task: Any) -> concurrent.futures.Future[Any] | None:
    """A thread-safe future that follows an asyncio future (None when there is none)."""
    if not isinstance(task, asyncio.Future):
        return None
    out: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def done(t: asyncio.Future[Any]) -> None:
        if t.cancelled():
            out.cancel()
        elif t.exception() is not None:
            out.set_exception(t.exception())
        else:
            out.set_result(t.result())

    task.add_done_callback(done)
    return out


def _raise_run_error(run_id: str, exc: BaseException, recorded: str | None = None,
                     deadline_ms: int | None = None) -> None:
    if lifecycle.stopping() and recorded is not None and not RunStatus(recorded).finished:
        raise RunError(
            f"run {run_id!r} stopped here because the app is shutting down; it stays "
            f"{recorded} and the next launch with the same executor id (or `durapipe recover`) "
            "resumes it from its last recorded step", run_id=run_id, status=recorded,
        ) from exc
    if recorded == _UNREADABLE or (recorded is not None and not RunStatus(recorded).finished):
        # The run stopped in this process, but its end could not be recorded (typically the
        # database connection was lost): the database still holds it as unfinished.
        seen = ("its status cannot be read from the database now" if recorded == _UNREADABLE
                else f"the database still records it as {recorded}")
        raise RunError(
            f"run {run_id!r} stopped in this process ({error_text(exc)}), but {seen}: its end "
            "could not be written, so it stays PENDING. Nothing is lost; once the database is "
            "reachable, relaunch the app (`with app:` in a new App or process with the same "
            "executor id and version) to resume it from its last recorded step",
            run_id=run_id, status=recorded,
        ) from exc
    exc = from_portable(exc)
    if isinstance(exc, DurapipeError):
        raise exc
    name = type(exc).__name__
    if "Cancelled" in name and deadline_ms is not None and time.time() * 1000 >= deadline_ms:
        raise RunTimeout(
            f"run {run_id!r} ran past its deadline and was cancelled, with its child "
            "workflows and background tasks", run_id=run_id, deadline_ms=deadline_ms,
        ) from exc
    if "Cancelled" in name:
        raise RunCancelled(f"run {run_id!r} was cancelled", run_id=run_id) from exc
    raise RunError(f"run {run_id!r} failed: {error_text(exc)}", run_id=run_id) from exc


class RunHandle(StreamMixin):
    """A run of a pipeline: its id, status, result and (with dispatch) progress."""

    def __init__(self, app: App, run_id: str, handle: Any = None, async_handle: Any = None) -> None:
        self.app = app
        self.run_id = run_id
        self._handle = handle
        self._async_handle = async_handle

    def __repr__(self) -> str:
        return f"RunHandle({self.run_id!r})"

    def _own(self, st: Any) -> RunStatus:
        if st is None or not belongs_to(self.app.dbos_name, st):
            raise refuse(self.app.name, self.run_id)
        return RunStatus(st.status)

    def status(self) -> RunStatus:
        return self._own(DBOS.get_workflow_status(self.run_id))

    async def status_async(self) -> RunStatus:
        return self._own(await DBOS.get_workflow_status_async(self.run_id))

    def _recorded(self) -> tuple[str | None, int | None]:
        """The status the database holds (None for no row, ``_UNREADABLE`` when the read
        fails) and the run's deadline, if it has one."""
        try:
            st = DBOS.get_workflow_status(self.run_id)
        except Exception:
            return _UNREADABLE, None
        if st is None:
            return None, None
        return str(st.status), st.workflow_deadline_epoch_ms

    def _result(self, state: Any) -> RunResult:
        return RunResult(self.run_id, RunStatus.SUCCESS, state)

    def result(self, timeout: float | None = None) -> RunResult:
        """Wait for the run to finish; raise its error if it failed.

        ``timeout`` (seconds) bounds the wait with ``TimeoutError``; the run goes on.
        """
        future = getattr(self._handle, "future", None)
        try:
            if isinstance(future, concurrent.futures.Future):
                try:
                    return self._result(future.result(timeout=timeout))
                except concurrent.futures.TimeoutError:
                    raise TimeoutError(
                        f"run {self.run_id!r} did not finish within {timeout} s"
                    ) from None
            self._wait(timeout)
            return self._result(DBOS.retrieve_workflow(self.run_id).get_result(
                polling_interval_sec=0.05))
        except (TimeoutError, UnknownRun):
            raise
        except BaseException as exc:
            if not isinstance(exc, Exception) and "Cancel" not in type(exc).__name__:
                raise
            _raise_run_error(self.run_id, exc, *self._recorded())
            raise  # unreachable

    def _wait(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.01
        while True:
            if self.status().finished:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"run {self.run_id!r} did not finish within {timeout} s")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    async def result_async(self, timeout: float | None = None) -> RunResult:
        try:
            if self._async_handle is not None:
                coro = self._async_handle.get_result(polling_interval_sec=0.05)
            else:
                await self.status_async()  # one of this app's runs
                coro = DBOS.get_result_async(self.run_id)
            return self._result(await asyncio.wait_for(coro, timeout))
        except asyncio.TimeoutError:
            raise TimeoutError(f"run {self.run_id!r} did not finish within {timeout} s") from None
        except UnknownRun:
            raise
        except BaseException as exc:
            if not isinstance(exc, Exception) and "Cancel" not in type(exc).__name__:
                raise
            _raise_run_error(self.run_id, exc, *await asyncio.to_thread(self._recorded))
            raise

    def cancel(self) -> None:
        """Cancel the run now, with its child workflows and background tasks.

        Each is recorded CANCELLED; an async step in flight here gets ``CancelledError`` at
        its next await, a sync step finishes but nothing after it starts. Runs executing in
        another process stop within a fraction of a second (each process watches for
        cancels of the runs it executes). Cancelling a finished run changes nothing.
        """
        self.status()  # one of this app's runs
        DBOS.cancel_workflow(self.run_id, cancel_children=True)
        lifecycle.cancel_local(self.run_id)

    async def cancel_async(self) -> None:
        await self.status_async()  # one of this app's runs
        await DBOS.cancel_workflow_async(self.run_id, cancel_children=True)
        lifecycle.cancel_local(self.run_id)

    def cancel_task(self, name: str) -> None:
        """Cancel the background task ``name`` of this run (a detached one too) and its child
        workflows; the run itself goes on. A join waiting for it drops its writes and records
        it ``cancelled``. Raises ``UnknownTask`` when no dispatch starts such a task and
        ``RunError`` when this run has not started it (yet)."""
        self._check_task(name)
        self.status()  # one of this app's runs
        lifecycle.cancel_local(dispatch.cancel_task(self.run_id, name))

    async def cancel_task_async(self, name: str) -> None:
        self._check_task(name)
        await self.status_async()
        lifecycle.cancel_local(await dispatch.cancel_task_async(self.run_id, name))

    def _check_task(self, name: str) -> None:
        names = {n for reg in self.app.pipelines.values() for _, node in reg.node.walk()
                 if isinstance(node, Dispatch) for n in node.names}
        if name not in names:
            raise UnknownTask(
                f"run {self.run_id!r}: no dispatch of app {self.app.name!r} starts a task named "
                f"{name!r} (task names: {sorted(names)})", run_id=self.run_id, task=name,
            )

    def progress(self, name: str) -> Any:
        """The latest value background task ``name`` published with ``durapipe.progress``.

        ``None`` until the task is dispatched and publishes; read live, not checkpointed.
        """
        self._check_task(name)
        self.status()  # one of this app's runs
        child = dispatch.find_task(self.run_id, name)
        if child is None:
            return None
        return DBOS.get_event(child, dispatch.PROGRESS_EVENT, timeout_seconds=0)

    async def progress_async(self, name: str) -> Any:
        self._check_task(name)
        await self.status_async()
        child = await dispatch.find_task_async(self.run_id, name)
        if child is None:
            return None
        return await DBOS.get_event_async(child, dispatch.PROGRESS_EVENT, timeout_seconds=0)
