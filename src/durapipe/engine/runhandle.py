"""A run's handle: its status, result, cancel and background-task progress.

``Pipeline.start`` (in :mod:`.runs`) returns one; ``App.get_run`` builds one for any run
of the app, also one started by an earlier process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dbos import DBOS

from ..errors import (
    DurapipeError,
    RunCancelled,
    RunError,
    RunTimeout,
    UnknownRun,
    UnknownTask,
    error_text,
    from_portable,
)
from ..ir import Dispatch
from ..state import State
from . import dispatch, lifecycle
from .handlestream import StreamMixin
from .scope import belongs_to, refuse

if TYPE_CHECKING:
    from .app import App

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


def _resumed_since(exc: BaseException, recorded: str | None) -> bool:
    """Did this process's execution of the run end cancelled while the run itself was
    resumed since (the database holds it queued or running again)? Then a handle waits for
    the resumed run instead of answering with the ended execution."""
    return ("Cancel" in type(exc).__name__ and not lifecycle.stopping()
            and recorded in (RunStatus.ENQUEUED.value, RunStatus.PENDING.value))


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
            recorded = self._recorded()
            if self._handle is not None and _resumed_since(exc, recorded[0]):
                self._handle = None  # this process's execution ended; the run goes on
                return self.result(timeout)
            _raise_run_error(self.run_id, exc, *recorded)
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
            recorded = await asyncio.to_thread(self._recorded)
            if self._async_handle is not None and _resumed_since(exc, recorded[0]):
                self._async_handle = None  # this process's execution ended; the run goes on
                return await self.result_async(timeout)
            _raise_run_error(self.run_id, exc, *recorded)
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
