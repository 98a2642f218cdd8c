"""Runs of pipelines a process does not register: handed over to the processes that do.

Every process of an app line shares one DBOS application version, and DBOS puts what it
recovers, resumes or forks on its internal queue, which every launched process dequeues
from. So a process that registers fewer pipelines than the app has (one that only reads
through handles, a service that registers some of them) can dequeue a run it cannot run.

Such a process answers DBOS for every ``durapipe.run:<pipeline>`` (:func:`prepare`) with
that pipeline's run workflow, whose body finds the pipeline missing and calls
:func:`hand_over` before anything else: without running a step or recording an outcome,
it moves the run, still owned by this execution, to the queue of its recorded shape
(``versions.shape_queue``, to which only processes with that shape listen) and ends the
execution as :func:`versions.reconcile` does. Subtrees (``durapipe.run``) and dispatched
tasks (``durapipe.task``) of such a pipeline are handed over alike.

A run handed to a shape no live process runs (a deploy changed it) waits on that queue:
``durapipe versions`` lists it as waiting, and a process whose shape is compatible with it
takes it over at launch (:func:`after_launch`), as it takes over ``durapipe.waiting``.

How DBOS is asked: on the DBOS releases durapipe is tested with, its map of workflow names
answers an unknown ``durapipe.run:`` name with that pipeline's run workflow (private to
DBOS 3.4: ``DBOSRegistry.workflow_info_map``). On any other release, the pipelines of the
app recorded in ``durapipe.shapes`` before this process launched are registered instead;
a pipeline first deployed after that is not covered there (restart such a process after
deploying a new pipeline).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import sqlalchemy as sa
from dbos import DBOS
from dbos._error import DBOSWorkflowCancelledError

from . import versions
from .scope import RUN_PREFIX
from .steps import TESTED_DBOS, dbos_release

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("durapipe.handover")
MakeWorkflow = Callable[[str], Any]


# -- how DBOS finds a workflow for an unknown name --------------------------------------

class _Names(dict):  # type: ignore[type-arg]
    """DBOS's map of workflow names, answering an unknown ``durapipe.run:<pipeline>`` with
    that pipeline's run workflow (registered in the map by the first ask)."""

    make: MakeWorkflow | None = None

    def get(self, name: Any, default: Any = None) -> Any:
        found = super().get(name)
        if found is None and self.make is not None and isinstance(name, str) \
                and name.startswith(RUN_PREFIX) and len(name) > len(RUN_PREFIX):
            return self.make(name[len(RUN_PREFIX):])
        return default if found is None else found


def prepare(app: App, make: MakeWorkflow) -> None:
    """Before DBOS launches: make DBOS find ``make(pipeline)`` (the run workflow of
    ``pipeline``) for the runs of every pipeline of the app, registered here or not."""
    if dbos_release() in TESTED_DBOS:
        from dbos._dbos import _get_or_create_dbos_registry

        registry = _get_or_create_dbos_registry()
        names = registry.workflow_info_map
        if not isinstance(names, _Names):
            names = _Names(names)
            registry.workflow_info_map = names
        names.make = make
        return
    for pipeline in sorted(_recorded_pipelines(app) - set(app.pipelines)):
        make(pipeline)


def _recorded_pipelines(app: App) -> set[str]:
    """The pipelines of the app in ``durapipe.shapes`` (empty on SQLite or before any)."""
    if app.database_url.startswith("sqlite"):
        return set()
    import psycopg

    with psycopg.connect(app.database_url, connect_timeout=10) as con:
        if con.execute("SELECT to_regclass('durapipe.shapes')").fetchone() in (None, (None,)):
            return set()
        rows = con.execute("SELECT DISTINCT pipeline FROM durapipe.shapes WHERE app = %s",
                           (app.dbos_name,)).fetchall()
    return {str(r[0]) for r in rows}


# -- in a workflow ----------------------------------------------------------------------

async def hand_over(app: App, pipeline: str, shape: str, root: str) -> NoReturn:
    """Hand the running workflow (of ``pipeline``, recorded by ``shape``, of run ``root``)
    over to the processes with its shape, and end this execution without an outcome."""
    workflow_id = DBOS.workflow_id or root
    found = versions._engine()
    if found is None:
        message = (f"app {app.name!r} in this process does not register pipeline {pipeline!r}: "
                   f"run {root} stays PENDING for a process that does, with this executor id")
        log.warning("%s", message)
        raise DBOSWorkflowCancelledError(message)
    moved, queue = await asyncio.to_thread(_move, found[0], found[1], workflow_id,
                                           _own_token(workflow_id), app.dbos_name, shape)
    if moved:
        log.info("handed run %s (workflow %s) of pipeline %r over to the processes with its "
                 "shape %s: app %r does not register that pipeline in this process", root,
                 workflow_id, pipeline, shape, app.name)
        # Wait here, looking every PARK_CHECK_SECONDS, until the workflow ends elsewhere:
        # DBOS's parking, which follows, polls for its outcome each second.
        while await asyncio.to_thread(_unfinished, found[0], found[1], workflow_id):
            await asyncio.sleep(versions.PARK_CHECK_SECONDS)
    raise DBOSWorkflowCancelledError(
        f"workflow {workflow_id} of pipeline {pipeline!r} was handed over to queue {queue}")


def _own_token(workflow_id: str) -> str | None:
    """This execution's owner token, when DBOS's context carries it (DBOS 3.4)."""
    if dbos_release() not in TESTED_DBOS:
        return None
    from dbos._context import get_local_dbos_context

    ctx = get_local_dbos_context()
    if ctx is None or ctx.workflow_id != workflow_id:
        return None
    token = getattr(ctx, "owner_xid", None)
    return str(token) if token is not None else None


def _unfinished(engine: sa.Engine, schema: str, workflow_id: str) -> bool:
    with engine.begin() as con:
        row = con.execute(sa.text(
            f"SELECT status FROM {versions._q(schema)}.workflow_status WHERE workflow_uuid = :id"),
            {"id": workflow_id}).first()
    return row is not None and row[0] in ("PENDING", "ENQUEUED", "DELAYED")


_guarded: dict[int, bool] = {}


def _move(engine: sa.Engine, schema: str, workflow_id: str, token: str | None, app_name: str,
          shape: str) -> tuple[bool, str]:
    """Put the workflow on the queue of ``shape`` of the app that owns it (``app_name``
    unless the row names another); True when it moved."""
    with engine.begin() as con:
        row = con.execute(sa.text(
            f"SELECT status, owner_xid, application_name FROM {versions._q(schema)}.workflow_status "
            "WHERE workflow_uuid = :id"), {"id": workflow_id}).first()
    queue = versions.shape_queue(str(row[2]) if row is not None and row[2] else app_name, shape)
    if row is None or row[0] != "PENDING":
        return False, queue
    if token is None:  # the owner in the row: the execution that dequeued it is this one
        token = row[1]
    DBOS.register_queue(queue, polling_interval_sec=0.5, on_conflict="always_update")
    guarded = _guarded.get(id(engine))
    if guarded is None:
        guarded = _guarded[id(engine)] = versions._claim_fits(engine, schema)
    return versions._claim(engine, schema, workflow_id, token, queue, guarded), queue


# -- at launch --------------------------------------------------------------------------

def after_launch(app: App) -> list[str]:
    """Record this process's shapes and take over the runs waiting for a compatible shape:
    those left PENDING (``versions.on_launch``) and those handed to a shape's queue that no
    process may run (:func:`take_over_handed`). Returns their workflow ids."""
    taken = versions.on_launch(app)
    if app.take_over_waiting:
        taken += take_over_handed(app)
    return taken


def take_over_handed(app: App) -> list[str]:
    """Move the workflows handed to the queue of another shape of one of this process's
    pipelines onto this process's shape queue, when that shape is compatible with theirs."""
    found = versions._engine()
    if found is None or not app.pipelines:
        return []
    engine, schema = found
    prefix = versions.shape_queue(app.dbos_name, "")
    own = {versions.shape_queue(app.dbos_name, reg.version): reg for reg in app.pipelines.values()}
    q = versions._q(schema)
    with engine.begin() as con:
        rows = con.execute(sa.text(
            f"SELECT s.workflow_uuid, s.queue_name, i.inputs FROM {q}.workflow_status s "
            f"JOIN {q}.workflow_input i ON i.workflow_uuid = s.workflow_uuid "
            "WHERE s.status = 'ENQUEUED' AND s.application_name = :app "
            "AND starts_with(s.queue_name, :prefix) AND NOT s.queue_name = ANY(:own)"),
            {"app": app.dbos_name, "prefix": prefix, "own": list(own)}).all()
    taken = []
    for workflow_id, old_queue, inputs in rows:
        args = _arguments(inputs)
        reg = app.pipelines.get(str(args[0])) if args else None
        if reg is None or len(args) < 2:
            continue
        path = str(args[3]) if len(args) > 3 and args[3] else "0"
        root = str(args[4]) if len(args) > 4 and args[4] else workflow_id
        with engine.begin() as con:
            verdict = versions.judge(con, schema, app.dbos_name, reg, str(args[1]), workflow_id,
                                     path, root)
        if not verdict.compatible:
            continue
        queue = versions.shape_queue(app.dbos_name, reg.version)
        DBOS.register_queue(queue, polling_interval_sec=0.5, on_conflict="always_update")
        with engine.begin() as con:
            moved = con.execute(sa.text(
                f"UPDATE {q}.workflow_status SET queue_name = :queue WHERE workflow_uuid = :id "
                "AND status = 'ENQUEUED' AND queue_name = :old"),
                {"queue": queue, "id": workflow_id, "old": old_queue}).rowcount
        if moved:
            taken.append(workflow_id)
            log.info("took over workflow %s of pipeline %r, handed over to shape %s", workflow_id,
                     reg.name, args[1])
    return taken


def _arguments(inputs: Any) -> list[Any]:
    """The positional arguments of a workflow's recorded input (portable JSON)."""
    try:
        found = json.loads(inputs)
        args = list(found.get("positionalArgs") or [])
        named = found.get("namedArgs") or {}
    except (ValueError, TypeError, AttributeError):
        return []
    for i, key in enumerate(("pipeline", "version", "state", "path", "root")):
        if len(args) == i and key in named:
            args.append(named[key])
    return args
