"""App, registered pipelines and run handles: the public face of the engine.

>>> app = App("blog")                       # DURAPIPE_DATABASE_URL, or an embedded SQLite file
>>> publish = app.pipeline("publish", writer >> formatter)
>>> with app:
...     result = publish.run({"topic": "AI safety"})
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from dbos import DBOS, DBOSConfig, SetWorkflowID
from dbos._serialization import DBOSPortableJSONSerializer

from .. import validate
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
from ..ir import Dispatch, Node, as_node
from ..state import State, check_inputs
from . import dispatch, gates, interpreter
from .interpreter import WORKFLOW_NAME, run_pipeline
from .queues import QueueSpec, register_queues
from .tracing import Tracing

_NAME_RE = re.compile(r"^[a-z0-9_-]{3,256}$")
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


def _dbos_name(name: str) -> str:
    if not isinstance(name, str):
        raise AppStateError(f"App({name!r}): the app name must be a string, as App('blog')", app=repr(name))
    slug = re.sub(r"[^a-z0-9_-]", "-", name.lower())
    if not _NAME_RE.match(slug):
        raise AppStateError(
            f"App({name!r}): an app name needs 3 to 256 letters, digits, '-' or '_'", app=name
        )
    return slug


def _sqlite_url(name: str) -> str:
    return f"sqlite:///{name.replace('-', '_')}.sqlite"


def _normalize_url(url: str) -> str:
    # SQLAlchemy-style driver suffixes are accepted: DBOS wants the plain scheme.
    return re.sub(r"^postgresql\+\w+://", "postgresql://", url)


class App:
    """A durapipe application: a registry of pipelines plus one DBOS runtime.

    ``database_url`` (or ``DURAPIPE_DATABASE_URL``) names Postgres in production; without
    either, runs are recorded in an embedded SQLite file ``<name>.sqlite``. ``model``
    overrides every agent's model (a FakeModel for tests and demos). ``version`` is the
    application version DBOS records on every run; recovery picks up runs of the same
    version only. ``tracing=True`` emits OpenTelemetry spans per run and per node through
    the global TracerProvider (``tracing=provider`` for another one; needs the ``otel``
    extra; see :mod:`durapipe.engine.tracing`).
    """

    def __init__(
        self,
        name: str,
        database_url: str | None = None,
        *,
        model: Any = None,
        version: str = "1",
        executor_id: str | None = None,
        dbos_config: dict[str, Any] | None = None,
        tracing: Any = False,
    ) -> None:
        self.name = name
        self.dbos_name = _dbos_name(name)
        url = database_url or os.environ.get("DURAPIPE_DATABASE_URL") or _sqlite_url(self.dbos_name)
        self.database_url = _normalize_url(url)
        self.model = model
        self.version = version
        self.executor_id = executor_id
        self._extra_config = dict(dbos_config or {})
        self._pipelines: dict[str, Registered] = {}
        self._queues: dict[str, QueueSpec] = {}
        self._launched = False
        self._listen: list[str] | None = None
        self.tracing = Tracing(None if tracing is True else tracing) if tracing else None

    # -- registry -----------------------------------------------------------------------
    def pipeline(self, name: str, node: Any, inputs: list[str] | None = None) -> Pipeline:
        """Register ``node`` under ``name``; do it at import time, before the app launches."""
        if self._launched:
            raise AppStateError(
                f"app {self.name!r} is already launched: register pipeline {name!r} before "
                "`with app:` so that recovery after a crash can find it",
                app=self.name, pipeline=name,
            )
        if not isinstance(name, str) or not name:
            raise BuildError(f"app.pipeline({name!r}): the name must be a non-empty string")
        if inputs is not None and (
            not isinstance(inputs, (list, tuple))
            or not all(isinstance(k, str) and k for k in inputs)
        ):
            raise BuildError(
                f"app.pipeline({name!r}, inputs={inputs!r}): inputs must be a list of state "
                "key names, as inputs=['topic']", pipeline=name,
            )
        root = as_node(node, f"pipeline {name!r}")
        needed = validate.check(root, inputs)
        version = root.digest()
        old = self._pipelines.get(name)
        if old is not None and old.version != version:
            raise BuildError(
                f"app {self.name!r} already has a pipeline named {name!r} with another shape; "
                "give the new one its own name", pipeline=name,
            )
        reg = Registered(name, root, version, needed, inputs is not None,
                         {path: n for path, n in root.walk()})
        self._pipelines[name] = reg
        return Pipeline(self, reg)

    def registered(self, name: str) -> Registered:
        reg = self._pipelines.get(name)
        if reg is None:
            raise BuildError(
                f"app {self.name!r} has no pipeline named {name!r} (registered: "
                f"{sorted(self._pipelines)}); register it at import time of the module the "
                "worker runs", pipeline=name,
            )
        return reg

    @property
    def pipelines(self) -> dict[str, Registered]:
        return dict(self._pipelines)

    # -- lifecycle ----------------------------------------------------------------------
    def dbos_config(self) -> DBOSConfig:
        config: dict[str, Any] = {
            "name": self.dbos_name,
            "system_database_url": self.database_url,
            "application_version": f"durapipe-{self.dbos_name}-{self.version}",
            "serializer": DBOSPortableJSONSerializer(),
            "enable_otlp": False,
            "log_level": os.environ.get("DURAPIPE_LOG_LEVEL", "WARNING"),
            "notification_listener_polling_interval_sec": 0.1,
        }
        if self.executor_id:
            config["executor_id"] = self.executor_id
        if not self.database_url.startswith("sqlite"):
            # No "SELECT 1" before every checkout: two round trips less per step (one per
            # transaction). A connection that died is still caught: its transaction fails,
            # SQLAlchemy drops the pool and DBOS retries the operation on a new connection.
            config["db_engine_kwargs"] = {"pool_pre_ping": False}
        config.update(self._extra_config)
        return config  # type: ignore[return-value]

    def launch(self) -> None:
        """Start DBOS and recover this app's unfinished runs. Prefer ``with app:``."""
        if self._launched:
            return
        if self.database_url.startswith("sqlite"):
            _prepare_sqlite(self.database_url)
        interpreter.set_current_app(self)
        DBOS(config=self.dbos_config())
        try:
            if self._listen is not None:
                DBOS.listen_queues(self._listen)
            DBOS.launch()
        except Exception:
            interpreter.set_current_app(None)
            DBOS.destroy()
            raise
        self._launched = True
        register_queues(self._queues)

    def shutdown(self) -> None:
        if not self._launched:
            return
        self._launched = False
        DBOS.destroy()
        interpreter.set_current_app(None)

    def __enter__(self) -> App:
        self.launch()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    async def __aenter__(self) -> App:
        await asyncio.to_thread(self.launch)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await asyncio.to_thread(self.shutdown)

    def _require_launched(self, what: str) -> None:
        if not self._launched:
            raise AppStateError(
                f"{what}: app {self.name!r} is not launched; use `with app:` (or app.launch())",
                app=self.name,
            )

    # -- runs ---------------------------------------------------------------------------
    def get_run(self, run_id: str) -> RunHandle:
        """A handle for any run of this app, also one started by an earlier process."""
        self._require_launched("get_run")
        status = DBOS.get_workflow_status(run_id)
        self._check_run(run_id, status)
        return RunHandle(self, run_id)

    async def get_run_async(self, run_id: str) -> RunHandle:
        self._require_launched("get_run")
        status = await DBOS.get_workflow_status_async(run_id)
        self._check_run(run_id, status)
        return RunHandle(self, run_id)

    def listen_queues(self, *names: str) -> None:
        """Dequeue background work only from these DBOS queues (none: run no queued work).

        Call before launch; e.g. a web process that starts runs but leaves queued dispatch
        tasks to worker processes. Recovery of its own runs still happens.
        """
        if self._launched:
            raise AppStateError(f"app {self.name!r}: listen_queues() must be called before launch",
                                app=self.name)
        self._listen = list(names)

    def _check_run(self, run_id: str, status: Any, kinds: tuple[str, ...] = (WORKFLOW_NAME,)) -> None:
        if status is None or status.name not in kinds or (
            status.app_version and not status.app_version.startswith(f"durapipe-{self.dbos_name}-")
        ):
            raise UnknownRun(f"app {self.name!r} has no run with id {run_id!r}", run_id=run_id)

    # -- gates --------------------------------------------------------------------------
    def approve(self, run_id: str, gate: str, *, by: str, comment: str | None = None) -> None:
        """Approve the gate ``gate`` a run is waiting at. An answer sent twice applies once."""
        gates.answer(self, run_id, gate, "approved", by, comment)

    def reject(self, run_id: str, gate: str, *, by: str, comment: str | None = None) -> None:
        """Reject the gate ``gate`` a run is waiting at: the run raises GateRejected there."""
        gates.answer(self, run_id, gate, "rejected", by, comment)

    async def approve_async(self, run_id: str, gate: str, *, by: str,
                            comment: str | None = None) -> None:
        await asyncio.to_thread(gates.answer, self, run_id, gate, "approved", by, comment)

    async def reject_async(self, run_id: str, gate: str, *, by: str,
                           comment: str | None = None) -> None:
        await asyncio.to_thread(gates.answer, self, run_id, gate, "rejected", by, comment)

    def pending(self, run_id: str | None = None) -> list[gates.PendingGate]:
        """The gates waiting for an answer: of one run (and its branches) or of every run."""
        return gates.pending(self, run_id)

    async def pending_async(self, run_id: str | None = None) -> list[gates.PendingGate]:
        return await asyncio.to_thread(gates.pending, self, run_id)

    # -- operations ---------------------------------------------------------------------
    def queue(self, name: str, *, concurrency: int | None = None,
              worker_concurrency: int | None = None, limit: int | None = None,
              period: float | None = None, polling_interval: float = 0.2) -> str:
        """Declare a DBOS queue for runs (before launch); ``Pipeline.enqueue(..., queue=name)``.

        ``concurrency`` bounds running runs across all workers, ``worker_concurrency`` per
        process; ``limit`` runs may start per ``period`` seconds.
        """
        if self._launched:
            raise AppStateError(f"app {self.name!r}: declare queue {name!r} before launch", app=self.name)
        self._queues[name] = QueueSpec(name, concurrency, worker_concurrency, limit, period,
                                       polling_interval)
        return name

    def recover(self, executor_ids: list[str]) -> list[str]:
        """Hand the unfinished runs of dead executors to the live workers; return their ids.

        Each PENDING workflow of this app version owned by one of ``executor_ids`` goes back
        to its queue (DBOS's internal one for runs started directly), where any live worker
        picks it up and replays it from its last checkpoint. Only name executors whose
        process is gone: a live one would lose ownership of its work mid-step.
        """
        self._require_launched("recover")
        handles = DBOS._recover_pending_workflows(list(executor_ids))
        return [h.workflow_id for h in handles]


def _prepare_sqlite(url: str) -> None:
    """Create the SQLite file in WAL mode so waiters are not stalled by journal locks."""
    import sqlite3

    path = url.split("sqlite:///", 1)[-1]
    if not path or path == ":memory:":
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    con = sqlite3.connect(path)
    try:
        con.execute("PRAGMA journal_mode=WAL")
    finally:
        con.close()


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

    def _check_existing(self, run_id: str, status: Any) -> None:
        if status is None:
            return
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
        state = self._inputs(inputs)
        if run_id is not None:
            self._check_existing(run_id, DBOS.get_workflow_status(run_id))
        with SetWorkflowID(run_id or str(uuid.uuid4())):
            handle = DBOS.start_workflow(run_pipeline, self.name, self.version, state)
        return RunHandle(self.app, handle.workflow_id, handle)

    async def start_async(self, inputs: Any = None, *, run_id: str | None = None) -> RunHandle:
        self.app._require_launched(f"pipeline {self.name!r}.start_async")
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

    def status(self) -> RunStatus:
        st = DBOS.get_workflow_status(self.run_id)
        if st is None:
            raise UnknownRun(f"no run with id {self.run_id!r}", run_id=self.run_id)
        return RunStatus(st.status)

    async def status_async(self) -> RunStatus:
        st = await DBOS.get_workflow_status_async(self.run_id)
        if st is None:
            raise UnknownRun(f"no run with id {self.run_id!r}", run_id=self.run_id)
        return RunStatus(st.status)

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
        except TimeoutError:
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
                coro = DBOS.get_result_async(self.run_id)
            return self._result(await asyncio.wait_for(coro, timeout))
        except asyncio.TimeoutError:
            raise TimeoutError(f"run {self.run_id!r} did not finish within {timeout} s") from None
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
        child = dispatch.find_task(self.run_id, name)
        if child is None:
            return None
        return DBOS.get_event(child, dispatch.PROGRESS_EVENT, timeout_seconds=0)

    async def progress_async(self, name: str) -> Any:
        self._check_task(name)
        child = await dispatch.find_task_async(self.run_id, name)
        if child is None:
            return None
        return await DBOS.get_event_async(child, dispatch.PROGRESS_EVENT, timeout_seconds=0)
