"""Cron schedules of pipelines, kept by DBOS in the database.

>>> publish.schedule("0 3 * * *", {"topic": "nightly digest"})      # name: "publish"
>>> publish.schedule("*/10 * * * * *", {"topic": "x"}, name="often")   # 6 fields: seconds

A schedule is a row of ``dbos.workflow_schedules`` named ``<app>:<name>``: DBOS's scheduler
thread in every worker of the app fires the workflow ``durapipe.schedule`` once per tick
(its workflow id ``sched-<schedule>-<tick>`` is unique, so several workers never fire a
tick twice), and with ``backfill`` a launch first fires the ticks missed since the last
one. That workflow starts the run ``<name>@<tick time>`` as a run of its own (top level,
listed with the others), so the run too exists once per tick, even when the firing
workflow is replayed after a crash.

Declaring a schedule whose definition (cron, inputs, backfill) is unchanged keeps the row
and its paused state, so a worker may declare its schedules at every start.
``durapipe schedules`` lists them; ``pause``/``resume`` stop and restart the firing: a
tick due while paused starts no run (also before DBOS's scheduler has seen the pause), a
paused schedule stays paused across restarts, and a resumed one fires from its next tick
(the ticks of the pause are not backfilled).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from dbos import DBOS

from ..errors import BuildError, OperatorError
from .admission import system_engine
from .current import current_app
from .runs import Pipeline
from .scope import check_name

if TYPE_CHECKING:
    from .app import App

SCHEDULE_WORKFLOW = "durapipe.schedule"


@dataclass(frozen=True)
class ScheduleSpec:
    name: str
    pipeline: str
    cron: str
    inputs: dict[str, Any]
    backfill: bool

    def dbos_name(self, app: str) -> str:
        return f"{app}:{self.name}"

    def context(self, app: str) -> dict[str, Any]:
        return {"app": app, "pipeline": self.pipeline, "schedule": self.name,
                "inputs": self.inputs}


_declared: weakref.WeakKeyDictionary[App, dict[str, ScheduleSpec]] = weakref.WeakKeyDictionary()
_healers: weakref.WeakKeyDictionary[App, threading.Event] = weakref.WeakKeyDictionary()
log = logging.getLogger("durapipe.schedules")


def declare(app: App, pipeline: str, cron: Any, inputs: Any, name: str | None,
            backfill: bool) -> str:
    """Check and record a schedule; write it at once when the app runs, else at launch."""
    from croniter import croniter

    reg = app.registered(pipeline)
    where = f"pipeline {pipeline!r}.schedule"
    if not isinstance(cron, str) or not croniter.is_valid(cron):
        raise BuildError(
            f"{where}: {cron!r} is not a cron expression; use 5 fields (minute hour day "
            "month weekday, e.g. '0 3 * * *') or 6 with seconds first ('*/10 * * * * *')",
            pipeline=pipeline, cron=repr(cron))
    state = Pipeline(app, reg)._inputs(inputs)
    name = name if name is not None else pipeline
    check_name(name, "schedule name", where)
    spec = ScheduleSpec(name, pipeline, cron, state, bool(backfill))
    _declared.setdefault(app, {})[name] = spec
    if app.launched:
        _write(app, spec)
    return name


def apply_declared(app: App) -> None:
    """Write the schedules declared before launch (call right after ``DBOS.launch``), and
    watch for the tick DBOS's scheduler can miss when its firing (re)starts (:func:`_heal`)."""
    started: dict[str, str] = {}
    for spec in _declared.get(app, {}).values():
        last = _write(app, spec)
        if spec.backfill and last:
            started[spec.dbos_name(app.dbos_name)] = last
    old = _healers.pop(app, None)
    if old is not None:
        old.set()
    if any(spec.backfill for spec in _declared.get(app, {}).values()):
        stop = _healers[app] = threading.Event()
        threading.Thread(target=_heal, args=(app, stop, started), daemon=True,
                         name="durapipe-schedule-gaps").start()


def _write(app: App, spec: ScheduleSpec) -> str | None:
    """Write the schedule unless it is there as declared; return its last tick fired."""
    full = spec.dbos_name(app.dbos_name)
    context = spec.context(app.dbos_name)
    old = DBOS.get_schedule(full)
    if old is not None:
        if (old["workflow_name"] == SCHEDULE_WORKFLOW and old["schedule"] == spec.cron
                and old["context"] == context and bool(old["automatic_backfill"]) == spec.backfill):
            return old.get("last_fired_at") if old.get("status", "ACTIVE") == "ACTIVE" else None
        DBOS.delete_schedule(full)
    DBOS.create_schedule(schedule_name=full, workflow_fn=fire, schedule=spec.cron,
                         context=context, automatic_backfill=spec.backfill)
    if old is not None and old["status"] != "ACTIVE":
        DBOS.pause_schedule(full)
    return None


def run_id_for(schedule: str, tick: Any) -> str:
    at = tick.isoformat() if isinstance(tick, datetime) else str(tick)
    return f"{schedule}@{at}"


@DBOS.workflow(name=SCHEDULE_WORKFLOW)
async def fire(scheduled_time: datetime, context: Any) -> None:
    """One tick of a schedule: start its run (idempotent on the run id)."""
    full = f"{context['app']}:{context['schedule']}"

    app = current_app()

    async def active() -> bool:
        found = await DBOS.get_schedule_async(full)
        if found is None:
            return False
        if found.get("status", "ACTIVE") == "ACTIVE":
            return True
        # Paused: a tick due before the pause (fired late, e.g. a backfill after a restart)
        # still runs; one due at or after it does not.
        since = await asyncio.to_thread(_paused_at, app, full)
        return since is not None and _aware(scheduled_time) < since

    # DBOS's scheduler sees a pause at its next poll (every 30 s once a worker has run a
    # minute); a tick due after the pause starts nothing. A step: a replay decides the same.
    if not await DBOS.run_step_async({"name": "schedule_active"}, active):
        return
    pipeline = Pipeline(app, app.registered(context["pipeline"]))
    run_id = run_id_for(context["schedule"], scheduled_time)

    async def start() -> None:
        await pipeline.start_async(context.get("inputs") or {}, run_id=run_id)

    # An empty context: the run is started as a top-level workflow, not as a child of
    # this one, so it is listed, steered and recovered like any other run.
    await asyncio.get_running_loop().create_task(start(), context=contextvars.Context())


# -- operators (CLI) ------------------------------------------------------------------------

@dataclass(frozen=True)
class ScheduleInfo:
    app: str | None
    name: str
    pipeline: str | None
    cron: str
    status: str
    last_fired: str | None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def list_schedules(client: Any, app: str | None = None) -> list[ScheduleInfo]:
    """The durapipe schedules recorded in a database (of one app's DBOS name, if given)."""
    out = []
    for row in client.list_schedules(workflow_name=SCHEDULE_WORKFLOW):
        ctx = row.get("context") if isinstance(row.get("context"), dict) else {}
        owner = ctx.get("app")
        if app is not None and owner != app:
            continue
        out.append(ScheduleInfo(owner, str(ctx.get("schedule") or row["schedule_name"]),
                                ctx.get("pipeline"), row["schedule"], row["status"],
                                row.get("last_fired_at")))
    return sorted(out, key=lambda s: (s.app or "", s.name))


def set_paused(client: Any, name: str, paused: bool, app: str | None = None,
               url: str | None = None) -> ScheduleInfo:
    """Pause or resume the schedule ``name`` (``<app>:<name>`` or a name unique among apps).
    With the database ``url``, the moment of a pause is recorded: a tick due before it that
    fires late still runs."""
    found = [s for s in list_schedules(client, app)
             if name in (s.name, f"{s.app}:{s.name}")]
    if len(found) != 1:
        known = ", ".join(f"{s.app}:{s.name}" for s in list_schedules(client)) or "none"
        why = "is ambiguous; name it as <app>:<schedule>" if found else "does not exist"
        raise OperatorError(f"schedule {name!r} {why} (schedules: {known})", schedule=name)
    info = found[0]
    full = f"{info.app}:{info.name}"
    if url is not None:
        _record_pause(url, full, paused)
    if paused:
        client.pause_schedule(full)
    else:
        # DBOS backfills a resumed schedule from its last tick, which would fire every tick
        # of the pause at once; it resumes from now (DBOS 3.4's SystemDatabase, if present).
        mark = getattr(getattr(client, "_sys_db", None), "update_last_fired_at", None)
        if mark is not None and info.status != "ACTIVE":
            mark(full, datetime.now(timezone.utc).isoformat())
        client.resume_schedule(full)
    return ScheduleInfo(info.app, info.name, info.pipeline, info.cron,
                        "PAUSED" if paused else "ACTIVE", info.last_fired)


# -- when a schedule was paused (durapipe.schedule_pauses, Postgres) ---------------------

_PAUSES = ("CREATE TABLE IF NOT EXISTS durapipe.schedule_pauses (schedule text PRIMARY KEY, "
           "paused_at timestamptz NOT NULL)")


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)


def _record_pause(url: str, full: str, paused: bool) -> None:
    if not url.startswith(("postgresql://", "postgres://")):
        return
    engine = sa.create_engine(url.replace("postgres://", "postgresql://", 1).replace(
        "postgresql://", "postgresql+psycopg://", 1), poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as con:
            con.execute(sa.text("CREATE SCHEMA IF NOT EXISTS durapipe"))
            con.execute(sa.text(_PAUSES))
            if paused:
                con.execute(sa.text(
                    "INSERT INTO durapipe.schedule_pauses VALUES (:s, now()) ON CONFLICT "
                    "(schedule) DO UPDATE SET paused_at = EXCLUDED.paused_at"), {"s": full})
            else:
                con.execute(sa.text("DELETE FROM durapipe.schedule_pauses WHERE schedule = :s"),
                            {"s": full})
    finally:
        engine.dispose()


def _paused_at(app: App, full: str) -> datetime | None:
    """When schedule ``full`` was paused through durapipe; None if unknown (SQLite, or paused
    with DBOS's own tools)."""
    if app.database_url.startswith("sqlite"):
        return None
    with system_engine(app).connect() as con:
        if con.execute(sa.text("SELECT to_regclass('durapipe.schedule_pauses')")).scalar() is None:
            return None
        at = con.execute(sa.text("SELECT paused_at FROM durapipe.schedule_pauses "
                                 "WHERE schedule = :s"), {"s": full}).scalar()
    return _aware(at) if isinstance(at, datetime) else None


# -- the tick between DBOS's backfill and its firing thread ------------------------------

def _heal(app: App, stop: threading.Event, armed: dict[str, str]) -> None:
    """Fire the ticks DBOS's scheduler skips when it (re)starts a schedule's firing.

    At a launch, and when a paused schedule is resumed, DBOS backfills the ticks from the
    last one fired up to its own ``now``, then starts the firing thread, which begins at the
    tick after its own, later ``now``: a tick falling between the two is fired by neither
    (one in a few launches of a per-second schedule, on a loaded machine). From each
    (re)start until the first tick the thread fires (``last_fired_at`` moves), the window is
    backfilled once more with DBOS's public ``backfill_schedule``; ticks already fired are
    skipped by their workflow ids. ``armed``: schedule -> its last tick at the (re)start.
    """
    seen: dict[str, str] = {name: "ACTIVE" for name in armed}
    while not stop.wait(0.25):
        if not app.launched:
            return
        try:
            watched = [spec.dbos_name(app.dbos_name)
                       for spec in list(_declared.get(app, {}).values()) if spec.backfill]
            # One read per round for all of them (not one per schedule).
            rows = {row["schedule_name"]: row for row in DBOS.list_schedules(
                workflow_name=SCHEDULE_WORKFLOW, schedule_name_prefix=f"{app.dbos_name}:")}
            for full in watched:
                row = rows.get(full)
                if row is None:
                    continue
                status, last = row.get("status", "ACTIVE"), row.get("last_fired_at")
                before, seen[full] = seen.get(full), status
                if status != "ACTIVE" or not last:
                    armed.pop(full, None)
                elif before is not None and before != "ACTIVE":
                    armed[full] = last  # resumed: the resume set the last tick to its time
                elif full in armed and last != armed[full]:
                    start = armed.pop(full)
                    DBOS.backfill_schedule(full, datetime.fromisoformat(start),
                                           datetime.fromisoformat(last))
        except Exception as exc:  # the app is stopping, or the database is away: next round
            if not app.launched:
                return
            log.debug("checking the schedules of app %r for skipped ticks: %s", app.name, exc)
