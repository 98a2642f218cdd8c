"""Registered pipelines, runs and their handles.

>>> handle = publish.start({"topic": "x"}, run_id="post-42")   # returns at once
>>> handle.status(), handle.result(timeout=60).state
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dbos import DBOS, SetWorkflowID

from ..errors import (
    AppStateError,
    BuildError,
    DurapipeError,
    RunCancelled,
    RunError,
    StateError,
    UnknownRun,
    UnknownTask,
    error_text,
    from_portable,
)
from ..ir import Dispatch, Node
from ..state import State, check_inputs
from . import dispatch
from .interpreter import WORKFLOW_NAME, run_pipeline
from .scope import belongs_to, check_run_id, refuse

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


class Pipeline:
    """A pipeline registered in an App. Start runs with :meth:`run` or :meth:`start`."""

    def __init__(self, app: App, registered: Registered) -> None:
        self.app = app
        self.name = registered.name
        self.version = registered.version
        self.node = registered.node
        self._reg = registered

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
        if status.name != WORKFLOW_NAME or (recorded is not None and recorded != self.name):
            raise DurapipeError(
                f"run id {run_id!r} is already used by another workflow "
                f"({status.name} {recorded or ''}); choose another run id",
                run_id=run_id,
            )

    def start(self, inputs: Any = None, *, run_id: str | None = None) -> RunHandle:
        """Start a run and return at once. Starting an existing ``run_id`` returns that run."""
        self.app._require_launched(f"pipeline {self.name!r}.start")
        run_id = self._run_id(run_id, "start")
        state = self._inputs(inputs)
        if run_id is not None:
            self._check_existing(run_id, DBOS.get_workflow_status(run_id))
        with SetWorkflowID(run_id or str(uuid.uuid4())):
            handle = DBOS.start_workflow(run_pipeline, self.name, self.version, state)
        return RunHandle(self.app, handle.workflow_id, handle)

    async def start_async(self, inputs: Any = None, *, run_id: str | None = None) -> RunHandle:
        self.app._require_launched(f"pipeline {self.name!r}.start_async")
        run_id = self._run_id(run_id, "start_async")
        state = self._inputs(inputs)
        if run_id is not None:
            self._check_existing(run_id, await DBOS.get_workflow_status_async(run_id))
        with SetWorkflowID(run_id or str(uuid.uuid4())):
            handle = await DBOS.start_workflow_async(run_pipeline, self.name, self.version, state)
        return RunHandle(self.app, handle.workflow_id, async_handle=handle)

    def run(self, inputs: Any = None, *, run_id: str | None = None,
            timeout: float | None = None) -> RunResult:
        """Run to the end and return the result; a failed run raises its error."""
        return self.start(inputs, run_id=run_id).result(timeout=timeout)

    def enqueue(self, inputs: Any = None, *, queue: str, run_id: str | None = None) -> RunHandle:
        """Place a run on a queue declared with :meth:`App.queue`; any worker may run it."""
        self.app._require_launched(f"pipeline {self.name!r}.enqueue")
        if queue not in self.app._queues:
            raise AppStateError(
                f"pipeline {self.name!r}.enqueue: app {self.app.name!r} has no queue {queue!r} "
                f"(declared: {sorted(self.app._queues)}); declare it with app.queue({queue!r}) "
                "before launch", queue=queue,
            )
        run_id = self._run_id(run_id, "enqueue")
        state = self._inputs(inputs)
        if run_id is not None:
            self._check_existing(run_id, DBOS.get_workflow_status(run_id))
        with SetWorkflowID(run_id or str(uuid.uuid4())):
            handle = DBOS.enqueue_workflow(queue, run_pipeline, self.name, self.version, state)
        return RunHandle(self.app, handle.workflow_id)

    async def run_async(self, inputs: Any = None, *, run_id: str | None = None,
                        timeout: float | None = None) -> RunResult:
        handle = await self.start_async(inputs, run_id=run_id)
        return await handle.result_async(timeout=timeout)


def _raise_run_error(run_id: str, exc: BaseException, recorded: str | None = None) -> None:
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
    if "Cancelled" in name:
        raise RunCancelled(f"run {run_id!r} was cancelled", run_id=run_id) from exc
    raise RunError(f"run {run_id!r} failed: {error_text(exc)}", run_id=run_id) from exc


class RunHandle:
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

    def _recorded_status(self) -> str | None:
        """The status the database holds; None for no row, ``_UNREADABLE`` when the read fails."""
        try:
            st = DBOS.get_workflow_status(self.run_id)
        except Exception:
            return _UNREADABLE
        return None if st is None else str(st.status)

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
            _raise_run_error(self.run_id, exc, self._recorded_status())
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
            _raise_run_error(self.run_id, exc, await asyncio.to_thread(self._recorded_status))
            raise

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
