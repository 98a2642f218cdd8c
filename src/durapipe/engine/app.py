"""The App: a registry of pipelines plus the DBOS runtime it launches.

>>> app = App("blog")                       # DURAPIPE_DATABASE_URL, or an embedded SQLite file
>>> publish = app.pipeline("publish", writer >> formatter)
>>> with app:
...     result = publish.run({"topic": "AI safety"})
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from dbos import DBOS, DBOSConfig
from dbos._serialization import DBOSPortableJSONSerializer

from .. import validate
from ..audit import redact
from ..errors import AppStateError, BuildError, DatabaseError, storable_text
from ..ir import as_node
from . import (
    bounds,
    budget,
    events,
    executors,
    gates,
    handover,
    lifecycle,
    listen,
    outcomes,
    schedules,
    slots,
    slots_pg,
    versions,
)
from .admission import start_queue
from .batch import Batch
from .current import set_current_app
from .database import (
    check_postgres,
    check_url,
    dbos_app_name,
    launch_error,
    prepare_sqlite,
    resolve_url,
    sqlite_problem,
    sqlite_url,
)
from .executors import ExecutorLock
from .interpreter import run_workflow
from .queues import QueueSpec, register_queues
from .runs import Pipeline, Registered, RunHandle
from .scope import WORKFLOW_NAME, Owner, check_run, check_run_id
from .steps import StepLog
from .tracing import Tracing

log = logging.getLogger("durapipe")
class App:
    """A durapipe application: a registry of pipelines plus one DBOS runtime.

    ``database_url`` (or ``DURAPIPE_DATABASE_URL``) names Postgres in production; without
    either, runs are recorded in an embedded SQLite file ``<name>.sqlite``. ``model``
    overrides every agent's model (a FakeModel for tests and demos). ``version`` names the
    app line: every process of one line shares one DBOS application version whatever its
    code, so a deploy recovers the runs of the processes it replaces and decides per run
    whether it continues on the new code (see :mod:`durapipe.engine.versions`).
    ``tracing=True`` emits OpenTelemetry spans per run and per node through
    the global TracerProvider (``tracing=provider`` for another one; needs the ``otel``
    extra; see :mod:`durapipe.engine.tracing`). ``steps="lean"`` (the default) writes each
    step row on Postgres with one statement before and one after the body, the same rows
    and guarantees as ``DBOS.run_step`` (see :mod:`durapipe.engine.steps`);
    ``steps="dbos"`` goes through ``DBOS.run_step`` itself. SQLite always uses DBOS's path.

    ``events=True`` (the default) writes each run's event stream (``handle.stream()``, see
    :mod:`durapipe.engine.events`); ``stream_tokens=True`` streams every agent's model text
    to it, as ``Agent(...).stream_tokens()`` does for one agent.

    ``executor_id`` names this process in the runs it records (default: DBOS's ``local``,
    or env ``DBOS__VMID``); a launch recovers the unfinished runs of its executor id, so give
    each process of a deployment its own. A clean stop (``with app:`` exit,
    :meth:`shutdown`) leaves unfinished runs PENDING for the next launch with that id.

    ``max_tokens`` is the default token budget of every run (``start(..., max_tokens=)``
    overrides it; see :mod:`durapipe.engine.budget`); ``prices`` maps a model name to its
    ``(input, output)`` price per million tokens, recorded as ``cost`` on each model call.
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
        steps: str = "lean",
        events: bool = True,
        stream_tokens: bool = False,
        max_tokens: int | None = None,
        prices: dict[str, tuple[float, float]] | None = None,
    ) -> None:
        self.name = name
        self.events = bool(events)  # each run's event stream (engine/events.py)
        self.stream_tokens = bool(stream_tokens)  # every agent as with .stream_tokens()
        if steps not in ("lean", "dbos"):
            raise AppStateError(
                f"App({name!r}, steps={steps!r}): steps must be 'lean' (durapipe writes each "
                "step row with one statement on Postgres) or 'dbos' (DBOS.run_step)",
                app=name, steps=repr(steps),
            )
        self.steps = steps
        self._step_log: StepLog | bool | None = None
        self.dbos_name = dbos_app_name(name)
        self.database_url, self._database_warning = resolve_url(
            database_url, name, sqlite_url(self.dbos_name))
        self.model = model
        self.version = version
        self.executor_id = executor_id
        self._extra_config = dict(dbos_config or {})
        self._pipelines: dict[str, Registered] = {}
        self._queues: dict[str, QueueSpec] = {}
        self._limits: dict[str, slots.Spec] = {}
        self.limiter: slots.Limiter = slots.Limiter(self.name, {})
        self._launched = False
        self._executor_lock: ExecutorLock | None = None
        self._listen: list[str] | None = None
        # A long-lived process takes over, at launch, runs left waiting for its shape.
        self.take_over_waiting = True
        self.tracing = Tracing(None if tracing is True else tracing) if tracing else None
        self.max_tokens, self.prices = budget.check_options(name, max_tokens, prices)

    # -- registry -----------------------------------------------------------------------
    def pipeline(self, name: str, node: Any, inputs: list[str] | None = None) -> Pipeline:
        """Register ``node`` under ``name``; do it at import time, before the app launches."""
        if self._launched:
            raise AppStateError(
                f"app {self.name!r} is already launched: register pipeline {name!r} before "
                "`with app:` so that recovery after a crash can find it",
                app=self.name, pipeline=name,
            )
        if not isinstance(name, str) or not name or storable_text(name) != name:
            raise BuildError(f"app.pipeline({name!r}): the name must be a non-empty string "
                             "without NUL characters or lone surrogates")
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
        limits = slots.specs_of(root.walk(), self._limits, name)
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
        self._limits = limits
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
            "application_version": versions.application_version(self.dbos_name, self.version),
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

    def step_log(self) -> StepLog | None:
        """The writer of this app's step rows on Postgres (``steps="lean"``), else None."""
        found = self._step_log
        if found is None:
            from dbos._dbos import _get_dbos_instance

            dbos = _get_dbos_instance()
            found = False
            if self.steps == "lean" and StepLog.supports(dbos):
                log = StepLog(dbos)
                found = log if log.fits_schema() else False
            self._step_log = found
        return found if isinstance(found, StepLog) else None

    def launch(self) -> None:
        """Start DBOS and recover this app's unfinished runs. Prefer ``with app:``."""
        if self._launched:
            return
        url = self.database_url = check_url(self.database_url, self.name, "database_url")
        exists = True
        if url.startswith("sqlite"):
            problem = sqlite_problem()
            if problem:
                raise DatabaseError(f"App({self.name!r}): {problem}", url=url)
            prepare_sqlite(url)
        else:
            exists = check_postgres(url)
        if self._database_warning and url == sqlite_url(self.dbos_name):
            log.warning("%s", self._database_warning)
        log.info("app %r records to %s", self.name, redact(url))
        outcomes.install()
        set_current_app(self)
        lifecycle.reset()
        self._step_log = None
        # Taken before DBOS recovers this executor's runs, so a second live process with
        # the same executor id is warned before it takes them over.
        self._executor_lock = ExecutorLock(self.database_url, self.dbos_name,
                                           self.running_executor_id)
        self._executor_lock.acquire()
        events.start_log(url if self.events else None)  # before DBOS recovers any run
        config = self.dbos_config()
        width = bounds.pool_size(config)
        bounds.configure(width)
        DBOS(config=config)
        try:
            DBOS.listen_queues(listen.to_listen(self.dbos_name, self._listen, list(self._queues),
                                                self._pipelines.values(), width))
            handover.prepare(self, run_workflow)  # runs of pipelines not registered here
            DBOS.launch()
            handover.after_launch(self)
        except Exception as exc:
            set_current_app(None)
            DBOS.destroy()
            events.stop_log()
            self._release_executor()
            error = launch_error(exc, url)
            if error is not None:
                raise error from None
            raise
        if not exists:
            self._executor_lock.acquire()  # the database exists only now
            log.warning("app %r created the database %s, which did not exist; if its name is "
                        "a typo, fix the URL (runs recorded there are not in the database meant)",
                        self.name, redact(url))
        self._launched = True
        starts = start_queue(self.dbos_name)
        register_queues({**self._queues, starts: QueueSpec(starts)})
        schedules.apply_declared(self)
        self.limiter = slots_pg.new_limiter(self.name, self._limits, url, str(
            config.get("dbos_system_schema") or "dbos"))
        self.step_log()  # looked up once here rather than by the first step, on the loop
        lifecycle.start_watcher(_cancelled_of)

    @property
    def running_executor_id(self) -> str:
        """The executor id this process records on its runs (DBOS's ``local`` by default)."""
        return str(self.dbos_config().get("executor_id") or os.environ.get("DBOS__VMID") or "local")

    def shutdown(self, drain: float = 0.0) -> None:
        """Stop the app; every unfinished run stays PENDING for the next process to resume.

        No new step starts; ``drain`` seconds are given to the steps in flight to finish
        (their results are recorded, so they never run again); then every run still
        executing here is stopped where it is, without recording anything for it. The
        next launch with the same executor id (or ``durapipe recover <executor id>`` on a
        live worker) resumes each from its last recorded step.
        """
        if not self._launched:
            return
        self._launched = False
        lifecycle.stop_watcher()
        left = lifecycle.stop(drain)
        if left:
            log.warning(
                "durapipe: app %r stopped with %d unfinished run(s) left PENDING for recovery "
                "by executor %r (relaunch with that executor id, or `durapipe recover %s`): %s",
                self.name, len(left), self.running_executor_id, self.running_executor_id,
                ", ".join(left[:10]) + (" ..." if len(left) > 10 else ""),
            )
        self._step_log = None
        self.limiter.close()
        DBOS.destroy()
        events.stop_log()  # what the stopped runs emitted is written first
        set_current_app(None)
        self._release_executor()

    def _release_executor(self) -> None:
        if self._executor_lock is not None:
            self._executor_lock.release()
            self._executor_lock = None

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

    @property
    def launched(self) -> bool:
        """Whether :meth:`launch` ran (and :meth:`shutdown` has not since)."""
        return self._launched

    def require_launched(self, what: str) -> None:
        """Raise AppStateError naming ``what`` unless the app is launched."""
        if not self._launched:
            raise AppStateError(
                f"{what}: app {self.name!r} is not launched; use `with app:` (or app.launch())",
                app=self.name,
            )

    def queue_spec(self, name: str, where: str | None = None) -> QueueSpec | None:
        """The queue ``name`` declared with :meth:`queue` (None when there is none, or,
        given ``where``, AppStateError naming it and the declared queues)."""
        spec = self._queues.get(name)
        if spec is None and where is not None:
            raise AppStateError(
                f"{where}: app {self.name!r} has no queue {name!r} "
                f"(declared: {sorted(self._queues)}); declare it with app.queue({name!r}) "
                "before launch", queue=name,
            )
        return spec

    # -- runs ---------------------------------------------------------------------------
    def get_run(self, run_id: str) -> RunHandle:
        """A handle for any run of this app, also one started by an earlier process."""
        self.require_launched("get_run")
        run_id = check_run_id(run_id, f"app {self.name!r}.get_run")
        status = DBOS.get_workflow_status(run_id)
        self._check_run(run_id, status)
        return RunHandle(self, run_id)

    async def get_run_async(self, run_id: str) -> RunHandle:
        self.require_launched("get_run")
        run_id = check_run_id(run_id, f"app {self.name!r}.get_run_async")
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
        """Raise UnknownRun unless ``status`` is a workflow of one of ``kinds`` of this app."""
        check_run(self._owner(), run_id, status, kinds)

    def _owner(self) -> Owner:
        return Owner(self.name, self.dbos_name)

    # -- gates --------------------------------------------------------------------------
    def approve(self, run_id: str, gate: str, *, by: str, comment: str | None = None) -> None:
        """Approve the gate ``gate`` a run is waiting at. An answer sent twice applies once."""
        self.require_launched("approve")
        gates.answer(self._owner(), run_id, gate, "approved", by, comment)

    def reject(self, run_id: str, gate: str, *, by: str, comment: str | None = None) -> None:
        """Reject the gate ``gate`` a run is waiting at: the run raises GateRejected there."""
        self.require_launched("reject")
        gates.answer(self._owner(), run_id, gate, "rejected", by, comment)

    async def approve_async(self, run_id: str, gate: str, *, by: str,
                            comment: str | None = None) -> None:
        self.require_launched("approve")
        await asyncio.to_thread(gates.answer, self._owner(), run_id, gate, "approved", by, comment)

    async def reject_async(self, run_id: str, gate: str, *, by: str,
                           comment: str | None = None) -> None:
        self.require_launched("reject")
        await asyncio.to_thread(gates.answer, self._owner(), run_id, gate, "rejected", by, comment)

    def batch(self) -> Batch:
        """Runs of this app's pipelines to start together (``with app.batch() as b:
        b.add(pipeline, inputs, run_id=...)``); see :class:`~durapipe.engine.batch.Batch`."""
        return Batch(self)

    def limits(self) -> list[dict[str, Any]]:
        """Each ``limit`` key of this app: ``concurrency`` (the bound), ``adaptive``, the
        ``limit`` in force and the slots ``in_use`` across all its processes."""
        self.require_launched("limits")
        return self.limiter.status()

    def limit_changes(self, key: str) -> list[dict[str, Any]]:
        """Every change of an adaptive limit's whole value, oldest first, with the reason."""
        self.require_launched("limit_changes")
        return self.limiter.changes_of(key)

    def pending(self, run_id: str | None = None) -> list[gates.PendingGate]:
        """The gates waiting for an answer: of one run (and its branches) or of every run."""
        self.require_launched("pending")
        return gates.pending(self._owner(), run_id)

    async def pending_async(self, run_id: str | None = None) -> list[gates.PendingGate]:
        self.require_launched("pending")
        return await asyncio.to_thread(gates.pending, self._owner(), run_id)

    # -- operations ---------------------------------------------------------------------
    def queue(self, name: str, *, concurrency: int | None = None,
              worker_concurrency: int | None = None, limit: int | None = None,
              period: float | None = None, polling_interval: float = 0.2,
              per_tenant: int | None = None,
              per_tenant_rate: tuple[int, float] | None = None) -> str:
        """Declare a DBOS queue for runs (before launch); ``Pipeline.enqueue(..., queue=name)``.

        ``concurrency`` bounds running runs across all workers, ``worker_concurrency`` per
        process; ``limit`` runs may start per ``period`` seconds. ``per_tenant=n`` keeps
        each tenant (``enqueue(..., tenant=)``) to n runs or background tasks in flight,
        ``per_tenant_rate=(count, seconds)`` to count starts per window, so one tenant's
        backlog never holds up another's runs; runs and the tasks they join go on separate
        queues (see :mod:`durapipe.engine.admission`).
        """
        if self._launched:
            raise AppStateError(f"app {self.name!r}: declare queue {name!r} before launch", app=self.name)
        self._queues[name] = QueueSpec(name, concurrency, worker_concurrency, limit, period,
                                       polling_interval, per_tenant, per_tenant_rate)
        return name

    def schedule(self, pipeline: str, cron: str, inputs: Any = None, *, name: str | None = None,
                 backfill: bool = True) -> str:
        """Run ``pipeline`` on a cron schedule; see :meth:`Pipeline.schedule`."""
        return schedules.declare(self, pipeline, cron, inputs, name, backfill)

    def recover(self, executor_ids: list[str], *, force: bool = False) -> list[str]:
        """Hand the unfinished runs of dead executors to the live workers; return their ids.

        Each PENDING workflow of this app version owned by one of ``executor_ids`` goes back
        to its queue (DBOS's internal one for runs started directly), where any live worker
        picks it up and replays it from its last checkpoint. Only name executors whose
        process is gone: a live one would lose ownership of its work mid-step.
        """
        self.require_launched("recover")
        return executors.recover(self.name, self.database_url, self.dbos_name, executor_ids, force)


def _cancelled_of(workflow_ids: list[str]) -> list[str]:
    """Which of these workflows the database records as CANCELLED (by anyone, anywhere)."""
    found = DBOS.list_workflows(workflow_ids=workflow_ids, status="CANCELLED",
                                load_input=False, load_output=False)
    return [st.workflow_id for st in found]
