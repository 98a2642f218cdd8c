"""Registered pipelines, runs and their handles.

>>> handle = publish.start({"topic": "x"}, run_id="post-42")   # returns at once
>>> handle.status(), handle.result(timeout=60).state
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dbos import DBOS, SetWorkflowID, SetWorkflowTimeout

from ..errors import BuildError, DurapipeError, StateError, UnknownRun
from ..ir import Dispatch, Node
from ..state import State, check_inputs
from . import admission
from .ask import AskMixin
from .interpreter import run_workflow
from .runhandle import RunHandle, RunResult, RunStatus
from .scope import belongs_to, check_run_id, is_run_workflow

if TYPE_CHECKING:
    from .app import App

_INSTANCE_RE = re.compile(r"#\d+")


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
        self.app.require_launched(f"pipeline {self.name!r}.start")
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
        self.app.require_launched(f"pipeline {self.name!r}.start_async")
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
        self.app.require_launched(f"pipeline {self.name!r}.enqueue")
        spec = self.app.queue_spec(queue, f"pipeline {self.name!r}.enqueue")
        self._check_own_queue(spec)
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
                    adm.options(spec, queued=True):
                handle = DBOS.enqueue_workflow(queue, self._workflow, self.name, self.version, state)
        return RunHandle(self.app, handle.workflow_id)

    def _check_own_queue(self, spec: Any) -> None:
        """Refuse a run that would wait on a queue for tasks it dispatches onto that queue:
        with a limit on runs in flight, runs holding every slot would wait forever."""
        limits = [f"{k}={getattr(spec, k)}" for k in ("concurrency", "worker_concurrency",
                                                      "per_tenant") if getattr(spec, k)]
        if not limits:
            return
        for path, node in self.node.walk():
            if isinstance(node, Dispatch) and node.queue == spec.name and not node.detach:
                raise DurapipeError(
                    f"pipeline {self.name!r}.enqueue: dispatch {path} puts its tasks on queue "
                    f"{spec.name!r}, the queue this run would be on; with its "
                    f"{', '.join(limits)} the runs in flight would hold the slots their tasks "
                    "need and wait for them forever. Dispatch onto a queue of their own "
                    f"(e.g. app.queue({spec.name + '-tasks'!r}, per_tenant=...), tasks take "
                    "their run's tenant) or enqueue the runs on another queue",
                    pipeline=self.name, queue=spec.name, node=path)

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


__all__ = ["DEADLINE_GRACE", "Pipeline", "Registered", "RunHandle", "RunResult", "RunStatus"]
